"""The DeepSpeed config of a run: a JSON from ds_configs/ completed from the run config.

The JSON holds what the run config does not (ZeRO stage, offload, bucket sizes, the bf16 overflow
check, fp32 gradient accumulation). Batch sizes, accumulation, clipping, precision and the optimizer
come from `train.*` and are filled in here; a JSON that sets one of them is an error, so no number
lives in two places. The optimizer is AdamW built by DeepSpeed: FusedAdam on GPU, DeepSpeedCPUAdam
with optimizer offload, torch.optim.AdamW on a CPU-only machine (`torch_adam`; no op to compile).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from config.base import deep_merge
from config.loader import ConfigError
from config.sections import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
# DeepSpeed keys that the run config owns -> the train.* field they come from
OWNED_KEYS = {
    "train_batch_size": "train.global_batch_tokens",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_tokens",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "train.lr/betas/eps/weight_decay",
    "scheduler": "train.schedule",
    "fp16": "train.precision",
}
ZERO_STAGES = (1, 2, 3)  # the ZeRO optimizers detect non-finite gradients and skip the step (train.on_nan)


def resolve_ds_config_path(name: str) -> Path:
    """A path as given (absolute or from the working directory), else relative to the repo root."""
    path = Path(name)
    if path.is_file():
        return path
    if not path.is_absolute() and (REPO_ROOT / path).is_file():
        return REPO_ROOT / path
    known = ", ".join(sorted(p.name for p in (REPO_ROOT / "ds_configs").glob("*.json")))
    raise ConfigError(f"train.ds_config: {name} does not exist (one of ds_configs/: {known})")


def read_ds_json(name: str) -> dict[str, Any]:
    """The JSON of `train.ds_config`, checked for keys the run config owns."""
    path = resolve_ds_config_path(name)
    try:
        base = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"train.ds_config: {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    for key, field in OWNED_KEYS.items():
        if key in base:
            raise ConfigError(f"train.ds_config: {path} sets '{key}', which comes from {field}: remove it from the JSON")
    if "enabled" in base.get("bf16", {}):
        raise ConfigError(f"train.ds_config: {path} sets 'bf16.enabled', which comes from train.precision: remove it")
    stage = base.get("zero_optimization", {}).get("stage")
    if stage not in ZERO_STAGES:
        raise ConfigError(f"train.ds_config: {path} must set zero_optimization.stage to 1, 2 or 3 (got {stage})")
    return base


def accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches per rank per optimizer step (ConfigError unless it divides evenly)."""
    per_step = cfg.global_batch_sequences
    per_pass = cfg.micro_batch_size * world_size
    if per_step % per_pass:
        raise ConfigError(
            f"train.global_batch_tokens ({cfg.global_batch_tokens} = {per_step} sequences of {cfg.seq_len}) must be "
            f"a multiple of micro_batch_size x world size ({cfg.micro_batch_size} x {world_size}): "
            "change train.global_batch_tokens or train.micro_batch_size"
        )
    return per_step // per_pass


def build_ds_config(cfg: TrainConfig, world_size: int, on_cuda: bool, load_universal: bool = False) -> dict[str, Any]:
    """The complete DeepSpeed config dict for `deepspeed.initialize`."""
    base = read_ds_json(cfg.ds_config)
    params: dict[str, Any] = {"lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if not on_cuda:
        params["torch_adam"] = True
    owned = {
        "train_batch_size": cfg.global_batch_sequences,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(cfg, world_size),
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {"type": "AdamW", "params": params},
        "bf16": {"enabled": cfg.precision in ("bf16", "fp8")},  # fp8: bf16 weights (train/fp8.py)
        "checkpoint": {"load_universal": load_universal},
    }
    return deep_merge(base, owned)


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config["zero_optimization"]["stage"])
