"""bench/hf_compare.py on CPU against randomly initialised HF Granite, Bamba and Llama folders built from
config (tiny sizes, nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import hf_compare, peers
from model import ModelConfig, count_params


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from transformers import GraniteConfig, GraniteForCausalLM

    root = tmp_path_factory.mktemp("hf")
    tiny = ModelConfig(preset="tiny")
    granite = GraniteForCausalLM(GraniteConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, **peers.HF_SPECIAL_IDS))
    models = {"granite": granite, "bamba": peers.hf_bamba(tiny, torch.device("cpu"), torch.float32),
              "llama": peers.hf_llama(tiny, torch.device("cpu"), torch.float32)}
    folders = []
    for name, model in models.items():
        model.save_pretrained(root / name)
        folders.append(root / name)
    return folders


def test_compare_writes_one_row_per_model(hf_folders: list[Path], tmp_path: Path) -> None:
    argv = ["--hf", ",".join(map(str, hf_folders)), "--preset", "tiny", "--variants", "strategic,all_attention",
            "--match-hf", "--seq-len", "32", "--batch", "2", "--warmup", "0", "--iters", "2", "--device", "cpu",
            "--out", str(tmp_path)]
    assert hf_compare.main(argv) == 0
    rows = json.loads((tmp_path / "hf_compare.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["hf:granite", "hf:bamba", "hf:llama", "ours:strategic", "ours:all_attention"]
    assert all(r["status"] == "ok" and r["forward_ms"] > 0 and r["forward_ms_std"] is not None for r in rows), rows
    granite = rows[0]["params"]
    assert granite == sum(p.numel() for p in hf_compare.load_hf(hf_folders[0], torch.device("cpu"),
                                                                 torch.float32).parameters())
    assert rows[1]["params"] == count_params(ModelConfig(preset="tiny"))  # Bamba of the same architecture
    for r in rows[3:]:
        assert abs(r["params"] / granite - 1) <= 0.03  # --match-hf
    assert rows[0]["speed_vs_hf"] == 1.0
    for r in rows:
        assert r["tokens_per_s"] == pytest.approx(64 / (r["forward_ms"] / 1e3), rel=1e-9)
    assert (tmp_path / "hf_compare.md").read_text().count("| ok |") == 5


def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert hf_compare.main(["--hf", str(tmp_path), "--device", "cpu"]) == 2
    assert "is not a HF model folder" in capsys.readouterr().err
