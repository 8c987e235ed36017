"""train/fp8_linear.py on CPU (torch's CPU _scaled_mm; eager casts, and inductor's compiled casts against
them): the casts are torchao's bit for bit,
every GEMM equals the float64 product of its float8 operands, the operands have the layouts cuBLAS needs,
joined layers (SwiGLU's gate and up) are one GEMM each way, and the per-step weight copies
(train.fp8.weight_casts=step) give per-call casts' results. Speed is measured on a GPU only (docs/fp8.md)."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn as nn

from train.fp8_linear import E4M3, E5M2, Casts, Float8CastOnceLinear, StepWeights, cast, cast_both

torchao_float8 = pytest.importorskip("torchao.float8")

# bf16 outputs of float32-accumulated products: the rounding of one bf16 value (2^-8 relative) and a little
# for the accumulation order
BF16_TOL = 2.0 ** -7
N_TOKENS, D_IN, D_OUT = 48, 64, 32  # multiples of 16, as the float8 GEMM needs


def torchao_cast(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's dynamic tensorwise cast of t: (float8 data, scale)."""
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import LinearMMConfig

    f8 = hp_tensor_to_float8_dynamic(t, dtype, LinearMMConfig())
    return f8._data, f8._scale


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_casts_are_torchaos(dtype: torch.dtype) -> None:
    t = torch.randn(N_TOKENS, D_IN, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 300
    data, scale = cast(t, dtype)
    ref_data, ref_scale = torchao_cast(t, dtype)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(data.view(torch.uint8), ref_data.view(torch.uint8))
    both, both_t, both_scale = cast_both(t, dtype)
    assert torch.equal(both.view(torch.uint8), data.view(torch.uint8)) and torch.equal(both_scale, scale)
    assert both_t.is_contiguous() and torch.equal(both_t.view(torch.uint8), data.t().contiguous().view(torch.uint8))


def test_zero_tensor_keeps_a_finite_scale() -> None:
    data, scale = cast(torch.zeros(16, 16, dtype=torch.bfloat16), E4M3)
    assert torch.isfinite(scale) and not data.to(torch.float32).any()


def dequant(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return data.to(torch.float64) / scale.to(torch.float64)


@pytest.fixture
def layer_and_input() -> tuple[Float8CastOnceLinear, nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    plain = nn.Linear(D_IN, D_OUT, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(D_OUT, D_IN, generator=g) * 0.05)
    layer = Float8CastOnceLinear.swap(plain, Casts(compile=False))
    x = (torch.randn(2, N_TOKENS // 2, D_IN, generator=g)).to(torch.bfloat16).requires_grad_()
    return layer, plain, x


def test_swap_keeps_the_parameter(layer_and_input) -> None:
    layer, plain, _ = layer_and_input
    assert layer.weight is plain.weight and list(layer.state_dict()) == ["weight"]
    with pytest.raises(ValueError, match="bias-free"):
        Float8CastOnceLinear.swap(nn.Linear(16, 16), Casts(compile=False))


def test_forward_and_backward_are_the_float8_products(layer_and_input) -> None:
    """y, dx and dW against float64 products of the float8 operands (each cast as torchao casts it)."""
    layer, _, x = layer_and_input
    y = layer(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y.backward(dy)
    x2, dy2, w = x.detach().reshape(-1, D_IN), dy.reshape(-1, D_OUT), layer.weight.detach()
    xq, wq, dyq = dequant(*cast(x2, E4M3)), dequant(*cast(w, E4M3)), dequant(*cast(dy2, E5M2))
    for got, ref in ((y.reshape(-1, D_OUT), xq @ wq.t()), (x.grad.reshape(-1, D_IN), dyq @ wq),
                     (layer.weight.grad, dyq.t() @ xq)):
        assert got.dtype == torch.bfloat16
        rel = (got.to(torch.float64) - ref).norm() / ref.norm()
        assert rel < BF16_TOL, rel


def test_weight_gradient_goes_into_a_bound_main_grad(layer_and_input) -> None:
    """With train.grad_fold=fused_wgrad's float32 buffer bound, the gradient adds there and autograd gets none."""
    layer, _, x = layer_and_input
    dy = torch.randn(2, N_TOKENS // 2, D_OUT, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    layer(x).backward(dy)
    unbound = layer.weight.grad.to(torch.float32).clone()
    layer.weight.grad = None
    layer.weight.main_grad = torch.full((D_OUT, D_IN), 1.0)
    layer(x).backward(dy)
    layer(x).backward(dy)
    assert layer.weight.grad is None
    # the float32 sum of two float8 products: within bf16 rounding of the bf16 gradient of one
    assert torch.allclose(layer.weight.main_grad, 1.0 + 2 * unbound, rtol=BF16_TOL, atol=BF16_TOL * unbound.abs().max())


def test_gemm_operands_have_cublas_layouts(layer_and_input, monkeypatch: pytest.MonkeyPatch) -> None:
    """cuBLAS's float8 GEMM takes its first operand row-major and its second column-major (the CPU kernel
    accepts any): every call must pass them so."""
    layer, _, x = layer_and_input
    real = torch._scaled_mm
    calls = []

    def checked(a: torch.Tensor, b: torch.Tensor, **kwargs) -> torch.Tensor:
        calls.append((a.is_contiguous(), b.t().is_contiguous(), a.dtype, b.dtype))
        return real(a, b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", checked)
    layer(x).sum().backward()
    assert len(calls) == 3
    assert all(row and col for row, col, _, _ in calls)
    assert calls[0][2:] == (E4M3, E4M3) and calls[1][2:] == (E5M2, E4M3) and calls[2][2:] == (E5M2, E4M3)


def test_close_to_torchaos_emulated_float8_linear(layer_and_input) -> None:
    """The same layer through torchao's emulated Float8Linear (float32 GEMMs of the same float8 operands):
    outputs and gradients agree to bf16 rounding."""
    from train.fp8 import torchao_config

    layer, plain, x = layer_and_input
    ref_model = nn.Sequential(nn.Linear(D_IN, D_OUT, bias=False).to(torch.bfloat16))
    with torch.no_grad():
        ref_model[0].weight.copy_(plain.weight)
    torchao_float8.convert_to_float8_training(ref_model, config=torchao_config("tensorwise", emulate=True))
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), ref_model(x_ref)
    y.float().square().sum().backward()
    y_ref.float().square().sum().backward()
    for got, ref in ((y, y_ref), (x.grad, x_ref.grad), (layer.weight.grad, ref_model[0].weight.grad)):
        rel = (got.float() - ref.float()).norm() / ref.float().norm()
        assert rel < 2 * BF16_TOL, rel


# ---- gate and up as one layer ------------------------------------------------------------------------------
def two_layers(casts: Casts, steps: StepWeights | None = None) -> tuple[Float8CastOnceLinear, Float8CastOnceLinear]:
    """SwiGLU's gate and up (D_OUT rows each over D_IN), swapped for float8 layers sharing `casts`."""
    g = torch.Generator().manual_seed(5)
    layers = []
    for std in (0.05, 0.02):  # different ranges: the joined scale is the larger one's
        plain = nn.Linear(D_IN, D_OUT, bias=False).to(torch.bfloat16)
        with torch.no_grad():
            plain.weight.copy_(torch.randn(D_OUT, D_IN, generator=g) * std)
        layers.append(Float8CastOnceLinear.swap(plain, casts, steps))
    return layers[0], layers[1]


def count_scaled_mm(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = torch._scaled_mm

    def counted(*args, **kwargs) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counted)
    return calls


def test_joined_layers_are_one_float8_gemm_each_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """joined(x, gate, up): one forward GEMM over the joined weights with one scale, the input gradient as one
    GEMM over both (summed inside it), the weight gradients as one GEMM whose rows go to each weight's main_grad:
    each against the float64 product of the float8 operands."""
    gate, up = two_layers(Casts(compile=False))
    x = torch.randn(N_TOKENS, D_IN, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(N_TOKENS, 2 * D_OUT, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    gate.weight.main_grad = torch.zeros(D_OUT, D_IN)
    calls = count_scaled_mm(monkeypatch)
    y = Float8CastOnceLinear.joined(x, gate, up)
    y.backward(dy)
    assert len(calls) == 3 and y.shape == (N_TOKENS, 2 * D_OUT)
    w = torch.cat([gate.weight, up.weight]).detach()
    xq, wq, dyq = dequant(*cast(x.detach(), E4M3)), dequant(*cast(w, E4M3)), dequant(*cast(dy, E5M2))
    dw = dyq.t() @ xq
    for got, ref in ((y, xq @ wq.t()), (x.grad, dyq @ wq), (gate.weight.main_grad, dw[:D_OUT]),
                     (up.weight.grad, dw[D_OUT:])):
        rel = (got.to(torch.float64) - ref).norm() / ref.norm()
        assert rel < BF16_TOL, rel
    assert gate.weight.grad is None and up.weight.grad.dtype == torch.bfloat16  # bound: main_grad; unbound: autograd
    _, w_scale = cast(w, E4M3)
    assert torch.equal(w_scale, cast(gate.weight.detach(), E4M3)[1])  # gate's max (std 0.05) sets the joined scale
    # the docstring's floor of e4m3's relative precision: its smallest normal number, 1/28672 of its maximum
    assert torch.finfo(E4M3).max / torch.finfo(E4M3).smallest_normal == 28672


# ---- weights cast once per optimizer step ------------------------------------------------------------------
class CountingCasts(Casts):
    """Eager casts that count the weight casts made per call (not by the step cache)."""

    def __init__(self) -> None:
        super().__init__(compile=False)
        self.per_call = 0
        weight, transposed = self.weight, self.weight_transposed

        def counted(f):
            def run(*args):
                self.per_call += 1
                return f(*args)
            return run

        self.weight, self.weight_transposed = counted(weight), counted(transposed)


def step_of(gate: Float8CastOnceLinear, up: Float8CastOnceLinear, x: torch.Tensor,
            dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward and backward of the joined layers: (y, dx, gate's and up's weight gradients)."""
    x = x.detach().requires_grad_()
    y = Float8CastOnceLinear.joined(x, gate, up)
    y.backward(dy)
    grads = gate.weight.grad, up.weight.grad
    gate.weight.grad = up.weight.grad = None
    return y.detach(), x.grad, *grads


def test_step_weights_cast_once_per_step_and_follow_updates() -> None:
    """Inside `StepWeights.step()` the layers read one float8 copy per step (no per-call weight casts) and
    compute exactly what per-call casts compute; the next step recasts into the same buffers after the weights
    change; outside a step the layers cast per call, so a stale copy is never read."""
    casts = CountingCasts()
    steps = StepWeights(casts)
    gate, up = two_layers(casts, steps)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(N_TOKENS, D_IN, generator=g).to(torch.bfloat16)
    dy = torch.randn(N_TOKENS, 2 * D_OUT, generator=g).to(torch.bfloat16)
    per_call = step_of(gate, up, x, dy)
    assert casts.per_call == 2 and steps.entries == {}  # the forward's cast and the backward's transposed one
    with steps.step():
        first = step_of(gate, up, x, dy)
        again = step_of(gate, up, x, dy)
    assert casts.per_call == 2 and len(steps.entries) == 1 and steps.bytes() == 2 * 2 * D_OUT * D_IN
    for a, b, c in zip(per_call, first, again):
        assert torch.equal(a, b) and torch.equal(a, c)
    (_, cached), = steps.entries.values()
    addresses = cached.data.data_ptr(), cached.data_t.data_ptr(), cached.scale.data_ptr()
    with torch.no_grad():  # the optimizer's update at the end of the step
        gate.weight.mul_(-1.5)
        up.weight.add_(0.01)
    outside = step_of(gate, up, x, dy)
    assert casts.per_call == 4 and not torch.equal(outside[0], per_call[0])
    with steps.step():
        assert (cached.data.data_ptr(), cached.data_t.data_ptr(), cached.scale.data_ptr()) == addresses
        inside = step_of(gate, up, x, dy)
    assert casts.per_call == 4
    for a, b in zip(outside, inside):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_casts_equal_the_eager_ones() -> None:
    """The GPU runs compile the casts (train.fp8.compile): inductor's fused casts, here its CPU code, give the
    eager casts' bytes and scales (the float64 scale arithmetic is there for this), per call and per step."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(N_TOKENS, D_IN, generator=g).to(torch.bfloat16)
    dy = torch.randn(N_TOKENS, 2 * D_OUT, generator=g).to(torch.bfloat16)
    eager = step_of(*two_layers(Casts(compile=False)), x, dy)
    compiled = Casts(compile=True)
    per_call = step_of(*two_layers(compiled), x, dy)
    steps = StepWeights(compiled)
    gate, up = two_layers(compiled, steps)
    with steps.step():
        per_step = step_of(gate, up, x, dy)
    for e, c, s in zip(eager, per_call, per_step):
        assert torch.equal(e, c) and torch.equal(e, s)
