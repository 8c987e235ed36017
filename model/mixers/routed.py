"""Routed hybrid mixer (pattern letter `R`): Mamba2 for every token, attention for the few a router picks.

The design's DynamicHybridModel / HYDRA v2 "routes ~15% critical tokens to attention, rest to SSM". As
in Mixture-of-Depths (Raposo et al. 2024), the router's score scales the attention output, so that the
router learns through the tokens it sends:

    y_t = ssm(x)_t + r_t * s_t * attn_R(x)_t,      s_t = sigmoid(w . x_t + b)

where attn_R is GQA + RoPE attention among routed tokens only (a routed token attends the routed tokens at
or before it in its document, at their true positions) and r_t in {0, 1} says whether token t is routed.

The routing rule is causal. Mixture-of-Depths picks the top-k scores of a whole sequence, which a decoder
cannot do at inference (the choice at t would depend on later tokens). Here a token asks for attention
when s_t > threshold, and a first-come budget caps how many are served: within each document, at most
A_t = floor(capacity * (p_t + 1)) of the tokens at positions 0..p_t are routed. With d_t = [s_t > threshold]
and c_t the number routed so far,

    c_t = min(c_{t-1} + d_t, A_t),  c_{-1} = 0,   r_t = c_t - c_{t-1},

which depends on tokens <= t only, so decoding token by token (keeping c) routes exactly as the full
forward. The recurrence has the closed form c_t = D_t + min(c_{-1}, min_{j<=t} (A_j - D_j)) with D the
running sum of d, computed with cumsum / cummin for a whole sequence at once (`route`). No auxiliary loss:
the cap bounds the fraction at every prefix, and the score scaling is the router's only signal.

Execution: the reference path runs masked attention over all positions (keys restricted to routed tokens)
and zeroes the rows of unrouted queries; the kernel path gathers the routed tokens, projects only those,
and runs flash-attn's varlen kernel over one segment per (row, document), with causal masking inside each.
The gather has data-dependent shapes: the routed mixer cannot run inside a captured CUDA graph for
training (`cuda_graphs = False`); decoding stays dense (one token) and can.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.attention import Attention, attention_mask
from model.cache import KVState, MambaState
from model.config import ModelConfig
from model.documents import document_starts
from model.kernels import deterministic, flash_ops
from model.mamba2 import Mamba2Mixer
from model.mixers.base import FP32, Mixer, MixerContext


def route(
    wants: torch.Tensor, positions: torch.Tensor, seq_idx: torch.Tensor | None, capacity: float,
    count0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The capped first-come rule of the module docstring for whole rows.

    wants: (b, l) bool, d_t; positions: (b, l) long, each token's position in its document; seq_idx: (b, l)
    documents or None; count0: (b,) long, tokens already routed in the document the row continues (decoding
    state; applies to the row's first document only). Returns routed (b, l) bool and the count c at each
    row's last token (b,) long.
    """
    b, l = wants.shape
    d = wants.long()
    allowed = budget(positions, capacity)
    starts = document_starts(seq_idx if seq_idx is not None else torch.zeros_like(d))
    segment = starts.long().cumsum(1) - 1  # (b, l): document number within the row, from 0
    total = d.cumsum(1)
    before = torch.where(starts, total - d, torch.zeros_like(total)).cummax(1).values
    running = total - before  # D_t within the document
    big = 4 * l + 4  # > any |A_j - D_j|: later documents' terms sort below earlier ones'
    lowest = (allowed - running - segment * big).cummin(1).values + segment * big
    init = torch.zeros_like(running)
    if count0 is not None:
        init = torch.where(segment == 0, count0.unsqueeze(1), init)
    count = running + torch.minimum(init, lowest)
    prev = torch.cat([(count0 if count0 is not None else count.new_zeros(b)).unsqueeze(1), count[:, :-1]], dim=1)
    prev = torch.where(starts & (segment > 0), torch.zeros_like(prev), prev)
    return count > prev, count[:, -1]


def budget(positions: torch.Tensor, capacity: float) -> torch.Tensor:
    """A_t = floor(capacity * (p_t + 1)) (long), the most routed tokens among positions 0..p_t."""
    return torch.floor(capacity * (positions.double() + 1) + 1e-9).long()


@dataclass
class RoutedState:
    """Decoding state: the Mamba2 state, a KV cache over every position and which of them are routed.

    routed: (b, capacity) bool, the routed mask of the cached keys (first `kv.length` columns in use, or all
    in the static form, written at the cache's `filled` column); count: (b,) long, routed tokens of the
    current document so far.
    """

    ssm: MambaState
    kv: KVState
    routed: torch.Tensor
    count: torch.Tensor

    def append_routed(self, routed: torch.Tensor) -> torch.Tensor:
        """Record routed (b, l) for the keys just appended to `kv`; returns the mask over all cached keys."""
        if self.kv.filled is not None:
            cols = self.kv.filled + torch.arange(routed.size(1), device=routed.device)
            self.routed.index_copy_(1, cols, routed)
            return self.routed
        start = self.kv.length - routed.size(1)
        if self.routed.size(1) < self.kv.length:
            grown = self.routed.new_zeros(routed.size(0), self.kv.k.size(2))
            grown[:, :start] = self.routed[:, :start]
            self.routed = grown
        self.routed[:, start : self.kv.length] = routed
        return self.routed[:, : self.kv.length]

    def tensors(self) -> list[torch.Tensor]:
        return [*self.ssm.tensors(), *self.kv.tensors(), self.routed, self.count]

    def make_static(self, capacity: int, filled: torch.Tensor) -> None:
        length = self.kv.length
        self.kv.make_static(capacity, filled)
        routed = self.routed.new_zeros(self.routed.size(0), capacity)
        routed[:, :length] = self.routed[:, :length]
        self.routed = routed

    def nbytes(self) -> int:
        return self.ssm.nbytes() + self.kv.nbytes() + self.routed.numel() + self.count.numel() * 8


class RoutedMixer(Mixer):
    """Mamba2 on every token + attention on the routed ones. forward: (b, l, d) -> (b, l, d)."""

    letter = "R"
    name = "routed"
    description = ("every token through Mamba2; a causal router also sends at most `routed.capacity` of each "
                   "document's tokens through attention, scaled by the router score")
    design = "DynamicHybridModel / HYDRA v2 token routing (Mixture-of-Depths)"
    cuda_graphs = False
    unquantized_linears = ("router",)  # the router: one output row, nothing to gain

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        self.capacity, self.threshold = cfg.routed.capacity, cfg.routed.threshold
        self.ssm = Mamba2Mixer(cfg, layer_idx)
        self.attn = Attention(cfg, layer_idx)
        self.router = nn.Linear(cfg.d_model, 1)
        self.impl = "reference"
        self.reset_parameters()
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset_parameters(self) -> None:
        nn.init.normal_(self.router.weight, std=self.cfg.resolved_init_std)
        nn.init.zeros_(self.router.bias)

    # ---- sizes ------------------------------------------------------------------------------------
    @classmethod
    def param_count(cls, cfg: ModelConfig) -> int:
        return Mamba2Mixer.param_count(cfg) + Attention.param_count(cfg) + cfg.d_model + 1

    @classmethod
    def matmul_params(cls, cfg: ModelConfig) -> int:
        """The router, Mamba2, and attention's projections for the routed share (at most `capacity`)."""
        return Mamba2Mixer.matmul_params(cfg) + cfg.routed.capacity * Attention.matmul_params(cfg) + cfg.d_model

    @classmethod
    def core_flops(cls, cfg: ModelConfig, seq_len: int) -> dict[str, float]:
        """Mamba2's scan; attention among routed tokens: a capacity share of queries, each seeing a capacity
        share of the keys (the cap's upper bound)."""
        cap = cfg.routed.capacity
        return {**Mamba2Mixer.core_flops(cfg, seq_len),
                "attention": cap * cap * Attention.core_flops(cfg, seq_len)["attention"]}

    @classmethod
    def saved_activation_bytes(cls, cfg: ModelConfig, e: int, fp8: bool = False) -> float:
        """Per token, with every document routing its `capacity` share (the cap: an upper bound): Mamba2's;
        for each routed token, attention's (q, k, v, output, log-sum-exp), the gathered input (d) and, with
        RoPE, the gathered cos and sin (2 k) in e bytes, and the two int64 gather indices; for every token,
        o_proj's input (the scattered attention output, zeros where unrouted: n_heads k), its output (d) and
        the score scale (1), both kept by the scaling product, in e bytes, the router's float32 score and the
        bool routed mask."""
        a, d = cfg.attention, cfg.d_model
        rope = 2 * cfg.head_dim if a.rope else 0
        per_routed = Attention.saved_activation_bytes(cfg, e, fp8) + (d + rope) * e + 2 * 8
        per_token = (a.n_heads * cfg.head_dim + d + 1) * e + FP32 + 1
        return Mamba2Mixer.saved_activation_bytes(cfg, e, fp8) + cfg.routed.capacity * per_routed + per_token

    def zero3_leaves(self) -> list[nn.Module]:
        return [self]

    # ---- decoding state ---------------------------------------------------------------------------
    def empty_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> RoutedState:
        return RoutedState(ssm=self.ssm.empty_state(batch, device, dtype), kv=KVState(),
                           routed=torch.zeros(batch, 0, dtype=torch.bool, device=device),
                           count=torch.zeros(batch, dtype=torch.long, device=device))

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, ctx: MixerContext, state: RoutedState | None = None) -> torch.Tensor:
        """x: (b, l, d); ctx: positions, RoPE, documents, real keys; state: decoding state (in place)."""
        y = self.ssm(x, ctx, state.ssm if state is not None else None)
        score = torch.sigmoid(self.router(x).squeeze(-1).to(torch.promote_types(x.dtype, torch.float32)))  # (b, l)
        continuing = state is not None and state.kv.length > 0
        routed, count = route(score > self.threshold, ctx.positions, ctx.seq_idx if not continuing else None,
                              self.capacity, state.count if continuing else None)
        self._stats = (routed.detach(), score.detach())
        if state is not None:
            state.count.copy_(count)
            out = self._cached_attention(x, ctx, state, routed)
        elif self.impl == "kernels" and x.dtype in (torch.bfloat16, torch.float16) and flash_ops() is not None:
            out = self._gathered_attention(x, ctx, routed, flash_ops().varlen)
        else:
            out = self._masked_attention(x, ctx, routed)
        return y + (score * routed).to(x.dtype).unsqueeze(-1) * out

    def _masked_attention(self, x: torch.Tensor, ctx: MixerContext, routed: torch.Tensor) -> torch.Tensor:
        """Every position's queries and keys; keys limited to routed tokens (and the query itself, so that
        no softmax row is empty), unrouted rows zeroed by the caller's r_t. (b, l, d)."""
        q, k, v = self.attn.project(x, ctx.rope)
        l = x.size(1)
        keys = routed.unsqueeze(1) | torch.eye(l, dtype=torch.bool, device=x.device)  # (b, l, l)
        mask = attention_mask(ctx.seq_idx, l, l, None, x.device) & keys.unsqueeze(1)  # (b, 1, l, l)
        rep = self.attn.n_heads // self.attn.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return self.attn.output(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.attn.scale))

    def _gathered_attention(
        self, x: torch.Tensor, ctx: MixerContext, routed: torch.Tensor, varlen: Callable[..., torch.Tensor]
    ) -> torch.Tensor:
        """Kernel path: only the routed tokens, packed as one varlen batch of (row, document) segments.
        varlen: flash-attn's `flash_attn_varlen_func` contract ((n, h, k) tensors + cu_seqlens)."""
        b, l, d = x.shape
        rows, cols = routed.nonzero(as_tuple=True)  # row-major: positions increase within a row
        out = x.new_zeros(b, l, self.attn.n_heads, self.attn.head_dim)
        if rows.numel() == 0:
            return self.attn.o_proj(out.view(b, l, -1))
        cos, sin = ctx.rope
        q, k, v = self.attn.project(x[rows, cols].unsqueeze(0), (cos[rows, cols][None], sin[rows, cols][None]))
        doc = ctx.seq_idx[rows, cols] if ctx.seq_idx is not None else torch.zeros_like(rows)
        segment = rows * (int(doc.max()) + 1) + doc
        starts = document_starts(segment.unsqueeze(0)).squeeze(0)
        # model.documents.cu_seqlens_of builds on the host; these flags are on the GPU already
        cu = torch.cat([starts.nonzero().flatten(), rows.new_tensor([rows.numel()])]).to(torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        flat = lambda t: t.squeeze(0).transpose(0, 1).contiguous()  # noqa: E731  (1, h, n, k) -> (n, h, k)
        o = varlen(flat(q), flat(k), flat(v), cu, cu, longest, longest, causal=True, deterministic=deterministic())
        out[rows, cols] = o
        return self.attn.o_proj(out.view(b, l, -1))

    def _cached_attention(
        self, x: torch.Tensor, ctx: MixerContext, state: RoutedState, routed: torch.Tensor
    ) -> torch.Tensor:
        """Prefill or decode step with a cache: keys of every position cached, the routed mask beside them."""
        q, k, v = self.attn.project(x, ctx.rope)
        static = state.kv.filled is not None  # static form: new keys go to column `filled`; key_valid covers the rest
        first = state.kv.filled if static else torch.tensor(state.kv.length, device=x.device)
        k, v = state.kv.append(k, v)
        keys = state.append_routed(routed)  # (b, t)
        l, t = x.size(1), k.size(2)
        own = torch.arange(t, device=x.device) == (first + torch.arange(l, device=x.device)).unsqueeze(1)  # (l, t)
        seq_idx = ctx.seq_idx if not static and t == l else None  # documents (left padding) at the prefill only
        mask = attention_mask(seq_idx, l, t, ctx.key_valid, x.device) & (keys.unsqueeze(1) | own).unsqueeze(1)
        rep = self.attn.n_heads // self.attn.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return self.attn.output(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.attn.scale))

    def statistics(self) -> dict[str, float]:
        """The last forward's fraction of tokens routed to attention and mean router score."""
        if self._stats is None:
            return {}
        routed, score = self._stats
        return {"routed_fraction": float(routed.float().mean()), "router_score": float(score.mean())}

