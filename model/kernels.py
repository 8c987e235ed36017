"""Lazy access to the optional CUDA kernels and the choice of execution path.

The GPU packages (mamba_ssm, causal_conv1d, flash_attn) only build with CUDA, so nothing here is
imported at module load: each accessor imports on first use and caches the result. `resolve_impl`
turns the config's `impl` into the path that actually runs and says so in the log; asking for
`kernels` when they are missing is an error, and `auto` falling back to the slow reference path on a
CUDA device is a loud warning (never a silent slow path).
"""

from __future__ import annotations

import functools
import logging
import os
from types import SimpleNamespace
from typing import Callable

import torch

log = logging.getLogger(__name__)


@functools.cache
def mamba_ops() -> SimpleNamespace | None:
    """mamba_ssm's Triton SSD scan, fused split-conv scan (and model.ssd_saved's training form of it,
    which keeps the forward's intermediates), decode step, gated RMSNorm, the fused residual-add +
    RMSNorm and SwiGLU (input [gate | up] on the last dim)."""
    try:
        from mamba_ssm.ops.triton.k_activations import swiglu
        from mamba_ssm.ops.triton.layer_norm import rms_norm_fn
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import (
            mamba_chunk_scan_combined,
            mamba_split_conv1d_scan_combined,
        )

        from model.ssd_saved import split_conv1d_scan_saved
    except Exception as exc:  # ImportError, or a broken CUDA build raising at import
        log.debug("mamba_ssm unavailable: %s", exc)
        return None
    return SimpleNamespace(
        chunk_scan=mamba_chunk_scan_combined,
        split_conv1d_scan=mamba_split_conv1d_scan_combined,
        split_conv1d_scan_saved=split_conv1d_scan_saved,
        state_update=selective_state_update,
        rmsnorm_gated=rmsnorm_fn,
        add_rms_norm=rms_norm_fn,
        swiglu=swiglu,
    )


@functools.cache
def conv_ops() -> SimpleNamespace | None:
    """causal_conv1d's fused depthwise conv (training/prefill) and its one-token update."""
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except Exception as exc:
        log.debug("causal_conv1d unavailable: %s", exc)
        return None
    return SimpleNamespace(conv=causal_conv1d_fn, update=causal_conv1d_update)


@functools.cache
def flash_ops() -> SimpleNamespace | None:
    """flash-attn 2: dense and varlen (packed documents via cu_seqlens) kernels."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except Exception as exc:
        log.debug("flash_attn unavailable: %s", exc)
        return None
    return SimpleNamespace(dense=flash_attn_func, varlen=flash_attn_varlen_func)


@functools.cache
def cross_entropy_ops() -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """flash-attn's Triton cross-entropy: (logits (n, vocab), labels (n,), ignore_index=,
    inplace_backward=) -> (losses (n,) float32, z-losses)."""
    try:
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss
    except Exception as exc:
        log.debug("flash_attn cross-entropy unavailable: %s", exc)
        return None
    return cross_entropy_loss


@functools.cache
def flex_ops() -> SimpleNamespace:
    """torch's FlexAttention, compiled once per process (its eager form is a slow reference)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return SimpleNamespace(attention=torch.compile(flex_attention, dynamic=False), create_block_mask=create_block_mask)


def make_deterministic() -> None:
    """Make every training kernel bitwise reproducible from run to run (for this process).

    torch's global switch (cuBLAS with a fixed workspace, cuDNN's deterministic algorithms, SDPA's
    deterministic flash backward; an op with no deterministic form raises and names itself);
    mamba_ssm's SSD reads the same switch (per-program partial sums instead of atomics, and one
    fixed tile config instead of autotuning, whose timing-based pick can differ between runs). That
    last part needs TRITON_CACHE_AUTOTUNING off: with it on, mamba_ssm autotunes once and replays
    the cached pick, and a run's first launch can then differ from its later launches;
    `deterministic()` makes the model pass flash-attn `deterministic=True` and take the Mamba2 conv
    off causal_conv1d, whose backward adds weight gradients with atomics. Call before the first
    CUDA matmul (cuBLAS reads CUBLAS_WORKSPACE_CONFIG once) and before mamba_ssm is imported.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ["MAMBA_DETERMINISTIC"] = "1"
    os.environ["TRITON_CACHE_AUTOTUNING"] = "0"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def deterministic() -> bool:
    """Whether kernels must be bitwise reproducible (torch.use_deterministic_algorithms is on)."""
    return torch.are_deterministic_algorithms_enabled()


def kernel_report() -> dict[str, bool]:
    """Which optional kernel packages import here."""
    return {
        "mamba_ssm": mamba_ops() is not None,
        "causal_conv1d": conv_ops() is not None,
        "flash_attn": flash_ops() is not None,
    }


def resolve_impl(requested: str, device: torch.device) -> str:
    """Map config `impl` (auto|reference|kernels) to the path that runs on `device`.

    Raises RuntimeError when `kernels` is requested but cannot run (no CUDA or no mamba_ssm).
    """
    on_cuda = device.type == "cuda"
    have = on_cuda and mamba_ops() is not None
    if requested == "reference":
        return "reference"
    if requested == "kernels":
        if not have:
            why = "the device is not CUDA" if not on_cuda else "mamba_ssm is not installed"
            raise RuntimeError(
                f"model.impl=kernels but {why}; install requirements-cuda.txt on a GPU machine "
                "or set model.impl=reference"
            )
        return "kernels"
    if on_cuda and not have:
        log.warning(
            "model.impl=auto on CUDA but mamba_ssm is missing: running the SLOW pure-PyTorch "
            "reference path; install requirements-cuda.txt"
        )
    return "kernels" if have else "reference"
