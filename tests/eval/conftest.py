"""Fixtures of the evaluation tests: the backend on the shared tiny bundle, local tasks, a manifest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
EOS_ID = 2


def need_lm_eval() -> None:
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness (lm_eval) is not installed here")


@pytest.fixture(scope="session")
def make_lm(tiny_bundle_dir: Path):
    """HybridEvalLM on the tiny bundle (CPU) with the given settings."""
    need_lm_eval()
    from eval.lm_backend import HybridEvalLM

    def build(batch_size: int = 4, **kwargs) -> HybridEvalLM:
        return HybridEvalLM(str(tiny_bundle_dir), device="cpu", batch_size=batch_size, **kwargs)

    return build


@pytest.fixture(scope="session")
def lm(make_lm):
    return make_lm(batch_size=3)


@pytest.fixture(scope="session")
def builtin_tasks():
    """lm-eval's TaskManager over its built-in task index (building the index takes seconds)."""
    need_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager()


@pytest.fixture(scope="session")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped local tasks (eval/tasks) plus the test group over them."""
    root = tmp_path_factory.mktemp("tasks")
    shutil.copytree(REPO / "eval" / "tasks", root, dirs_exist_ok=True)
    shutil.copy(DATA / "local_suite.yaml", root / "local_suite.yaml")
    return root


def write_manifest(root: Path, sources: dict[str, list[list[list[int]]]], tokenizer_json: Path) -> Path:
    """A curated-data folder per docs/data_contract.md (validated by config/manifest.py) holding only a
    validation split: per source a list of shards, each a list of documents (token ids; EOS is
    appended here). Returns the manifest path."""
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    split_sources = []
    for name, shards in sources.items():
        entries = []
        for i, docs in enumerate(shards):
            rel = f"tokens/validation/{name}/{i:03d}_{name}.ds"
            stream = np.concatenate([np.asarray(d + [EOS_ID], dtype="<u2") for d in docs]).tobytes()
            ends = np.cumsum([len(d) + 1 for d in docs]).astype("<u8").tobytes()
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(stream)
            (root / f"{rel}.index").write_bytes(ends)
            entries.append({"path": rel, "index": f"{rel}.index", "bytes": len(stream), "tokens": len(stream) // 2,
                            "documents": len(docs), "sha256": sha(stream), "index_sha256": sha(ends)})
        split_sources.append({"name": name, "weight": 1.0 / len(sources), "folder": f"tokens/validation/{name}",
                              "documents": sum(e["documents"] for e in entries),
                              "tokens": sum(e["tokens"] for e in entries), "shards": entries})
    (root / "tokenizer").mkdir(exist_ok=True)
    shutil.copy(tokenizer_json, root / "tokenizer" / "tokenizer.json")
    (root / "tokenizer" / "tokenizer.model").write_bytes(b"unused by eval")
    manifest = {
        "format_version": 1, "created": "2026-01-01T00:00:00Z", "recipe": {"name": "test", "sha256": "0"},
        "tokenizer": {"model": "tokenizer/tokenizer.model", "json": "tokenizer/tokenizer.json",
                      "sha256": sha(b"unused by eval"), "json_sha256": sha(tokenizer_json.read_bytes()),
                      "vocab_size": 512, "bos_id": 1, "eos_id": EOS_ID, "pad_id": 0, "unk_id": 3},
        "token_dtype": "uint16", "token_size": 2,
        "splits": {
            "train": {"documents": 0, "tokens": 0, "sources": [
                {"name": "none", "weight": 1.0, "folder": "tokens/train/none", "documents": 0, "tokens": 0,
                 "shards": []}]},
            "validation": {"documents": sum(s["documents"] for s in split_sources),
                           "tokens": sum(s["tokens"] for s in split_sources), "sources": split_sources},
        },
    }
    path = root / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2))
    return path


@pytest.fixture(scope="session")
def manifest_path(tmp_path_factory: pytest.TempPathFactory, tiny_bundle_dir: Path) -> Path:
    """Two sources (one with two shards) of random documents of 3..40 tokens (ids 4..511)."""
    rng = np.random.default_rng(0)
    docs = lambda n: [rng.integers(4, 512, size=int(rng.integers(3, 41))).tolist() for _ in range(n)]  # noqa: E731
    return write_manifest(tmp_path_factory.mktemp("curated"), {"prose": [docs(9), docs(4)], "code": [docs(7)]},
                          tiny_bundle_dir / "tokenizer.json")


@pytest.fixture(scope="session")
def run_cli(tmp_path_factory: pytest.TempPathFactory):
    """Run `python eval/run.py ARGS` in a fresh process, offline, with an empty HF cache."""
    need_lm_eval()
    hf_home = tmp_path_factory.mktemp("hf_home")

    def run(*args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "HF_HOME": str(hf_home), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        return subprocess.run([sys.executable, str(REPO / "eval" / "run.py"), *args], capture_output=True,
                              text=True, env=env, timeout=600)

    return run
