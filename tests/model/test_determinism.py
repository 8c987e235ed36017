"""train.deterministic's kernel choices (model/kernels.py make_deterministic), on CPU with Python stand-ins
for the CUDA kernels: which kernel each path calls and with what flag, and that the deterministic
Mamba2 path computes the reference's outputs and gradients (float64, tolerance 1e-10). Whether the GPU
kernels then repeat bitwise is the question of `bash bench/run.sh checks:determinism` (a GPU run)."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

import model.kernels as kernels
from model import HybridLM, ModelConfig
from model.documents import DocumentLayout
from model.layers import rmsnorm_gated_ref
from model.mixers import MixerContext
from model.ssd import discretize_dt, ssd_chunked


@pytest.fixture
def deterministic_mode(monkeypatch):
    """make_deterministic() for one test, then torch's switches and the environment as they were."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    for key in ("CUBLAS_WORKSPACE_CONFIG", "MAMBA_DETERMINISTIC", "TRITON_CACHE_AUTOTUNING"):
        monkeypatch.delenv(key, raising=False)
    kernels.make_deterministic()
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1:]


def test_make_deterministic_sets_every_switch(deterministic_mode) -> None:
    assert kernels.deterministic() and torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert os.environ["MAMBA_DETERMINISTIC"] == "1"  # mamba_ssm.utils.determinism reads it at import
    assert os.environ["TRITON_CACHE_AUTOTUNING"] == "0"


def test_mamba_ssm_keeps_one_tile_config_under_cached_autotuning(deterministic_mode, monkeypatch,
                                                                 kernels_cpu: Path) -> None:
    """mamba_ssm's own config choice (mamba_ssm/utils/determinism.py, loaded from its file without
    importing the package) after make_deterministic, in a shell that exported TRITON_CACHE_AUTOTUNING=1
    (bench/run.sh does, for the default kernels): one config per kernel, not a cached timing pick."""
    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "1")
    kernels.make_deterministic()
    spec = importlib.util.find_spec("mamba_ssm")  # locates the package without importing it
    root = Path(spec.origin).parent if spec is not None else kernels_cpu / "mamba_ssm"
    path = root / "utils" / "determinism.py"
    assert path.is_file(), f"{path} missing: run scripts/setup.sh (it installs mamba-ssm's sources)"
    # the module reads triton's version (>= 3.4: the cache exists); a stand-in, as importing triton here
    # would fix its mode before test_kernels_interpreted.py asks for the interpreter
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.9.0"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("_mamba_determinism", path))
    module.__spec__.loader.exec_module(module)
    assert module.TRITON_HAS_CACHE_RESULTS, "triton >= 3.4 expected: the case where the cache would be used"
    configs = [types.SimpleNamespace(kwargs={"BLOCK_SIZE_M": m}, num_stages=3) for m in (128, 32, 64)]
    with pytest.warns(UserWarning, match="TRITON_CACHE_AUTOTUNING"):
        chosen = module.autotune_configs(configs)
    assert chosen == [configs[1]]  # the cheapest, the same in every process


def _chunk_scan_standin(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=False, seq_idx=None,
                        dt_limit=(0.0, float("inf")), initial_states=None, return_final_states=False):
    """mamba_ssm's mamba_chunk_scan_combined contract on the reference SSD."""
    assert dt_softplus
    y, final = ssd_chunked(x, discretize_dt(dt, dt_bias, dt_limit), A, B, C, chunk_size, D=D,
                           initial_state=initial_states, seq_idx=seq_idx)
    return (y, final) if return_final_states else y


def _gated_norm_standin(y, weight, bias, z, eps, group_size, norm_before_gate):
    return rmsnorm_gated_ref(y, z, weight, eps, y.size(-1) // group_size)


class FusedPathTaken(Exception):
    """Raised by the stand-ins of causal_conv1d and the fused split-conv scan."""


def _fused(*args, **kwargs):
    raise FusedPathTaken


@pytest.fixture
def mamba_standins(monkeypatch):
    ops = types.SimpleNamespace(chunk_scan=_chunk_scan_standin, rmsnorm_gated=_gated_norm_standin,
                                split_conv1d_scan=_fused, split_conv1d_scan_saved=_fused)
    monkeypatch.setattr("model.mamba2.mamba_ops", lambda: ops)
    monkeypatch.setattr("model.mamba2.conv_ops", lambda: types.SimpleNamespace(conv=_fused))


def _mixer_and_input(seed: int = 0):
    torch.manual_seed(seed)
    model = HybridLM(ModelConfig(preset="tiny")).double()
    mixer = next(layer.mixer for layer in model.layers if layer.kind == "M")
    u = torch.randn(2, 24, model.cfg.d_model, dtype=torch.float64)
    return mixer, u


@pytest.mark.parametrize("documents", [False, True])
def test_deterministic_training_runs_mamba2_without_causal_conv1d(mamba_standins, deterministic_mode,
                                                                  documents: bool) -> None:
    """With gradients: the conv runs in PyTorch and the unfused SSD scan (a call to causal_conv1d or
    the fused split-conv scan raises); outputs and every parameter gradient equal the reference path's."""
    mixer, u = _mixer_and_input()
    seq_idx = torch.tensor([[0] * 10 + [1] * 14, [0] * 24]) if documents else None
    results = []
    for impl in ("reference", "kernels"):
        mixer.impl = impl
        mixer.zero_grad(set_to_none=True)
        out = mixer(u, MixerContext.of_documents(seq_idx))
        out.pow(2).sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in mixer.parameters()])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_deterministic_inference_keeps_the_fused_path(mamba_standins, deterministic_mode) -> None:
    """Without gradients nothing is accumulated with atomics: prefill stays on the fused kernel."""
    mixer, u = _mixer_and_input()
    mixer.impl = "kernels"
    with torch.no_grad(), pytest.raises(FusedPathTaken):
        mixer(u)


def test_default_training_takes_the_fused_path(mamba_standins) -> None:
    assert not kernels.deterministic()
    mixer, u = _mixer_and_input()
    mixer.impl = "kernels"
    with pytest.raises(FusedPathTaken):
        mixer(u)


@pytest.mark.parametrize("on", [False, True])
def test_flash_attention_gets_the_deterministic_flag(monkeypatch, request, on: bool, flash_standins) -> None:
    """Dense (attn_backend=flash) and varlen (packed documents) calls pass deterministic=<the mode>,
    and their outputs are the reference masked attention's (bf16, tolerance 2e-2)."""
    if on:
        request.getfixturevalue("deterministic_mode")
    calls: list[tuple[str, bool]] = []
    monkeypatch.setattr("model.attention.flash_ops", lambda: flash_standins(calls))
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(preset="tiny", attn_backend="flash")).to(torch.bfloat16)
    attn = next(layer.mixer for layer in model.layers if layer.kind == "A")
    x = torch.randn(2, 16, model.cfg.d_model, dtype=torch.bfloat16)
    rope = model.rope(torch.arange(16).expand(2, 16), x.dtype)
    seq_idx = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    docs = DocumentLayout.build(seq_idx, x.device, boundaries=True)
    for layout, kind in ((None, "dense"), (docs, "varlen")):
        attn.impl = "kernels"
        got = attn.attend(x, rope, docs=layout)
        attn.impl = "reference"
        want = attn.attend(x, rope, docs=layout)
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        assert calls[-1] == (kind, on)
