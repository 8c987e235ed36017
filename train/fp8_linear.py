"""A float8 linear layer that casts each tensor once (train.fp8.casts=once), for the tensorwise recipe.

torchao's Float8Linear (train/fp8.py's default) keeps the bf16 input for the backward and casts per GEMM
operand: the input is reduced (absolute max) and cast again in the backward for the weight gradient, the
output gradient is cast once per GEMM that reads it, and SwiGLU's gate and up are two layers, each casting
the same input. Here each tensor gets one absolute max and one cast function that writes every layout its
GEMMs need (compiled, so that inductor can write both layouts from one read; how many kernels it makes is
what `bench/run.sh fp8:profile_once` shows):

  forward   x (n, i) -> x8 (n, i) and x8^T (i, n), one scale; w (o, i) -> w8, one scale;
            y = x8 @ w8^T (float8 GEMM, bf16 out); kept for the backward: x8^T (1 byte per element where
            torchao keeps the 2-byte bf16 input), the bf16 weight and its scale
  backward  dy (n, o) -> dy8 (n, o) and dy8^T (o, n), one scale (e5m2, as torchao's recipe);
            w8^T (i, o) cast again with the forward's scale (the same bytes as w8, transposed);
            dx = dy8 @ w8 and dW = dy8^T @ x8, both float8 GEMMs; dW adds into the weight's bound
            `main_grad` (float32 output, train.grad_fold=fused_wgrad) or returns bf16 as torchao does.

Layers that read the same input (SwiGLU's gate and up) run as one layer over their weights joined along the
output rows (`Float8CastOnceLinear.joined`, which model/layers.py's SwiGLU calls): one cast of x, one GEMM
each way, the input gradient summed inside the GEMM. The joined weights share one scale (torchao gives each
its own): a value keeps e4m3's relative precision while it stays above e4m3's smallest normal number, 1/28672
of the joined absolute maximum, so the weight with the smaller maximum reaches that floor sooner (by the
ratio of the two maxima, about 1 for gate and up).

train.fp8.weight_casts=step (`StepWeights`): each weight is cast into both layouts once per optimizer step,
into buffers at fixed addresses (CUDA graphs replay their reads), instead of at every micro-batch's forward
and backward; 2 bytes per converted parameter of GPU memory.

The numbers are torchao's: the same scale (float8 max / absolute max, computed in float64, floored at
torchao's EPS), the same saturating cast, fast accumulation in the forward GEMM only
(torchao's Float8LinearConfig defaults); tests/train/test_fp8_linear.py checks the casts bitwise against
torchao's and the GEMMs against float64 products of the same float8 operands.

torch._scaled_mm wants its first operand row-major and its second column-major; every call below passes
a contiguous tensor and a transposed contiguous one. It cannot add into its output (cuBLAS's beta = 1, which
model/wgrad.py's bf16 GEMM uses), so a bound `main_grad` gets the weight gradient as a float32 temporary plus
an add.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from model.wgrad import joined

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


def cast_weight(*weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The joined weights (o, i) in e4m3 and their one scale."""
    return cast(joined(weights), E4M3)


def cast_weight_transposed(scale: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    """The joined weights as e4m3 (i, o) contiguous, with a given scale (the forward's)."""
    return quantize(joined(weights).t(), scale, E4M3).contiguous()


def cast_weight_both(*weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The joined weights in e4m3, (o, i) and (i, o) contiguous, and their scale."""
    return cast_both(joined(weights), E4M3)


class Casts:
    """The cast functions, compiled (inductor fuses each one's elementwise work; its results are the eager
    ones', tests/train/test_fp8_linear.py) or eager (emulated runs: convert_to_fp8(emulate=True))."""

    def __init__(self, compile: bool) -> None:
        self.compiled = compile
        wrap: Callable[[Callable], Callable] = (lambda f: torch.compile(f, dynamic=False)) if compile else (lambda f: f)
        self.both = wrap(cast_both)
        self.weight, self.weight_transposed, self.weight_both = (
            wrap(cast_weight), wrap(cast_weight_transposed), wrap(cast_weight_both))


@dataclass
class Float8Weight:
    """A layer's weight (or joined weights) in e4m3: data (o, i), data_t (i, o) contiguous, one float32 scale."""

    data: torch.Tensor
    data_t: torch.Tensor
    scale: torch.Tensor


class StepWeights:
    """train.fp8.weight_casts=step: the float8 layers' weights cast once per optimizer step, both layouts.

    The trainer opens `step()` around each optimizer step's micro-batches: it recasts every weight seen so
    far into its buffers (in place: CUDA graphs captured inside read those addresses), and the layers read
    the buffers until it closes, after the step's optimizer update has changed the weights. Outside it
    (evaluation, checkpoint export, a caller that never opens it) the layers cast their weights per call, so
    a stale copy is never read. A layer's buffers are made at its first forward inside a step (the first
    step's eager forward or a CUDA graph's warm-up, both before any capture)."""

    def __init__(self, casts: Casts) -> None:
        self.casts = casts
        self.entries: dict[tuple[int, ...], tuple[tuple[nn.Module, ...], Float8Weight]] = {}
        self.open = False

    @contextmanager
    def step(self) -> Iterator[None]:
        for layers, weight in self.entries.values():
            fresh = self._cast(layers)
            weight.data.copy_(fresh.data)
            weight.data_t.copy_(fresh.data_t)
            weight.scale.copy_(fresh.scale)
        self.open = True
        try:
            yield
        finally:
            self.open = False

    def get(self, layers: tuple[nn.Module, ...]) -> Float8Weight | None:
        """The layers' joined weight in float8, or None outside a step."""
        if not self.open:
            return None
        key = tuple(id(layer) for layer in layers)
        if key not in self.entries:
            self.entries[key] = (layers, self._cast(layers))
        return self.entries[key][1]

    @torch.no_grad()
    def _cast(self, layers: tuple[nn.Module, ...]) -> Float8Weight:
        """The layers' current weights, joined, cast into both layouts."""
        return Float8Weight(*self.casts.weight_both(*(layer.weight for layer in layers)))

    def bytes(self) -> int:
        """GPU bytes of the float8 copies made so far."""
        return sum(w.data.numel() + w.data_t.numel() for _, w in self.entries.values())


def scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b_t: torch.Tensor, b_scale: torch.Tensor,
              out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """a (m, k) row-major float8 @ b (k, n), given as b_t (n, k) contiguous: (a / a_scale) @ (b / b_scale)."""
    return torch._scaled_mm(a, b_t.t(), scale_a=a_scale.reciprocal(), scale_b=b_scale.reciprocal(),
                            out_dtype=out_dtype, use_fast_accum=fast_accum)


def weight_grads(weights: Sequence[torch.Tensor], needed: Sequence[bool], dy8_t: torch.Tensor,
                 dy_scale: torch.Tensor, x8_t: torch.Tensor, x_scale: torch.Tensor) -> list[torch.Tensor | None]:
    """Each weight's rows of dW = dy^T @ x (one float8 GEMM for all the joined weights): added into its bound
    `main_grad` (model/wgrad.py's contract: autograd gets None), else returned in the weight's dtype."""
    if not any(needed):
        return [None] * len(weights)
    bound = [getattr(w, "main_grad", None) for w in weights]
    out_dtype = torch.float32 if any(m is not None for m in bound) else weights[0].dtype
    dw = scaled_mm(dy8_t, dy_scale, x8_t, x_scale, out_dtype)
    grads: list[torch.Tensor | None] = []
    start = 0
    for w, main_grad, need in zip(weights, bound, needed):
        rows = dw[start:start + w.shape[0]]
        start += w.shape[0]
        if need and main_grad is not None:
            main_grad.add_(rows)
        grads.append(rows.to(w.dtype) if need and main_grad is None else None)
    return grads


class _Float8LinearFn(torch.autograd.Function):
    """y = x @ cat(weights)^T with every GEMM in float8 (module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layers: tuple["Float8CastOnceLinear", ...],
                *weights: torch.Tensor) -> torch.Tensor:
        casts, steps = layers[0].casts, layers[0].step_weights
        x8, x8_t, x_scale = casts.both(x.reshape(-1, x.shape[-1]), E4M3)
        cached = steps.get(layers) if steps is not None else None
        w8, w_scale = (cached.data, cached.scale) if cached is not None else casts.weight(*weights)
        y = scaled_mm(x8, x_scale, w8, w_scale, x.dtype, fast_accum=True)
        ctx.save_for_backward(x8_t, x_scale, w_scale, *weights)
        ctx.casts, ctx.cached, ctx.x_shape = casts, cached, x.shape
        return y.reshape(*x.shape[:-1], w8.shape[0])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x8_t, x_scale, w_scale, *weights = ctx.saved_tensors
        casts: Casts = ctx.casts
        dy8, dy8_t, dy_scale = casts.both(dy.reshape(-1, dy.shape[-1]), E5M2)
        dx = None
        if ctx.needs_input_grad[0]:
            # (i, o): dx = dy8 @ w8 takes w8 column-major
            w8_t = ctx.cached.data_t if ctx.cached is not None else casts.weight_transposed(w_scale, *weights)
            dx = scaled_mm(dy8, dy_scale, w8_t, w_scale, dy.dtype).reshape(ctx.x_shape)
        return (dx, None, *weight_grads(weights, ctx.needs_input_grad[2:], dy8_t, dy_scale, x8_t, x_scale))


class Float8CastOnceLinear(nn.Linear):
    """A bias-free nn.Linear (the same weight Parameter, state_dict keys and dtype) whose forward and
    backward GEMMs run in float8, each tensor cast once. x: (..., in) -> (..., out)."""

    casts: Casts
    step_weights: StepWeights | None

    @classmethod
    def swap(cls, linear: nn.Linear, casts: Casts, step_weights: StepWeights | None = None) -> "Float8CastOnceLinear":
        """A float8 layer holding `linear`'s own weight Parameter (no copy); `step_weights`: the shared cache of
        train.fp8.weight_casts=step (None: cast per call)."""
        if linear.bias is not None:
            raise ValueError("Float8CastOnceLinear takes bias-free linear layers (the model's have no bias)")
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=False)
        new.weight = linear.weight
        new.casts, new.step_weights = casts, step_weights
        return new

    @staticmethod
    def joined(x: torch.Tensor, *layers: "Float8CastOnceLinear") -> torch.Tensor:
        """x (..., i) through layers that share x, as one float8 layer over their joined weights:
        (..., sum of their outputs), the first layer's columns first (module docstring)."""
        return _Float8LinearFn.apply(x, layers, *(layer.weight for layer in layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.joined(x, self)
