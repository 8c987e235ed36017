"""Hierarchical-state mixer (pattern letter `H`): a Mamba2 mixer plus a slower state updated once per span.

The design's HYDRA v3 organises state hierarchically "for very long sequences". Here a layer keeps two
states: Mamba2's, updated every token, and a slow state S of `hierarchical.width` channels, updated once
per completed span of k tokens (`hierarchical.span`, default the SSD chunk size) from a pooled summary of
that span. Within one document, with p_t the position of token t and J_t = floor(p_t / k) the number of
spans completed before t's span,

    v_t     = W_v x_t                                                  (w,) projected token
    S_0     = 0,     S_{j+1} = a * S_j + (1 - a) * (1/k) sum_{p_t in span j} v_t      a = sigmoid(lambda) (w,)
    y_t     = mamba2(x)_t + W_o (silu(W_q x_t) * S_{J_t})

Why this form:
  - causal by construction: token t reads S_{J_t}, built from spans that end before t's span starts, never
    from its own (incomplete) span; so a token sees only summaries of completed spans;
  - fixed decoding memory: the state is S and the running sum of the open span (two (w,) vectors per row)
    besides Mamba2's, whatever the context; the span closes lazily, when the first token of the next span
    arrives (that token folds the pending sum into S before reading it), so a prefill that ends inside or at
    the end of a span continues exactly;
  - mean pooling (a projection, then the average over the span) is linear: the summary costs one GEMM per
    token and a segment sum, and a partial span is a running sum;
  - a per-channel decay a in (0, 1) gives the slow state a spread of time scales in spans: at init a runs
    evenly over [0.5, 0.99], i.e. memories of ~2 to ~100 spans (at k = 256: ~500 to ~25K tokens), beyond
    what Mamba2's per-token decay keeps;
  - the read is gated per channel by the token (silu(W_q x_t)), so that a token picks what it takes from
    the summary; W_o starts at the residual-branch std like every output projection;
  - packed documents: spans are counted from each document's first token (p_t restarts) and S restarts at
    every document, so a packed row computes what each document alone does.
The span recurrence runs as a loop over the spans of a row (a few per chunk-sized span: 16 at 4,096 tokens
and k = 256); their number is read on the host once per forward of more than one token, so the block cannot
run inside a captured CUDA training graph (`cuda_graphs = False`). A decode step has one span and no host
read. No transformers class and no traced ONNX graph express the slow state: both exports refuse it in one
line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.cache import MambaState
from model.config import ModelConfig
from model.documents import document_starts
from model.layers import init_linear, residual_std
from model.mamba2 import Mamba2Mixer
from model.mixers.base import FP32, Mixer, MixerContext
from model.wgrad import Linear


@dataclass
class HierarchicalState:
    """Decoding state: Mamba2's, the slow state S (b, w) after the completed spans, and the sum (b, w) of the
    projected tokens of the open span (float32 or wider: they accumulate)."""

    ssm: MambaState
    slow: torch.Tensor
    pending: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [*self.ssm.tensors(), self.slow, self.pending]

    def make_static(self, capacity: int, filled: torch.Tensor) -> None:
        """Already fixed-size."""

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class HierarchicalMixer(Mixer):
    """Mamba2 + a slow state read by later spans. forward: (b, l, d) -> (b, l, d)."""

    letter = "H"
    name = "hierarchical"
    description = ("Mamba2 plus a slow state updated once per completed span of `hierarchical.span` tokens from "
                   "the span's pooled summary; tokens read only completed spans; fixed-size decoding state")
    design = "HYDRA v3 hierarchical state organisation (multi-level state for very long sequences)"
    pathway = "ssm"
    cuda_graphs = False

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        d, w = cfg.d_model, cfg.slow_width
        self.span = cfg.span
        self.ssm = Mamba2Mixer(cfg, layer_idx)
        self.summary = Linear(d, w, bias=False)
        self.query = Linear(d, w, bias=False)
        self.read = Linear(w, d, bias=False)
        self.decay_logit = nn.Parameter(torch.empty(w))
        self.decay_logit._no_weight_decay = True  # read by the optimizer's parameter grouping
        self.impl = "reference"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.resolved_init_std
        init_linear(self.summary, std)
        init_linear(self.query, std)
        init_linear(self.read, residual_std(std, self.cfg.n_layers))
        with torch.no_grad():
            a = torch.linspace(0.5, 0.99, self.decay_logit.numel(), device=self.decay_logit.device)
            self.decay_logit.copy_(torch.log(a / (1 - a)))

    # ---- sizes ------------------------------------------------------------------------------------
    @classmethod
    def param_count(cls, cfg: ModelConfig) -> int:
        """Mamba2 + summary, query (d -> w), read (w -> d) + the decays (w)."""
        return Mamba2Mixer.param_count(cfg) + 3 * cfg.d_model * cfg.slow_width + cfg.slow_width

    @classmethod
    def matmul_params(cls, cfg: ModelConfig) -> int:
        return Mamba2Mixer.matmul_params(cfg) + 3 * cfg.d_model * cfg.slow_width

    @classmethod
    def core_flops(cls, cfg: ModelConfig, seq_len: int) -> dict[str, float]:
        """Mamba2's; the slow state's pooling, update and gated read are elementwise (O(w) per token), not
        counted (model/sizing.py's convention for norms and activations)."""
        return Mamba2Mixer.core_flops(cfg, seq_len)

    @classmethod
    def saved_activation_bytes(cls, cfg: ModelConfig, e: int, fp8: bool = False) -> float:
        """Per token: Mamba2's; the read's four (w,) tensors in e bytes: the query projection (silu's input),
        silu's output, the reads cast to e and their product (the read projection's input); in float32, the
        span recurrence's three (w,) tensors per span of k tokens (the state entering it, the span's mean,
        1 - a: 3 w / k; 1 - a is one per micro-batch, counted per row) and the one-hot span membership, one
        value per span of the row (max_seq_len / k at the longest). Packed documents add a span piece at each
        document start."""
        w, k = cfg.slow_width, cfg.span
        spans = math.ceil(cfg.max_seq_len / k)
        return Mamba2Mixer.saved_activation_bytes(cfg, e, fp8) + 4 * w * e + FP32 * (3 * w / k + spans)

    def zero3_leaves(self) -> list[nn.Module]:
        return [self]  # Mamba2's kernels read weights outside their modules; the decays are read here

    # ---- decoding state ---------------------------------------------------------------------------
    def empty_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> HierarchicalState:
        wide = torch.promote_types(dtype, torch.float32)
        slow, pending = (torch.zeros(batch, self.cfg.slow_width, device=device, dtype=wide) for _ in range(2))
        return HierarchicalState(ssm=self.ssm.empty_state(batch, device, dtype), slow=slow, pending=pending)

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, ctx: MixerContext, state: HierarchicalState | None = None) -> torch.Tensor:
        """x: (b, l, d); ctx: positions and documents; state: decoding state (in place)."""
        continuing = state is not None and state.ssm.filled  # read before Mamba2 fills it
        y = self.ssm(x, ctx, state.ssm if state is not None else None)
        reads, slow, pending = self.slow_states(self.summary(x), ctx, state if continuing else None)
        if state is not None:
            state.slow.copy_(slow)
            state.pending.copy_(pending)
        return y + self.read(F.silu(self.query(x)) * reads.to(x.dtype))

    def slow_states(
        self, v: torch.Tensor, ctx: MixerContext, state: HierarchicalState | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """S_{J_t} for every token, from the projected tokens v (b, l, w); `state`: the row continues its
        cached document (the first token closes the open span or extends it). Returns the reads (b, l, w)
        and, for the state, S before and the sum of the row's last span (b, w) each."""
        b, l, w = v.shape
        v = v.to(torch.promote_types(v.dtype, torch.float32))
        positions = ctx.positions
        seq_idx = ctx.seq_idx
        doc_start = document_starts(seq_idx) if seq_idx is not None else torch.zeros_like(positions, dtype=torch.bool)
        doc_start[:, 0] = state is None  # a continued row's first token is inside its document
        new_span = doc_start | (positions % self.span == 0)
        opens = new_span[:, 0].clone()  # (b,): the row's first token opens a span
        new_span[:, 0] = True  # ... and always starts the row's first group of tokens
        group = new_span.long().cumsum(1) - 1  # (b, l): spans (or span pieces) of the row, from 0
        n_groups = 1 if l == 1 else int(group[:, -1].max()) + 1
        # (b, n_groups, l) one-hot membership: sums and reads as matmuls, deterministic where a scatter is not
        member = (group.unsqueeze(1) == torch.arange(n_groups, device=v.device).view(1, -1, 1)).to(v.dtype)
        sums = member @ v  # (b, n_groups, w)
        reset = (member @ doc_start.to(v.dtype).unsqueeze(-1)).squeeze(-1) > 0  # (b, n_groups): opens a document
        a = torch.sigmoid(self.decay_logit.to(v.dtype))
        s = v.new_zeros(b, w)
        if state is not None:
            s, pending = state.slow.to(v.dtype), state.pending.to(v.dtype)
            s = torch.where(opens.unsqueeze(-1), a * s + (1 - a) * pending / self.span, s)  # close the open span
            sums[:, 0] += torch.where(opens.unsqueeze(-1), torch.zeros_like(pending), pending)  # or extend it
        before = []
        for g in range(n_groups):
            s = torch.where(reset[:, g].unsqueeze(-1), torch.zeros_like(s), s)
            before.append(s)
            s = a * s + (1 - a) * sums[:, g] / self.span  # a group that is not a whole span ends its document
        states = torch.stack(before, 1)  # (b, n_groups, w)
        last = member[:, :, -1:]  # (b, n_groups, 1): the group of the row's last token
        return member.transpose(1, 2) @ states, (states * last).sum(1), (sums * last).sum(1)

