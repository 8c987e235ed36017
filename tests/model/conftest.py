"""Fixtures of the model tests: a tiny float64 hybrid config/model factory, a relative-error helper, and
the unbound-gradient reference for the main_grad tests (model/wgrad.py)."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from config.base import deep_merge
from model import HybridLM, ModelConfig


@pytest.fixture(scope="session")
def kernels_cpu() -> Path:
    """Where scripts/setup.sh unpacks mamba-ssm's and causal-conv1d's sources (their wheels need CUDA to
    build; the CPU tests import the Triton kernels from there)."""
    return Path(__file__).resolve().parents[2] / ".venv" / "kernels-cpu"


@pytest.fixture(autouse=True)
def _one_thread():
    """Toy-sized tensors: intra-op threads only add synchronisation (and stall on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_config(pattern: str = "MAMA", qk_norm: bool = False, **over) -> ModelConfig:
    """Both block types at toy width: d_model 32, 4 heads (2 kv), 8 SSM heads in 2 groups, chunk 4.

    vocab 61 pads to 128 (the padded columns must be dropped from the logits). `over` merges deeply.
    """
    values = {
        "vocab_size": 61,
        "d_model": 32,
        "n_layers": len(pattern),
        "pattern": pattern,
        "ffn_hidden": 48,
        "attention": {"n_heads": 4, "n_kv_heads": 2, "qk_norm": qk_norm},
        "mamba": {"d_state": 8, "headdim": 8, "expand": 2, "n_groups": 2, "d_conv": 4, "chunk_size": 4},
        "tie_embeddings": False,
        "impl": "reference",
    }
    return ModelConfig(**deep_merge(values, over))


def _randomize_vectors_(module: torch.nn.Module, seed: int) -> None:
    """Perturb every 1-D parameter (norm weights, D, conv bias) so a wrong use of them shows in tests."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.fixture
def tiny_config() -> Callable[..., ModelConfig]:
    return _tiny_config


@pytest.fixture
def tiny_model() -> Callable[..., HybridLM]:
    """Factory: tiny_model(pattern="MAMA", qk_norm=False, seed=0, model_cls=HybridLM, **overrides) -> float64
    eval-mode model (model_cls: HybridLM or a subclass, e.g. train.graph_step.GraphedLM)."""

    def make(pattern: str = "MAMA", qk_norm: bool = False, seed: int = 0, model_cls: type[HybridLM] = HybridLM,
             **over) -> HybridLM:
        torch.manual_seed(seed)
        model = model_cls(_tiny_config(pattern, qk_norm, **over)).double().eval()
        _randomize_vectors_(model, seed)
        model.set_impl("reference")
        return model

    return make


@pytest.fixture
def randomize_vectors() -> Callable[[torch.nn.Module, int], None]:
    return _randomize_vectors_


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius), as a float; 0 when both are exactly zero."""
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp(min=torch.finfo(b.dtype).tiny))


@pytest.fixture
def rel_err() -> Callable[[torch.Tensor, torch.Tensor], float]:
    return _rel_err


def _doc_seq_idx(lengths: list[int]) -> torch.Tensor:
    """Document lengths -> seq_idx (1, sum(lengths)): 0,0,..,1,..."""
    return torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(lengths)]).unsqueeze(0)


@pytest.fixture
def doc_seq_idx() -> Callable[[list[int]], torch.Tensor]:
    return _doc_seq_idx


def _grads_then_bind_main_grads(model: HybridLM, vocab: int) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Two seeded batches (2 x 17 ids below `vocab`); each parameter's gradient summed over their losses with
    nothing bound; then the gradients cleared and a zero float32 `main_grad` bound to every parameter
    (model/wgrad.py takes the linear weights' gradients there). Returns (batches, summed gradients by name)."""
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (2, 17), generator=gen) for _ in range(2)]
    for ids in batches:
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.main_grad = torch.zeros_like(p, dtype=torch.float32)
    return batches, want


@pytest.fixture
def grads_then_bind_main_grads() -> Callable[[HybridLM, int], tuple[list[torch.Tensor], dict[str, torch.Tensor]]]:
    return _grads_then_bind_main_grads


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
          scale: float | None = None) -> torch.Tensor:
    """(b, l, h, k) causal GQA attention through SDPA (scale: softmax scale, default 1/sqrt(k))."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, enable_gqa=True, scale=scale)
    return out.transpose(1, 2)


def _flash_standins_of(calls: list[tuple[str, bool]]) -> types.SimpleNamespace:
    """flash-attn's dense ((b, l, h, k)) and varlen ((n, h, k) + cu_seqlens) contracts on SDPA, recording
    each call's `deterministic` flag."""

    def dense(q, k, v, causal, softmax_scale=None, deterministic=False):
        calls.append(("dense", deterministic))
        return _sdpa(q, k, v, causal, softmax_scale)

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, softmax_scale=None, deterministic=False):
        calls.append(("varlen", deterministic))
        bounds = cu_q.tolist()
        return torch.cat([_sdpa(q[None, a:b], k[None, a:b], v[None, a:b], causal, softmax_scale)[0]
                          for a, b in zip(bounds[:-1], bounds[1:])])

    return types.SimpleNamespace(dense=dense, varlen=varlen)


@pytest.fixture
def flash_standins() -> Callable[[list[tuple[str, bool]]], types.SimpleNamespace]:
    """Factory: flash_standins(calls) -> flash-attn's dense and varlen entry points on SDPA (any dtype)."""
    return _flash_standins_of
