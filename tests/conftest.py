"""Shared fixtures. Add fixtures here only when several test areas need them."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from model import HybridLM, ModelConfig
from model.bundle import save_bundle


def stdlib_texts(limit: int = 200) -> list[str]:
    """Real text already on every machine: Python standard-library sources (sorted, deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size < 60_000)[:limit]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def train_test_tokenizer(out_dir: Path, vocab_size: int = 512) -> Path:
    """Small byte-level BPE (tokenizer.json) with <pad>=0 <s>=1 </s>=2 <unk>=3, trained on stdlib text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_texts(60), trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    return out_dir


@pytest.fixture(scope="session")
def test_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_test_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory: pytest.TempPathFactory, test_tokenizer_dir: Path) -> Path:
    """A consolidated checkpoint of a small random hybrid (both block types) + tokenizer."""
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", vocab_size=512, d_model=64, n_layers=4, pattern="MAMA", ffn_hidden=128,
                      attention={"n_heads": 4, "n_kv_heads": 2},
                      mamba={"d_state": 16, "headdim": 16, "chunk_size": 16})
    model = HybridLM(cfg)
    return save_bundle(model, test_tokenizer_dir, tmp_path_factory.mktemp("bundle"), meta={"step": 0})
