"""train/fp8_linear.py on CPU (torch's CPU _scaled_mm, eager casts): the casts are torchao's bit for bit,
every GEMM equals the float64 product of its float8 operands, and the operands have the layouts cuBLAS
needs. Speed is measured on a GPU only (docs/fp8.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from train.fp8_linear import E4M3, E5M2, Casts, Float8CastOnceLinear, cast, cast_both

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
