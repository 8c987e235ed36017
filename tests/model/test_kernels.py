"""Execution-path selection: CPU runs the reference path; missing kernels are reported, never faked."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import model.kernels as kernels
from model.kernels import resolve_impl

CPU = torch.device("cpu")


@pytest.fixture
def fresh_accessors():
    """Clear the accessors' caches before and after (they memoise the import result)."""
    accessors = (kernels.mamba_ops, kernels.conv_ops, kernels.flash_ops)
    for fn in accessors:
        fn.cache_clear()
    yield
    for fn in accessors:
        fn.cache_clear()


def test_auto_and_reference_on_cpu() -> None:
    assert resolve_impl("auto", CPU) == "reference"
    assert resolve_impl("reference", CPU) == "reference"


def test_kernels_on_cpu_is_a_one_line_error() -> None:
    with pytest.raises(RuntimeError) as exc:
        resolve_impl("kernels", CPU)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "model.impl" in msg and "not CUDA" in msg


def test_model_set_impl_on_cpu(tiny_model) -> None:
    model = tiny_model(pattern="MA", impl="auto")
    assert model.set_impl() == "reference"
    assert {layer.mixer.impl for layer in model.layers} == {"reference"}
    with pytest.raises(RuntimeError):
        model.set_impl("kernels")


def test_absent_packages_give_none(fresh_accessors, monkeypatch) -> None:
    """Packages made absent, whether or not they are installed (and already imported) here."""
    for name in ("mamba_ssm", "causal_conv1d", "flash_attn"):
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")] + [name]:
            monkeypatch.setitem(sys.modules, loaded, None)  # `import loaded` raises ImportError
    assert kernels.mamba_ops() is None
    assert kernels.conv_ops() is None
    assert kernels.flash_ops() is None
    assert kernels.kernel_report() == {"mamba_ssm": False, "causal_conv1d": False, "flash_attn": False}


def test_present_package_is_used(fresh_accessors, monkeypatch, caplog) -> None:
    """The accessor really imports: a stand-in causal_conv1d module is returned, and on CUDA a
    present mamba_ssm would make `auto` pick the kernels (checked without a GPU via a fake device)."""
    fake = types.ModuleType("causal_conv1d")
    fake.causal_conv1d_fn, fake.causal_conv1d_update = object(), object()
    monkeypatch.setitem(sys.modules, "causal_conv1d", fake)
    ops = kernels.conv_ops()
    assert ops is not None and ops.conv is fake.causal_conv1d_fn and ops.update is fake.causal_conv1d_update

    monkeypatch.setattr(kernels, "mamba_ops", lambda: types.SimpleNamespace())
    cuda = torch.device("cuda")
    assert resolve_impl("auto", cuda) == "kernels"
    assert resolve_impl("kernels", cuda) == "kernels"
    monkeypatch.setattr(kernels, "mamba_ops", lambda: None)
    with caplog.at_level("WARNING", logger="model.kernels"):
        assert resolve_impl("auto", cuda) == "reference"
    assert "SLOW" in caplog.text  # never a silent slow path
    with pytest.raises(RuntimeError, match="mamba_ssm is not installed"):
        resolve_impl("kernels", cuda)


def _swiglu_standin(xy: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's SwiGLU contract: silu(first half) * second half of the last dim."""
    gate, up = xy.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def test_swiglu_kernel_path_matches_reference(monkeypatch) -> None:
    """The kernel path's one GEMM over [gate; up] feeds the fused activation gate first: outputs and
    all three weight gradients equal the unfused reference in float64 (tolerance 1e-12)."""
    from model.layers import SwiGLU

    monkeypatch.setattr("model.layers.mamba_ops", lambda: types.SimpleNamespace(swiglu=_swiglu_standin))
    torch.manual_seed(0)
    mlp = SwiGLU(16, 24).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    results = []
    for impl in ("reference", "kernels"):
        mlp.impl = impl
        assert mlp.fused_gate_up() == (impl == "kernels")
        mlp.zero_grad(set_to_none=True)
        out = mlp(x)
        out.pow(2).sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in (mlp.gate_proj.weight, mlp.up_proj.weight,
                                                                   mlp.down_proj.weight)])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_swiglu_kernel_path_leaves_quantized_weights_unfused(monkeypatch) -> None:
    """A quantized gate/up (torchao swaps the weight for a tensor subclass) cannot be concatenated:
    the kernel path runs them as their own modules, and the output is the reference's."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from model.layers import SwiGLU

    monkeypatch.setattr("model.layers.mamba_ops", lambda: pytest.fail("fused SwiGLU on quantized weights"))
    torch.manual_seed(0)
    mlp = SwiGLU(64, 128)
    quantize_(mlp, Int8WeightOnlyConfig())
    x = torch.randn(2, 3, 64)
    want = mlp(x)
    mlp.impl = "kernels"
    assert not mlp.fused_gate_up()
    torch.testing.assert_close(mlp(x), want, rtol=0, atol=0)


def test_swiglu_kernel_path_stays_fused_under_functional_call(monkeypatch) -> None:
    """train.graph_step captures through torch.func.functional_call with plain-tensor stand-ins for
    the parameters: the MLP must take the same fused path as eager training (a graphed step that ran
    the unfused MLP measured 3% gradient difference from the eager one on an H100)."""
    from torch.func import functional_call

    from model.layers import SwiGLU

    calls = []

    def counting_swiglu(xy: torch.Tensor) -> torch.Tensor:
        calls.append(xy.shape)
        return _swiglu_standin(xy)

    monkeypatch.setattr("model.layers.mamba_ops", lambda: types.SimpleNamespace(swiglu=counting_swiglu))
    mlp = SwiGLU(8, 12)
    mlp.impl = "kernels"
    standins = {name: p.detach().clone().requires_grad_() for name, p in mlp.named_parameters()}
    functional_call(mlp, standins, (torch.randn(2, 3, 8),)).sum().backward()
    assert calls == [torch.Size([2, 3, 24])]
    assert all(t.grad is not None for t in standins.values())
