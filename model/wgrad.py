"""Weight gradients added straight into float32 accumulators (Megatron-LM's gradient-accumulation
fusion), for the bias-free linear layers of the model.

With bf16 weights, a mixed-precision optimizer keeps one float32 gradient buffer per weight and folds
each micro-batch's bf16 gradient into it (DeepSpeed ZeRO-1's BF16_Optimizer with
`bf16.immediate_grad_update`, train/grad_fold.py): the backward writes a bf16 gradient (2 bytes per
parameter), the fold reads it and reads and writes the float32 sum (10 more). When a weight carries a
`main_grad` attribute (its float32 accumulator, bound by the trainer), `linear` instead computes the
weight gradient as one GEMM with a float32 output that adds into `main_grad` (cuBLAS's beta = 1), and
hands autograd no gradient for that weight: no bf16 gradient, no fold, and the products are summed in
float32 without the bf16 rounding of the unfused gradient. Whoever binds `main_grad` owns the rest:
zeroing the buffer after each optimizer step and noting that those weights have gradients
(train/grad_fold.py, fold `fused_wgrad`). A weight without `main_grad` takes plain `F.linear`:
evaluation, export and every optimizer but ZeRO-1's bf16 one see no change.

Its cost against the unfused backward and fold: see docs/performance.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


def accumulate_weight_grad(main_grad: torch.Tensor, grad_out: torch.Tensor, inp: torch.Tensor) -> None:
    """main_grad (o, i) float32 += grad_out (n, o)^T @ inp (n, i). On CUDA one GEMM whose float32
    output adds into `main_grad` (bf16 products, float32 accumulation); elsewhere (torch has no
    mixed-dtype matmul on CPU) the same sum from the inputs converted to float32."""
    if main_grad.is_cuda:
        torch.addmm(main_grad, grad_out.t(), inp, out_dtype=main_grad.dtype, out=main_grad)
    else:
        main_grad.addmm_(grad_out.t().to(main_grad.dtype), inp.to(main_grad.dtype))


class _LinearMainGradFn(torch.autograd.Function):
    """y = x @ cat(weights)^T; the backward adds each bound weight's gradient into its `main_grad`
    (and returns None for it), and returns the others' as autograd would."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        w = joined(weights)
        ctx.save_for_backward(x, w)
        ctx.rows = [wi.shape[0] for wi in weights]
        ctx.main_grads = [getattr(wi, "main_grad", None) for wi in weights]
        return F.linear(x, w)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        grad_x = grad_out @ w if ctx.needs_input_grad[0] else None
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        xs = x.reshape(-1, x.shape[-1])
        grads: list[torch.Tensor | None] = []
        start = 0
        for rows, main, needed in zip(ctx.rows, ctx.main_grads, ctx.needs_input_grad[1:]):
            dy_rows = dy[:, start:start + rows]
            start += rows
            grads.append(_into_main_grad(main, dy_rows, xs) if needed else None)
        return (grad_x, *grads)


def linear(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    """x (..., i) @ cat(weights, dim 0)^T -> (..., sum of the weights' rows), bias-free. Weights with a
    `main_grad` get their gradient added there (see the module docstring); without any, plain F.linear."""
    if not any(getattr(w, "main_grad", None) is not None for w in weights):
        return F.linear(x, joined(weights))
    return _LinearMainGradFn.apply(x, *weights)


def joined(weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The weights stacked along their output rows (one weight: itself, no copy)."""
    return weights[0] if len(weights) == 1 else torch.cat(weights)


def weight_grad(weight: torch.Tensor, grad_out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor | None:
    """For autograd functions that compute a linear layer's weight gradient themselves: grad_out (n, o),
    inp (n, i). Adds it into `weight.main_grad` and returns None when bound, else returns it (o, i)."""
    return _into_main_grad(getattr(weight, "main_grad", None), grad_out, inp)


def _into_main_grad(main_grad: torch.Tensor | None, grad_out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor | None:
    """grad_out^T @ inp added into `main_grad` (None returned), or returned when there is none."""
    if main_grad is None:
        return grad_out.t() @ inp
    accumulate_weight_grad(main_grad, grad_out, inp)
    return None


def is_plain_linear(module: nn.Module) -> bool:
    """Whether `module` is this module's `Linear` over a plain weight: what a fused kernel may read the weight
    of directly. Quantization and adapters swap in other module classes or tensor subclasses, which must run
    their own forward; CUDA-graph capture's stand-in leaves are plain tensors."""
    return type(module) is Linear and type(module.weight) in (nn.Parameter, torch.Tensor)


class Linear(nn.Linear):
    """nn.Linear (same parameters, state_dict keys and isinstance checks) whose bias-free forward goes
    through `linear`, so that a bound `main_grad` takes its weight gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            return F.linear(x, self.weight, self.bias)
        return linear(x, self.weight)
