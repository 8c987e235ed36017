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
    for name in ("mamba_ssm", "causal_conv1d", "flash_attn"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
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
