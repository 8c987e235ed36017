"""The new block types train under DeepSpeed: 2 CPU processes (gloo), ZeRO-2 in float32 and ZeRO-3 in
bf16, a tiny pattern holding a routed (`R`) and a gated memory (`G`) block. The runs learn, log the
blocks' statistics, and ZeRO-3's export holds every tensor of the model."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from model.config import ModelConfig
from model.hybrid import HybridLM

from .conftest import read_metrics, train_run

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
