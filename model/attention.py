"""Grouped-query attention with RoPE (or none: attention.rope), optional QK-norm and softmax scale
(model.scales.attention); the backend is chosen here, once.

Shape legend: b batch, l query length, t key length, d d_model, h query heads, j kv heads, k head dim.

Backends (same weights):
  reference  torch SDPA with an explicit boolean mask when documents are packed, rows are
             left-padded or a KV cache offsets the queries; kv heads repeated (ONNX-safe).
  kernels    plain causal training (and batches whose rows are single documents): SDPA (is_causal,
             enable_gqa), which runs cuDNN/flash kernels and outpaces flash-attn 2 on Hopper (see
             docs/performance.md);
             packed documents, by `attn_backend`: flash-attn's varlen kernel over the batch's
             cu_seqlens (auto/flash, when installed), FlexAttention with a document-causal block mask
             (flex), else SDPA with the dense document mask. The boundaries come from the batch's
             `DocumentLayout`, computed once per forward (model/documents.py), never per layer.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from model.cache import KVState
from model.config import ModelConfig
from model.documents import DocumentLayout
from model.kernels import deterministic, flash_ops, flex_ops
from model.layers import RMSNorm, apply_rope, init_linear, residual_std
from model.mixers.base import FP32, Mixer, MixerContext
from model.wgrad import Linear

log = logging.getLogger(__name__)


def attention_mask(
    seq_idx: torch.Tensor | None,
    q_len: int,
    k_len: int,
    key_valid: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Boolean mask (b or 1, 1, l, t): True where query i may attend key j.

    Causal with the queries at the end of the keys (offset = t - l); within one document when
    `seq_idx` (b, l) is given (queries and keys the same tokens, l == t); never to padded keys
    (`key_valid` (b, t) False).
    """
    offset = k_len - q_len
    qi = torch.arange(q_len, device=device).unsqueeze(1) + offset
    kj = torch.arange(k_len, device=device).unsqueeze(0)
    mask = (kj <= qi).unsqueeze(0)  # (1, l, t)
    if seq_idx is not None:
        mask = mask & (seq_idx.unsqueeze(-1) == seq_idx.unsqueeze(-2))
    if key_valid is not None:
        mask = mask & key_valid.unsqueeze(1)
    return mask.unsqueeze(1)


class Attention(Mixer):
    """GQA + RoPE mixer. forward: (b, l, d) -> (b, l, d)."""

    letter = "A"
    name = "attention"
    description = "grouped-query softmax attention with RoPE (optional QK-norm), KV cache for decoding"
    design = "Transformer attention layers placed strategically (MAMBA_SLM, HYDRA)"
    hf_layer_type = "attention"
    pathway = "attention"
    onnx = True
    context_parallel = True
    adapter_targets = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj")}

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        a = cfg.attention
        self.n_heads, self.n_kv, self.head_dim = a.n_heads, a.n_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(cfg.d_model, self.n_kv * self.head_dim, bias=False)
        self.v_proj = Linear(cfg.d_model, self.n_kv * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if a.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if a.qk_norm else None
        self.impl = "reference"
        self.backend = cfg.attn_backend
        self.rope = a.rope
        self.scale = cfg.scales.attention  # softmax scale; None: 1 / sqrt(head_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.resolved_init_std
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            init_linear(proj, std)
        init_linear(self.o_proj, residual_std(std, self.cfg.n_layers))
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()

    @classmethod
    def param_count(cls, cfg: ModelConfig) -> int:
        """q, k, v, o projections (no biases) + optional per-head q/k norm weights."""
        return cls.matmul_params(cfg) + (2 * cfg.head_dim if cfg.attention.qk_norm else 0)

    @classmethod
    def matmul_params(cls, cfg: ModelConfig) -> int:
        a, hd = cfg.attention, cfg.head_dim
        return 2 * cfg.d_model * a.n_heads * hd + 2 * cfg.d_model * a.n_kv_heads * hd

    @classmethod
    def core_flops(cls, cfg: ModelConfig, seq_len: int) -> dict[str, float]:
        """QK^T and PV; causal: on average (s + 1) / 2 keys per query."""
        return {"attention": 4.0 * cfg.attention.n_heads * cfg.head_dim * (seq_len + 1) / 2}

    @classmethod
    def saved_activation_bytes(cls, cfg: ModelConfig, e: int, fp8: bool = False) -> float:
        """Per token: q, k, v after RoPE (the kernel's inputs: n_heads k + 2 n_kv k), its output (n_heads k)
        in e bytes and the float32 log-sum-exp (n_heads); the same under fp8."""
        a = cfg.attention
        q, kv = a.n_heads * cfg.head_dim, a.n_kv_heads * cfg.head_dim
        return (2 * q + 2 * kv) * e + FP32 * a.n_heads

    def empty_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVState:
        return KVState()

    def set_attn_backend(self, backend: str) -> None:
        self.backend = backend

    def forward(self, x: torch.Tensor, ctx: MixerContext, state: KVState | None = None) -> torch.Tensor:
        """x: (b, l, d); ctx: RoPE tables, packed documents (training/prefill), real-key mask over all
        cached keys; state: KV cache, appended in place."""
        if ctx.cp is not None:  # one slice of a context-parallel row (model/context_parallel.py)
            return ctx.cp.attention(self, x, ctx.rope)
        return self.attend(x, ctx.rope, ctx.docs, state, ctx.key_valid)

    def attend(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        docs: DocumentLayout | None = None,
        kv: KVState | None = None,
        key_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (b, l, d); rope: cos, sin (b, l, k); docs: packed documents (training/prefill);
        kv: cache appended in place; key_valid: (b, t) real-token mask over all cached keys."""
        b, l, _ = x.shape
        q, k, v = self.project(x, rope)
        prior = kv.length if kv is not None else 0
        if kv is not None:
            k, v = kv.append(k, v)  # (b, j, t, k)
        if self.impl == "kernels" and prior == 0 and key_valid is None:
            out = self._kernel_attention(q, k, v, docs)
        else:
            seq_idx = docs.seq_idx if docs is not None and prior == 0 else None
            out = self._masked_attention(q, k, v, seq_idx, key_valid)
        return self.output(out)

    def project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (..., l, d) -> queries (..., h, l, k) and keys, values (..., j, l, k), RoPE applied."""
        *lead, l, _ = x.shape
        q = self.q_proj(x).view(*lead, l, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(*lead, l, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(*lead, l, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(-3, -2), k.transpose(-3, -2)
        if self.rope:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v.transpose(-3, -2)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """(b, h, l, k) attention output -> (b, l, d) through o_proj."""
        b, h, l, k = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, l, h * k))

    def _masked_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        seq_idx: torch.Tensor | None, key_valid: torch.Tensor | None,
    ) -> torch.Tensor:
        l, t = q.size(2), k.size(2)
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if seq_idx is None and key_valid is None and l == t:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        mask = attention_mask(seq_idx, l, t, key_valid, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)

    def _kernel_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: DocumentLayout | None
    ) -> torch.Tensor:
        """q: (b, h, l, k); k, v: (b, j, l, k) -> (b, h, l, k)."""
        fa = flash_ops() if q.dtype in (torch.bfloat16, torch.float16) else None  # flash: half types only
        if docs is None:
            if fa is not None and self.backend == "flash":
                out = fa.dense(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                               softmax_scale=self.scale, deterministic=deterministic())
                return out.transpose(1, 2)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=self.scale)
        if self.backend == "flex":
            flex = flex_ops()
            return flex.attention(q, k, v, block_mask=docs.flex_block_mask(flex.create_block_mask), enable_gqa=True,
                                  scale=self.scale)
        if fa is not None and self.backend in ("auto", "flash"):
            b, h, l, kd = q.shape
            flat = lambda t: t.transpose(1, 2).reshape(b * l, t.size(1), kd)  # noqa: E731
            cu, n = docs.cu_seqlens, docs.max_seqlen
            out = fa.varlen(flat(q), flat(k), flat(v), cu, cu, n, n, causal=True, softmax_scale=self.scale,
                             deterministic=deterministic())
            return out.view(b, l, h, kd).transpose(1, 2)
        if not getattr(self, "_warned_dense_mask", False):
            log.warning("packed documents without flash-attn: dense-mask SDPA (slower); install flash-attn "
                        "or set model.attn_backend=flex")
            self._warned_dense_mask = True
        mask = attention_mask(docs.seq_idx, q.size(2), k.size(2), None, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=self.scale)
