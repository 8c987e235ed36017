"""ZeRO-1's per-gradient fold into float32: without a float32 copy of each gradient, or, for the linear
layers' weights, with no bf16 gradient at all.

With bf16 and `bf16.immediate_grad_update` (ds_configs/zero1.json), DeepSpeed's BF16_Optimizer folds
each parameter's bf16 gradient into its float32 accumulation buffer in the gradient hook, as
`hp_grad.add_(lp.grad.to(float32))`: the `.to` writes a float32 copy of every gradient and the add
reads it back, 18 bytes of memory traffic per parameter and micro-batch where the add alone needs 10
(float32 read + write, bf16 read).

Two replacements, chosen by `install_fold`:
  copy_free    `hp_grad.add_(lp.grad)` promotes inside the one kernel; bf16 -> float32 is exact, so
               the sums are bitwise DeepSpeed's (tests/train/test_grad_fold.py).
  fused_wgrad  copy_free, and every parameter's float32 buffer bound as its `main_grad`: the model's
               linear layers (model/wgrad.py) add their weight gradients there in the GEMM itself
               (Megatron-LM's gradient-accumulation fusion), so those weights have neither a bf16
               gradient nor a fold; the rest (embedding, norms, conv, SSM scalars) fold as copy_free.
               The sums now skip the bf16 rounding of each weight gradient: close to DeepSpeed's, not
               bitwise.
The time each saves per micro-batch: see docs/performance.md.
This replaces the hook's method (and, for fused_wgrad, `clear_hp_grads`) on the one optimizer
instance, and only where DeepSpeed's own body does nothing else (no AutoEP folding group); it checks
the DeepSpeed version it was written against and leaves other versions alone.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch

log = logging.getLogger(__name__)

WRITTEN_FOR = "0.19."  # deepspeed versions whose BF16_Optimizer this mirrors
FOLDS = ("deepspeed", "copy_free", "fused_wgrad")
DEFAULT_FOLD = "fused_wgrad"  # train.grad_fold's default (config/sections.py), the benches' too


def install_fold(engine: Any, fold: str) -> str:
    """Install `fold` (one of FOLDS) on `engine`'s BF16_Optimizer when it folds in the hooks. Returns the
    fold in use: "deepspeed" for another optimizer, no immediate_grad_update or an unknown DeepSpeed."""
    if fold not in FOLDS:
        raise ValueError(f"gradient fold {fold!r}: choose one of {', '.join(FOLDS)}")
    opt = _hook_folding_optimizer(engine) if fold != "deepspeed" else None
    if opt is None:
        return "deepspeed"
    _fold_without_copy(opt)
    if fold == "fused_wgrad":
        _bind_main_grads(opt)
    return fold


def _hook_folding_optimizer(engine: Any) -> Any:
    """The engine's BF16_Optimizer if it folds in the gradient hooks and is a DeepSpeed this mirrors."""
    import deepspeed
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    opt = getattr(engine, "optimizer", None)
    if not isinstance(opt, BF16_Optimizer) or not opt.immediate_grad_update or opt.autoep_folding_tp_group is not None:
        return None
    if not deepspeed.__version__.startswith(WRITTEN_FOR):
        log.info("deepspeed %s: keeping BF16_Optimizer's own gradient fold (written for %sx)",
                 deepspeed.__version__, WRITTEN_FOR)
        return None
    return opt


def _fold_without_copy(opt: Any) -> None:
    """Replace the hook's fold on `opt` by the copy-free add."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    deepspeed_fold = opt.accumulate_hp_grads_and_remove_lp

    def fold(self: BF16_Optimizer, lp: torch.nn.Parameter, group_idx: int, param_idx: int) -> None:
        if lp.grad is None or self.autoep_folding_tp_group is not None:
            deepspeed_fold(lp, group_idx, param_idx)
            return
        hp_grad = self.fp32_groups_gradients[group_idx][param_idx]
        with torch.no_grad():
            hp_grad.add_(lp.grad.view(hp_grad.shape))  # float32 += bf16, converted inside the add
        lp._hp_grad = hp_grad
        self.fp32_groups_has_gradients[group_idx][param_idx] = True
        lp.grad = None  # as DeepSpeed's: the float32 buffer now holds this gradient

    opt.accumulate_hp_grads_and_remove_lp = types.MethodType(fold, opt)


def _bind_main_grads(opt: Any) -> None:
    """Bind each parameter's float32 buffer as its `main_grad` (model/wgrad.py adds weight gradients
    there), and keep those parameters marked as having gradients: the linear weights' hooks never run
    (autograd hands them no gradient), and the gradient norm skips unmarked buffers. Marked after every
    `clear_hp_grads` (the optimizer step's reset); a buffer no backward touched holds zeros, which the
    norm and the update see as they would an unmarked one."""
    for i, group in enumerate(opt.bf16_groups):
        for j, lp in enumerate(group):
            hp_grad = opt.fp32_groups_gradients[i][j]
            lp.main_grad = hp_grad.view(lp.shape)
            lp._hp_grad = hp_grad
    deepspeed_clear = opt.clear_hp_grads

    def mark_all() -> None:
        for flags in opt.fp32_groups_has_gradients:
            flags[:] = [True] * len(flags)

    def clear_and_mark(self: Any) -> None:
        deepspeed_clear()
        mark_all()

    opt.clear_hp_grads = types.MethodType(clear_and_mark, opt)
    mark_all()
