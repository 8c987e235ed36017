"""Fixtures of the export tests: extra bundles (padded vocab, untied, qk_norm), text, the scripts."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from model import HybridLM, ModelConfig
from model.bundle import save_bundle

REPO = Path(__file__).resolve().parents[2]


def small_config(**overrides) -> ModelConfig:
    base = dict(preset="tiny", vocab_size=512, d_model=64, n_layers=4, pattern="MAMA", ffn_hidden=128,
                attention={"n_heads": 4, "n_kv_heads": 2}, mamba={"d_state": 16, "headdim": 16, "chunk_size": 16})
    return ModelConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def padded_bundle_dir(tmp_path_factory: pytest.TempPathFactory, test_tokenizer_dir: Path) -> Path:
    """Vocab 500 (padded to 512), untied head, 2 SSM groups, head_dim != d_model / n_heads, pattern AMMA."""
    torch.manual_seed(1)
    cfg = small_config(vocab_size=500, pattern="AMMA", tie_embeddings=False,
                       attention={"n_heads": 4, "n_kv_heads": 2, "head_dim": 24, "rope_theta": 50000.0},
                       mamba={"d_state": 16, "headdim": 16, "chunk_size": 16, "n_groups": 2})
    return save_bundle(HybridLM(cfg), test_tokenizer_dir, tmp_path_factory.mktemp("padded"), meta={"step": 7})


@pytest.fixture(scope="session")
def qk_norm_bundle_dir(tmp_path_factory: pytest.TempPathFactory, test_tokenizer_dir: Path) -> Path:
    torch.manual_seed(2)
    cfg = small_config(attention={"n_heads": 4, "n_kv_heads": 2, "qk_norm": True})
    return save_bundle(HybridLM(cfg), test_tokenizer_dir, tmp_path_factory.mktemp("qknorm"))


@pytest.fixture(scope="session")
def eval_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A validation text every machine has: a standard-library module."""
    path = tmp_path_factory.mktemp("text") / "val.txt"
    path.write_text((Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text())
    return path


def _write_manifest(root: Path, tokens: np.ndarray) -> str:
    """A minimal manifest (docs/data_contract.md) whose validation split is two uint16 shards."""
    shard_dir = root / "tokens" / "validation" / "src"
    shard_dir.mkdir(parents=True)
    half = tokens.size // 2
    shards = []
    for i, part in enumerate((tokens[:half], tokens[half:])):
        path = shard_dir / f"{i:03d}_src.ds"
        part.astype("<u2").tofile(path)
        shards.append({"path": str(path.relative_to(root)), "tokens": int(part.size)})
    manifest = {"token_dtype": "uint16", "splits": {"validation": {"sources": [{"name": "src", "shards": shards}]}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root / "manifest.json")


@pytest.fixture(scope="session")
def write_manifest():
    return _write_manifest


@pytest.fixture(scope="session")
def val_manifest(tmp_path_factory: pytest.TempPathFactory, eval_text: Path, tiny_bundle_dir: Path) -> str:
    """A curation manifest whose validation split is the tokenized evaluation text."""
    from model.bundle import load_tokenizer

    ids = load_tokenizer(tiny_bundle_dir)(eval_text.read_text(), add_special_tokens=False)["input_ids"]
    return _write_manifest(tmp_path_factory.mktemp("curated"), np.asarray(ids, dtype=np.int64))


def load_script(name: str) -> ModuleType:
    """launch/<name>.py as a module (its main(argv) runs in-process)."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def export_cli() -> ModuleType:
    return load_script("export")


@pytest.fixture(scope="session")
def generate_cli() -> ModuleType:
    return load_script("generate")


def _run_script(name: str, *args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run launch/<name>.py in a fresh interpreter (as a user would)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(REPO / "launch" / f"{name}.py"), *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


@pytest.fixture(scope="session")
def run_script():
    return _run_script
