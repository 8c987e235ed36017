"""The training loop of the wrapper: AdamW over the added parameters only, the project's schedule.

One process, no DeepSpeed: the base is frozen and the added paths are small (adapt.layers Mamba2 mixers,
gates and memory banks), so optimizer state and gradients exist only for them and ZeRO sharding would
save nothing worth its setup. Settings come from the `train` section: seq_len, micro_batch_size (the
sequences of one step: there is no gradient accumulation), max_steps, lr, schedule, warmup_steps,
min_lr_ratio, decay_fraction, weight_decay, betas, eps, grad_clip, seed, log_every. The model runs in
float32 (launch/adapt.py loads the base so; train.precision is not read).
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from adapt.wrapper import AdaptedLM
from config.sections import TrainConfig
from train.errors import TrainingError
from train.optim import lr_multiplier, param_groups

log = logging.getLogger(__name__)


def train_added(model: AdaptedLM, sample: Callable[[int], torch.Tensor], cfg: TrainConfig) -> list[dict]:
    """Train `model.added` for cfg.max_steps steps on windows `sample(i)` (seq_len + 1,), i = 0, 1, ...
    Returns one {"step", "loss", "lr", "grad_norm"} record per step. The base's weights never change
    (they have no gradient and are not in the optimizer)."""
    torch.manual_seed(cfg.seed)
    device = model.embed.weight.device
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model.added, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  eps=cfg.eps)
    scheduler = LambdaLR(optimizer, lr_multiplier(cfg))
    params = list(model.added.parameters())
    records = []
    for step in range(1, cfg.max_steps + 1):
        first = (step - 1) * cfg.micro_batch_size
        batch = torch.stack([sample(first + j) for j in range(cfg.micro_batch_size)]).to(device)
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingError(f"step {step}: the loss is {value}: lower train.lr")
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        records.append({"step": step, "loss": value, "lr": lr, "grad_norm": float(norm)})
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            log.info("step %d/%d loss %.4f lr %.3g grad norm %.3g", step, cfg.max_steps, value, lr, float(norm))
    model.eval()
    return records
