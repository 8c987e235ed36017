"""A float8 linear layer that casts each tensor once (train.fp8.casts=once), for the tensorwise recipe.

torchao's Float8Linear (train/fp8.py's default) keeps the bf16 input for the backward and casts per GEMM
operand: the input is reduced (absolute max) and cast again in the backward for the weight gradient, and
the output gradient is cast once per GEMM that reads it. Here each tensor gets one absolute max and one
cast function that writes every layout its GEMMs need (compiled, so that inductor can write both layouts
from one read; how many kernels it makes is what `bench/run.sh fp8:profile_once` shows):

  forward   x (n, i) -> x8 (n, i) and x8^T (i, n), one scale; w (o, i) -> w8, one scale;
            y = x8 @ w8^T (float8 GEMM, bf16 out); kept for the backward: x8^T (1 byte per element where
            torchao keeps the 2-byte bf16 input), the bf16 weight and its scale
  backward  dy (n, o) -> dy8 (n, o) and dy8^T (o, n), one scale (e5m2, as torchao's recipe);
            w8^T (i, o) cast again with the forward's scale (the same bytes as w8, transposed);
            dx = dy8 @ w8 and dW = dy8^T @ x8, both float8 GEMMs; dW adds into the weight's bound
            `main_grad` (float32 output, train.grad_fold=fused_wgrad) or returns bf16 as torchao does.

The numbers are torchao's: the same scale (float8 max / absolute max, computed in float64, floored at
torchao's EPS), the same saturating cast, fast accumulation in the forward GEMM only
(torchao's Float8LinearConfig defaults); tests/train/test_fp8_linear.py checks the casts bitwise against
torchao's and the GEMMs against float64 products of the same float8 operands.

torch._scaled_mm wants its first operand row-major and its second column-major; every call below passes
a contiguous tensor and a transposed contiguous one.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

E4M3 = torch.float8_e4m3fn  # inputs and weights
E5M2 = torch.float8_e5m2  # output gradients: a wider range, as torchao's tensorwise recipe
EPS = 1e-12  # torchao's floor on the absolute max (float8_utils.EPS): a zero tensor keeps a finite scale


def scale_of(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 scalar: dtype's largest finite value / max |t| (float64 arithmetic, as torchao's
    amax_to_scale, so that compiled and eager casts agree)."""
    amax = t.abs().max().to(torch.float64)
    return (torch.finfo(dtype).max / torch.clamp(amax, min=EPS)).to(torch.float32)


def quantize(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t * scale in float32, saturated to dtype's range, cast to dtype (torchao's to_fp8_saturated)."""
    top = torch.finfo(dtype).max
    return (t.to(torch.float32) * scale).clamp(-top, top).to(dtype)


def cast(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(t in float8, its scale)."""
    scale = scale_of(t, dtype)
    return quantize(t, scale, dtype), scale


def cast_both(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """t (a, b) -> (float8 (a, b), float8 (b, a) contiguous, scale): one reduction for both layouts."""
    scale = scale_of(t, dtype)
    return quantize(t, scale, dtype), quantize(t.t(), scale, dtype).contiguous(), scale


def cast_transposed(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t (a, b) -> float8 (b, a) contiguous with a given scale."""
    return quantize(t.t(), scale, dtype).contiguous()


class Casts:
    """The cast functions, compiled (CUDA: inductor fuses each one's elementwise work) or eager (CPU tests:
    torch.compile's CPU backend needs a C++ compiler)."""

    def __init__(self, compile: bool) -> None:
        self.compiled = compile
        wrap: Callable[[Callable], Callable] = (lambda f: torch.compile(f, dynamic=False)) if compile else (lambda f: f)
        self.one, self.both, self.transposed = wrap(cast), wrap(cast_both), wrap(cast_transposed)


def scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b_t: torch.Tensor, b_scale: torch.Tensor,
              out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """a (m, k) row-major float8 @ b (k, n), given as b_t (n, k) contiguous: (a / a_scale) @ (b / b_scale)."""
    return torch._scaled_mm(a, b_t.t(), scale_a=a_scale.reciprocal(), scale_b=b_scale.reciprocal(),
                            out_dtype=out_dtype, use_fast_accum=fast_accum)


class _Float8LinearFn(torch.autograd.Function):
    """y = x @ w^T with every GEMM in float8 (module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, casts: Casts) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        x8, x8_t, x_scale = casts.both(x2, E4M3)
        w8, w_scale = casts.one(weight, E4M3)
        y = scaled_mm(x8, x_scale, w8, w_scale, x.dtype, fast_accum=True)
        ctx.save_for_backward(x8_t, x_scale, weight, w_scale)
        ctx.casts, ctx.x_shape = casts, x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x8_t, x_scale, weight, w_scale = ctx.saved_tensors
        casts: Casts = ctx.casts
        dy8, dy8_t, dy_scale = casts.both(dy.reshape(-1, dy.shape[-1]), E5M2)
        dx = None
        if ctx.needs_input_grad[0]:
            w8_t = casts.transposed(weight, w_scale, E4M3)  # (i, o): dx = dy8 @ w8 takes w8 column-major
            dx = scaled_mm(dy8, dy_scale, w8_t, w_scale, dy.dtype).reshape(ctx.x_shape)
        dw = None
        if ctx.needs_input_grad[1]:
            main_grad = getattr(weight, "main_grad", None)
            if main_grad is None:
                dw = scaled_mm(dy8_t, dy_scale, x8_t, x_scale, weight.dtype)
            else:  # model/wgrad.py's contract: the gradient goes into the float32 buffer, autograd gets none
                main_grad.add_(scaled_mm(dy8_t, dy_scale, x8_t, x_scale, main_grad.dtype))
        return dx, dw, None


class Float8CastOnceLinear(nn.Linear):
    """A bias-free nn.Linear (the same weight Parameter, state_dict keys and dtype) whose forward and
    backward GEMMs run in float8, each tensor cast once. x: (..., in) -> (..., out)."""

    casts: Casts

    @classmethod
    def swap(cls, linear: nn.Linear, casts: Casts) -> "Float8CastOnceLinear":
        """A float8 layer holding `linear`'s own weight Parameter (no copy)."""
        if linear.bias is not None:
            raise ValueError("Float8CastOnceLinear takes bias-free linear layers (the model's have no bias)")
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=False)
        new.weight = linear.weight
        new.casts = casts
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Float8LinearFn.apply(x, self.weight, self.casts)
