"""The new block types train under DeepSpeed: 2 CPU processes (gloo), ZeRO-2 in float32 and ZeRO-3 in
bf16, a tiny pattern holding a routed (`R`) and a gated memory (`G`) block; and one ZeRO-3 run of the
hybrid options of part 2 together (hierarchical `H` blocks, bridges, state compression). The runs learn,
log the blocks' statistics, and ZeRO-3's export holds every tensor of the model."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from model.config import ModelConfig
from model.hybrid import HybridLM

from .conftest import read_metrics, train_run

pytestmark = pytest.mark.slow  # launched runs / long exports: the full tier only (README, "Tests")

PATTERN = ["model.pattern=MRAGMG", "model.gated.slots=4", "model.routed.capacity=0.3", "train.max_steps=8",
           "train.save_every=8", "train.eval_every=8"]


@pytest.mark.parametrize("zero", [["train.ds_config=ds_configs/zero2.json"],
                                  ["train.ds_config=ds_configs/zero3.json", "train.precision=bf16"]],
                         ids=["zero2", "zero3"])
def test_routed_and_gated_blocks_train_under_zero(zero: list[str], corpus: Path, tmp_path: Path) -> None:
    out = train_run(2, corpus, tmp_path / "run", [*PATTERN, *zero])
    m = read_metrics(out)
    losses = [m[s]["loss"] for s in range(1, 9)]
    assert sum(losses[:3]) / 3 - sum(losses[-3:]) / 3 > 0.3, losses
    logged = {k for rec in m.values() for k in rec if k.startswith("blocks/")}
    assert {"blocks/layers.1.routed_fraction", "blocks/layers.3.gate_mean", "blocks/layers.5.gate_std"} <= logged
    exported = load_file(out / "final" / "model.safetensors")
    built = HybridLM(ModelConfig.model_validate_json((out / "final" / "config.json").read_text()))
    assert exported.keys() == built.state_dict().keys()


@pytest.mark.slow
def test_hierarchical_bridges_and_compression_train_under_zero3(corpus: Path, tmp_path: Path) -> None:
    """MHAHMA: bridges into both attention blocks and into the H block after the first (ZeRO-3 gathers each
    bridge's gate in its own forward), H spans of 16 tokens (4 per 64-token row), every Mamba2 state at half
    d_state."""
    sets = ["model.pattern=MHAHMA", "model.bridges=true", "model.mamba.state_compression=2",
            "model.hierarchical.span=16", "train.max_steps=8", "train.save_every=8", "train.eval_every=8",
            "train.ds_config=ds_configs/zero3.json", "train.precision=bf16"]
    out = train_run(2, corpus, tmp_path / "run", sets)
    m = read_metrics(out)
    losses = [m[s]["loss"] for s in range(1, 9)]
    assert sum(losses[:3]) / 3 - sum(losses[-3:]) / 3 > 0.3, losses
    exported = load_file(out / "final" / "model.safetensors")
    built = HybridLM(ModelConfig.model_validate_json((out / "final" / "config.json").read_text()))
    assert exported.keys() == built.state_dict().keys()
    assert {"bridges.links.2.gate", "layers.1.mixer.decay_logit", "layers.0.mixer.compress.basis"} <= exported.keys()
    assert exported["bridges.links.2.gate"].abs().sum() > 0  # the closed gates opened
