"""AdamW parameter groups and the learning-rate schedules.

Weight decay (decoupled, AdamW) applies to the weight matrices of the blocks and, when untied, the
LM head. It does not apply to
  - norm weights and biases (1-D): decay would pull scales towards 0, not regularise;
  - the input embedding (also the head when tied): rows of rare tokens get few gradient updates, so
    decay shrinks them towards zero between updates (OLMo 2 drops embedding decay for stability);
  - Mamba2 A_log, D and dt_bias (marked `_no_weight_decay` by the model): they set the SSM's decay
    rates, skip gain and time steps, as in mamba_ssm's training recipe.

Schedules map the optimizer step t (0-based: the step being taken) to a multiplier of the peak lr:
  warm-up   (t + 1) / warmup_steps for t < warmup_steps (never 0, so step 0 trains)
  cosine    min + (1 - min) * (1 + cos(pi p)) / 2, p = progress after warm-up in [0, 1]
  wsd       1 until the last decay_fraction of the steps, then the (1 - sqrt) cool-down
            min + (1 - min) * (1 - sqrt(q)), q in [0, 1] (Hägele et al. 2024, "Scaling Laws and
            Compute-Optimal Training Beyond Fixed Training Durations": better than linear)
  constant  1 after warm-up
"""

from __future__ import annotations

import math
from typing import Callable

import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

from config.sections import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices and the rest (see the module doc). Tied weights once."""
    no_decay_ids = {id(model.embed.weight)} if hasattr(model, "embed") else set()
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():  # parameters() yields a tied tensor once
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        skip = param.ndim < 2 or getattr(param, "_no_weight_decay", False) or id(param) in no_decay_ids
        (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_multiplier(cfg: TrainConfig) -> Callable[[int], float]:
    """Step t -> multiplier of cfg.lr (a plain function: torch's LambdaLR does not pickle it, so a
    resumed run always follows the current config's schedule)."""
    warmup, total, floor = cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio
    decay_steps = max(1, round(cfg.decay_fraction * total))

    def multiplier(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "cosine":
            p = min(1.0, (t - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
        q = min(1.0, max(0.0, (t - (total - decay_steps)) / decay_steps))  # wsd
        return floor + (1 - floor) * (1 - math.sqrt(q))

    return multiplier


def follow_current_config(scheduler: LambdaLR, cfg: TrainConfig) -> None:
    """After a resume: keep the restored step count but take the peak lr and the schedule from the
    current config (a checkpoint restores the old peak and the old lr of the next step)."""
    scheduler.base_lrs = [cfg.lr] * len(scheduler.base_lrs)
    lr = cfg.lr * lr_multiplier(cfg)(scheduler.last_epoch)
    for group in scheduler.optimizer.param_groups:
        group["lr"] = lr
    scheduler._last_lr = [lr] * len(scheduler.base_lrs)
