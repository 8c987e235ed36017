"""Optimizer parameter groups, learning-rate schedules and the DeepSpeed config builder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from config.loader import ConfigError
from config.sections import TrainConfig
from model.config import ModelConfig
from model.hybrid import HybridLM
from train.ds_config import build_ds_config, zero_stage
from train.optim import follow_current_config, lr_multiplier, param_groups


def test_parameter_groups_skip_norms_embedding_and_ssm_parameters() -> None:
    model = HybridLM(ModelConfig(preset="tiny", vocab_size=512))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "embed.weight" in skipped and "layers.0.mixer.A_log" in skipped and "layers.0.mixer.dt_bias" in skipped
    assert "layers.0.mixer.D" in skipped and "final_norm.weight" in skipped and "layers.0.mixer.conv1d.bias" in skipped
    assert "layers.0.mixer.in_proj.weight" in decayed and "layers.1.mixer.q_proj.weight" in decayed
    assert len(skipped) + len(decayed) == len(list(model.parameters()))


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_lr_schedules(schedule: str) -> None:
    cfg = TrainConfig(max_steps=100, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1, decay_fraction=0.2,
                      seq_len=8, micro_batch_size=1, global_batch_tokens=8)
    f = lr_multiplier(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    if schedule == "cosine":
        assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)
    elif schedule == "wsd":
        assert f(79) == pytest.approx(1.0) and f(80) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
        assert f(85) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.25)))
    else:
        assert f(99) == 1.0


def test_ds_config_is_completed_from_the_run_config(tmp_path: Path) -> None:
    cfg = TrainConfig(seq_len=64, micro_batch_size=2, global_batch_tokens=1024, grad_clip=0.5, precision="bf16",
                      ds_config="ds_configs/zero3.json")
    ds = build_ds_config(cfg, world_size=2, on_cuda=False)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 2, 4)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 3
    assert ds["optimizer"]["params"]["torch_adam"] and "torch_adam" not in build_ds_config(cfg, 2, True)["optimizer"]["params"]
    with pytest.raises(ConfigError, match="must be a multiple of micro_batch_size x world size"):
        build_ds_config(cfg, world_size=3, on_cuda=False)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}))
    with pytest.raises(ConfigError, match="comes from train.grad_clip"):
        build_ds_config(cfg.model_copy(update={"ds_config": str(bad)}), 2, False)


def test_a_resumed_scheduler_follows_the_current_config() -> None:
    """As on resume: a fresh scheduler of the new config, loaded from the old run's state."""
    old = TrainConfig(max_steps=10, warmup_steps=2, lr=1e-3, seq_len=8, micro_batch_size=1, global_batch_tokens=8)
    new = old.model_copy(update={"max_steps": 20, "lr": 2e-3})
    runs = []
    for cfg in (old, new):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.lr)
        runs.append((opt, LambdaLR(opt, lr_multiplier(cfg))))
    for _ in range(6):
        runs[0][0].step()
        runs[0][1].step()
    opt, sched = runs[1]
    opt.load_state_dict(runs[0][0].state_dict())
    sched.load_state_dict(runs[0][1].state_dict())
    follow_current_config(sched, new)
    for t in (6, 7):
        assert sched.last_epoch == t and opt.param_groups[0]["lr"] == pytest.approx(2e-3 * lr_multiplier(new)(t))
        opt.step()
        sched.step()


@pytest.mark.parametrize("ds_json, precision, refused", [
    ("ds_configs/zero2.json", "bf16", None),
    ("ds_configs/zero1.json", "bf16", None),
    ("ds_configs/zero1.json", "fp32", "bf16.immediate_grad_update"),
    ("ds_configs/zero3.json", "bf16", "ZeRO-3"),
])
def test_cuda_graph_accepts_the_zero_settings_whose_gradients_were_checked(ds_json: str, precision: str,
                                                                           refused: str | None) -> None:
    """train.cuda_graph: ZeRO-2, and ZeRO-1 only with bf16 + immediate_grad_update (what
    bench/grad_norm_check.py found right); anything else is a one-line config error naming the key."""
    from train.graph_step import check_graphable

    ds = build_ds_config(TrainConfig(ds_config=ds_json, precision=precision), world_size=1, on_cuda=True)
    model = HybridLM(ModelConfig(preset="tiny"))
    if refused is None:
        check_graphable(model, True, False, ds)
    else:
        with pytest.raises(ConfigError, match=refused.replace(".", r"\.")):
            check_graphable(model, True, False, ds)
    without = ds | {"bf16": {"enabled": True, "check_grad_overflow": True}}  # the flag removed from a ZeRO-1 JSON
    if zero_stage(ds) == 1:
        with pytest.raises(ConfigError, match="immediate_grad_update"):
            check_graphable(model, True, False, without)
    routed = HybridLM(ModelConfig(preset="tiny", pattern="MRMAMM"))  # data-dependent shapes: never graphed
    with pytest.raises(ConfigError, match="routed .*train.cuda_graph=false"):
        check_graphable(routed, True, False, ds)
