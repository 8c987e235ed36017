"""The models our hybrid is compared with, built for one of our `ModelConfig`s, and one loss for all.

Peers (names used by every benchmark's `--models`):
  ours        HybridLM of `cfg` on its fastest path (kernels on CUDA)
  attention   HybridLM of `attention_twin(cfg)`: all attention, same layer count, MLPs widened to
              absorb the Mamba2 weights (about cfg's parameter count)
  hf_bamba    transformers' BambaForCausalLM of the same architecture (`export.hf.bamba_config`),
              random init, SDPA attention; it calls mamba_ssm's kernels itself when they import
  hf_llama    transformers' LlamaForCausalLM with our widths (d_model, heads, kv heads, head_dim,
              SwiGLU width, padded vocab, RoPE theta, tying) and the layer count whose parameter
              count is closest to cfg's (`llama_twin`)
MFU uses one FLOP counter for all (model.sizing.train_flops_per_token of `flops_config(name, cfg)`),
and parameter counts come from model.sizing.count_params of the same config (tests check them
against the built models).

`run_guarded` runs one benchmark row so that a failure (out of memory or any error) becomes the
row's status instead of ending the run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import traceback
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.common import hf_torch_path
from model import ModelConfig
from model.attention import Attention
from model.kernels import kernel_report
from model.sizing import count_params
from model.variants import match_ffn
from train.graph_step import GraphedLM

OURS = ("ours", "attention")  # HybridLM peers
PEERS = (*OURS, "hf_bamba", "hf_llama")
HF_SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def model_list(text: str) -> list[str]:
    """argparse type of a `--models` option: comma-separated peer names, each one of PEERS."""
    names = text.split(",")
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(PEERS)}")
    return names


def attention_twin(cfg: ModelConfig) -> ModelConfig:
    """All-attention config with (about) `cfg`'s parameter count: wider MLPs take the Mamba2 weights
    (model.variants.match_ffn)."""
    return match_ffn(cfg.model_copy(update={"pattern": Attention.letter * cfg.n_layers}), count_params(cfg))


def llama_twin(cfg: ModelConfig) -> ModelConfig:
    """All-attention config with `cfg`'s widths and the layer count whose parameter count is closest
    to `cfg`'s: the architecture of `hf_llama` in our terms."""
    def all_attention(n: int) -> ModelConfig:
        return cfg.model_copy(update={"n_layers": n, "pattern": Attention.letter * n, "preset": None})

    target = count_params(cfg)
    per_layer = count_params(all_attention(2)) - count_params(all_attention(1))
    guess = max(1, round((target - count_params(all_attention(1))) / per_layer) + 1)
    return min((all_attention(n) for n in (max(1, guess - 1), guess, guess + 1)),
               key=lambda c: abs(count_params(c) - target))


def flops_config(name: str, cfg: ModelConfig) -> ModelConfig:
    """The config whose `train_flops_per_token` counts peer `name`'s model FLOPs."""
    return {"ours": cfg, "hf_bamba": cfg, "attention": attention_twin(cfg), "hf_llama": llama_twin(cfg)}[name]


def fit_length(cfg: ModelConfig, seq_len: int) -> ModelConfig:
    """`cfg` with max_seq_len raised to at least `seq_len` (HF configs copy it as max positions)."""
    return cfg.model_copy(update={"max_seq_len": max(cfg.max_seq_len, seq_len)})


def _set_sdpa(hf_cfg) -> None:
    hf_cfg._attn_implementation = "sdpa"


def hf_bamba(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """transformers' BambaForCausalLM of `cfg`, randomly initialised on `device` in `dtype`, SDPA."""
    from transformers import BambaForCausalLM

    from export.hf import bamba_config

    hf_cfg = bamba_config(cfg, dtype, HF_SPECIAL_IDS)
    _set_sdpa(hf_cfg)
    with torch.device(device):
        return BambaForCausalLM(hf_cfg).to(dtype)


def hf_llama(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """transformers' LlamaForCausalLM of `llama_twin(cfg)`, randomly initialised on `device` in `dtype`, SDPA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = llama_twin(cfg)
    hf_cfg = LlamaConfig(
        vocab_size=c.padded_vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_hidden,
        num_hidden_layers=c.n_layers, num_attention_heads=c.attention.n_heads,
        num_key_value_heads=c.attention.n_kv_heads, head_dim=c.head_dim, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": c.attention.rope_theta},
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, initializer_range=c.resolved_init_std,
        tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False,
        **HF_SPECIAL_IDS,
    )
    _set_sdpa(hf_cfg)
    with torch.device(device):
        return LlamaForCausalLM(hf_cfg).to(dtype)


def build(name: str, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Peer `name` for `cfg`, built directly on `device` (no host copy), in `dtype`, train mode. Ours are
    GraphedLMs: HybridLM until a bench captures their training graphs (train/graph_step.py)."""
    if name in OURS:
        with torch.device(device):
            model = GraphedLM(attention_twin(cfg) if name == "attention" else cfg)
        model.to(dtype)
        model.set_impl()
    else:
        model = {"hf_bamba": hf_bamba, "hf_llama": hf_llama}[name](cfg, device, dtype)
    return model.train()


def impl(name: str, model: nn.Module) -> str:
    """Execution path: ours' `impl`; for HF, whether mamba_ssm + causal_conv1d import here (Bamba then
    runs their kernels on CUDA; transformers logs a warning when it falls back to PyTorch)."""
    if name in OURS:
        return model.impl
    if name == "hf_llama":
        return "transformers"
    on_cuda = next(model.parameters()).device.type == "cuda"
    have = kernel_report()
    kernels = on_cuda and have["mamba_ssm"] and have["causal_conv1d"]
    return "transformers+mamba_ssm" if kernels else "transformers (torch)"


def train_loss(name: str, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (float32) of ids (b, l+1) long: every model reads ids[:, :-1]
    and predicts ids[:, 1:], so b*l tokens for all. Ours: `model.loss`, what training runs (on the kernel
    path flash-attn's fused Triton cross-entropy over the bf16 logits, model/loss.py). HF: its own
    training loss's computation (logits cast to float32, then torch's cross-entropy); labels are not
    passed (HF would shift them again and predict only l-1 tokens) and use_cache=False (a cache in a
    training forward sends Bamba's Mamba2 off its fused kernel)."""
    inputs, labels = ids[:, :-1], ids[:, 1:]
    if name in OURS:
        return model.loss(inputs, labels)
    with hf_torch_path(ids.device):
        logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def release_memory(device: torch.device) -> None:
    """Collect garbage (engines and optimizers hold reference cycles), return cached device memory to
    the driver and restart the peak statistics."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def startup_objects_frozen() -> Iterator[None]:
    """Inside the block, garbage collection skips the objects alive at its start (gc.freeze): modules,
    classes and a calling test process's objects, 10^5-10^6 of them, which `release_memory`'s full
    collection after every row would otherwise walk again each time (0.1-0.3 s a row on CPU). What the
    rows build (engines, optimizers and their reference cycles) is still collected; at the end the frozen
    objects rejoin the collector (a test runs a benchmark's `main` in its own process)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_guarded(measure: Callable[[], dict], device: torch.device) -> dict:
    """measure()'s row with status "ok", or {"status": "OOM"} / {"status": "<Error>: <first line>"}.
    Memory is released after either, outside the except clause, so the traceback's frames and the
    tensors they hold are gone."""
    try:
        row = {**measure(), "status": "ok"}
    except Exception as exc:  # noqa: BLE001 - one row fails, the benchmark goes on
        row = {"status": failure(exc)}
    release_memory(device)
    return row


def failure(exc: BaseException) -> str:
    """A failed row's status: OOM for an out-of-memory error, else the exception's type and first line
    (whose traceback is printed to stderr, for the log)."""
    text = str(exc).strip()
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return "OOM"
    traceback.print_exception(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}".rstrip(": ")
