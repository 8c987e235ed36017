"""Closed-form parameter/FLOP counts against instantiated models and a hand computation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import HybridLM, ModelConfig, count_params, train_flops_per_token
from model.__main__ import OPTIONS
from model.mixers import block_types
from model.mlps import mlp_kinds
from model.presets import PRESETS
from model.sizing import forward_flops_per_token
from model.variants import VARIANTS

REPO = Path(__file__).resolve().parents[2]


def _built(cfg: ModelConfig) -> HybridLM:
    with torch.device("meta"):  # no memory: the 13B preset builds in well under a second
        return HybridLM(cfg)


@pytest.mark.parametrize("name", list(PRESETS))
def test_count_params_equals_instantiated(name: str) -> None:
    cfg = ModelConfig(preset=name)
    model = _built(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert count_params(cfg) == total
    head = 0 if cfg.tie_embeddings else model.lm_head.weight.numel()
    assert count_params(cfg, include_embedding=False) == total - model.embed.weight.numel() - head
    assert (model.lm_head is None) == cfg.tie_embeddings


@pytest.mark.parametrize("over", [
    {"attention": {"n_heads": 4, "n_kv_heads": 1, "qk_norm": True, "head_dim": 16}},
    {"mamba": {"conv_bias": False, "n_groups": 2}, "tie_embeddings": False, "vocab_size": 1000},
])
def test_count_params_variants(over: dict, tiny_config) -> None:
    """Options the presets do not exercise: QK-norm, explicit head_dim, no conv bias, groups, padding."""
    cfg = tiny_config(**over)
    assert count_params(cfg) == sum(p.numel() for p in _built(cfg).parameters())


def test_model_list_json_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "model", "list", "--json"], cwd=REPO, capture_output=True, text=True, check=True,
        timeout=120,
    )
    listing = json.loads(out.stdout)
    assert [k["letter"] for k in listing["block_types"]] == list(block_types())
    assert [m["name"] for m in listing["mlp_kinds"]] == list(mlp_kinds())
    assert [o["key"] for o in listing["options"]] == list(OPTIONS)
    assert all(o["description"] for o in listing["options"])
    rows = listing["presets"]
    assert [r["preset"] for r in rows] == list(PRESETS)
    assert [v["variant"] for v in listing["variants"]] == list(VARIANTS)
    for row in rows:
        cfg = ModelConfig(preset=row["preset"])
        assert row["params"] == count_params(cfg)
        assert row["non_embedding_params"] == count_params(cfg, include_embedding=False)
        assert row["pattern"] == cfg.layer_pattern
        assert (row["layers"], row["d_model"]) == (cfg.n_layers, cfg.d_model)


def test_model_list_table(capsys) -> None:
    from model.__main__ import main

    main(["list"])
    presets, kinds, mlps, options, variants = capsys.readouterr().out.strip().split("\n\n")
    lines = presets.splitlines()
    assert lines[0].split()[0] == "preset" and len(lines) == 1 + len(PRESETS)
    assert [k.split()[0] for k in kinds.splitlines()[1:]] == list(block_types())
    assert [m.split()[0] for m in mlps.splitlines()[1:]] == list(mlp_kinds())
    assert [o.split()[0] for o in options.splitlines()[1:]] == list(OPTIONS)
    assert variants.splitlines()[0].split()[0] == "variant"
    assert lines[1].split()[0] == "tiny" and lines[1].split()[-1] == ModelConfig(preset="tiny").layer_pattern
    assert [line.split()[0] for line in variants.splitlines()[1:]] == list(VARIANTS)


def test_published_sizes() -> None:
    """The presets land near the sizes the preset docstring promises (within 1%)."""
    promised = {"1.3b": 1.445e9, "2.7b": 2.587e9, "6.7b": 5.952e9, "13b": 10.593e9}
    for name, n in promised.items():
        assert abs(count_params(ModelConfig(preset=name)) / n - 1) < 0.01, name


def test_train_flops_tiny_by_hand() -> None:
    """tiny: d 256, layers MAMMAM (4 M, 2 A), vocab 8192, ffn 512, 4 heads x 64 (2 kv), Mamba2
    d_inner 512, 16 heads x 32 channels, 1 group, d_state 32, conv 4 over 512 + 2*32 = 576 channels,
    chunk 64; sequence 256. Every number below is written out from those dimensions."""
    cfg = ModelConfig(preset="tiny")
    assert cfg.layer_pattern == "MAMMAM"
    s = 256
    mlp = 3 * 256 * 512
    mamba_mm = 256 * (2 * 512 + 2 * 32 + 16) + 512 * 256 + mlp  # in_proj [z,x,B,C,dt] + out_proj + MLP
    attn_mm = 256 * 256 + 256 * 128 + 256 * 128 + 256 * 256 + mlp  # q, k, v, o + MLP
    head = 8192 * 256  # tied, but the head matmul still runs
    matmul = 2 * (4 * mamba_mm + 2 * attn_mm + head)
    attention = 2 * (2 * 2 * 4 * 64 * (s + 1) / 2)  # 2 layers: QK^T and PV, causal average key count
    q_eff = (64 + 1) / 2
    ssd = 4 * (2 * q_eff * (1 * 32 + 16 * 32) + 2 * 2 * 16 * 32 * 32 + 2 * 4 * 576)
    assert train_flops_per_token(cfg, s) == pytest.approx(3 * (matmul + attention + ssd), rel=1e-12)

    # The matmul term is 2 x (every Linear weight of the instantiated blocks + the head).
    model = _built(cfg)
    linear = sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert forward_flops_per_token(cfg, s)["matmul"] == 2 * (linear + model.head_weight.numel())


def test_flops_grow_with_context_only_in_attention() -> None:
    cfg = ModelConfig(preset="tiny")
    short, long = forward_flops_per_token(cfg, 256), forward_flops_per_token(cfg, 1024)
    assert short["matmul"] == long["matmul"] and short["ssd"] == long["ssd"]  # chunk 64 < both lengths
    assert long["attention"] == pytest.approx(short["attention"] * 1025 / 257)
