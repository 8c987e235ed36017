"""A small curation recipe (a few hundred documents, three sources incl. a hub source read from a fake
local mirror) and one shared run of the CLI on it."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
EMBEDDED = REPO / "data_recipes" / "embedded"
MIRROR_ID = "test-org/docstrings"


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """python pipeline/curate.py ARGS, as a user runs it (offline: HF_HUB_OFFLINE=1)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "pipeline" / "curate.py"), *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, env=env)


def stdlib_files(limit: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if 2_000 < p.stat().st_size < 30_000)[:limit]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def make_mirror(root: Path, hub_id: str, rows: list[dict], config: str | None = None, data_dir: str | None = None,
                split: str = "train") -> Path:
    """A fake hub snapshot at root/<hub_id>: jsonl data + README `configs:` mapping config/split to files."""
    repo = root / hub_id
    sub = "/".join(p for p in (config, data_dir) if p) or "data"
    write_jsonl(repo / sub / f"{split}-00000.jsonl", rows)
    if config:
        card = {"configs": [{"config_name": config, "data_files": [{"split": split, "path": f"{sub}/*.jsonl"}]}]}
        (repo / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n")
    return repo


def docstring_rows(limit: int = 60) -> list[dict]:
    """English prose on every machine: long module docstrings of the standard library."""
    rows = []
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError):
            continue
        if doc and len(doc) > 400:
            rows.append({"text": doc, "id": path.stem})
    return rows[:limit]


@pytest.fixture(scope="session")
def small_recipe(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Recipe path, data root and the planted expectations of the small test recipe."""
    root = tmp_path_factory.mktemp("recipe")
    code = [{"text": p.read_text(encoding="utf-8"), "id": p.name} for p in stdlib_files(120)]
    code.append({"text": code[0]["text"], "id": "copy-of-" + code[0]["id"]})  # an exact duplicate
    write_jsonl(root / "code" / "part-0.jsonl", code[:60])
    write_jsonl(root / "code" / "part-1.jsonl", code[60:])
    data_root = root / "mirrors"
    make_mirror(data_root, MIRROR_ID, docstring_rows(), config="default")
    recipe = {
        "name": "small",
        "sources": [
            {"name": "code", "type": "jsonl", "path": "code", "filters": [], "weight": 2},
            {"name": "planted", "type": "jsonl", "path": str(EMBEDDED / "planted.jsonl"), "metadata": {"kind": "kind"}},
            {"name": "docs", "type": "hf", "hub_id": MIRROR_ID, "hub_config": "default", "filters": ["language"]},
        ],
        "filters": {"language": {"threshold": 0.5}},
        "decontamination": {"files": [{"name": "local_passages", "query_key": "question",
                                       "path": str(EMBEDDED / "eval" / "local_passages.jsonl")}]},
        "tokenizer": {"vocab_size": 700, "sample_docs": 400, "input_sentence_size": 20000},
        "output": {"shard_tokens": 40000, "validation_fraction": 0.1, "seed": 7},
        "cluster": {"tasks": 2},
    }
    path = root / "small.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return {"path": path, "data_root": data_root, "root": root}


@pytest.fixture(scope="session")
def curated(small_recipe: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output folder of one clean run of the small recipe."""
    out = tmp_path_factory.mktemp("curated") / "out"
    proc = run_cli("--recipe", str(small_recipe["path"]), "--output", str(out), "--data-root",
                   str(small_recipe["data_root"]), "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out.parent / "console.txt").write_text(proc.stdout + proc.stderr)  # what the user saw
    return out
