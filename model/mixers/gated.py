"""Gated memory hybrid mixer (pattern letter `G`): attention and Mamba2 side by side, blended per channel.

From the design's adaptive-hybrid-ssm: both paths read the same normed input, and a learned sigmoid gate
mixes them channel by channel; an optional learned memory bank adds what each token reads from it:

    g_t   = sigmoid(W_g x_t + b_g)                                   (d_model,) per token
    m_t   = softmax(W_m x_t . K^T / sqrt(d_model)) V                 K, V: (slots, d_model) learned; 0 if slots = 0
    y_t   = (1 - g_t) * (attn(x)_t + m_t) + g_t * ssm(x)_t

The memory read is per token (the bank is a parameter, not a cache of the sequence), so it is causal by
construction; it enters through the attention side of the gate: the gate decides per channel how much a
token takes from the global paths (attention over the context and the bank) against the recurrent one.
The gate starts at 0.5 (b_g = 0, small W_g) so that both paths train from the start.

Statistics of the last forward (`statistics`): mean and std of g, and the memory read mass per slot
(the mean softmax weight each slot received), which `python -m model stats CKPT --text ...` prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from model.attention import Attention
from model.cache import KVState, MambaState
from model.config import ModelConfig
from model.layers import init_linear
from model.mamba2 import Mamba2Mixer
from model.mixers.base import Mixer, MixerContext
from model.wgrad import Linear


def memory_read(
    x: torch.Tensor, query: nn.Module, keys: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """What every token reads from a learned memory bank: softmax(query(x) . keys^T / sqrt(d)) values.
    x: (b, l, d); keys, values: (slots, d) -> read (b, l, d), weights (b, l, slots)."""
    weights = (query(x) @ keys.t() / math.sqrt(x.size(-1))).softmax(-1)
    return weights @ values, weights


@dataclass
class GatedState:
    """Decoding state: the Mamba2 state and the attention KV cache (the memory bank holds no state)."""

    ssm: MambaState
    kv: KVState

    def tensors(self) -> list[torch.Tensor]:
        return [*self.ssm.tensors(), *self.kv.tensors()]

    def make_static(self, capacity: int, filled: torch.Tensor) -> None:
        self.kv.make_static(capacity, filled)

    def nbytes(self) -> int:
        return self.ssm.nbytes() + self.kv.nbytes()


class GatedMemoryMixer(Mixer):
    """(1 - g) * (attention + memory read) + g * Mamba2. forward: (b, l, d) -> (b, l, d)."""

    letter = "G"
    name = "gated_memory"
    description = ("attention and Mamba2 in parallel, blended per channel by a learned sigmoid gate, plus an "
                   "optional learned memory bank (`gated.slots`) read through the gate")
    design = "adaptive-hybrid-ssm (gated SSM/attention blend with an external memory bank)"
    context_parallel = True  # its Mamba2 and attention paths split as M and A do

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        d, slots = cfg.d_model, cfg.gated.slots
        self.ssm = Mamba2Mixer(cfg, layer_idx)
        self.attn = Attention(cfg, layer_idx)
        self.gate = Linear(d, d, bias=True)
        self.memory_query = Linear(d, d, bias=False) if slots else None
        self.memory_keys = nn.Parameter(torch.empty(slots, d)) if slots else None
        self.memory_values = nn.Parameter(torch.empty(slots, d)) if slots else None
        self.impl = "reference"
        self._stats: dict[str, torch.Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.resolved_init_std
        init_linear(self.gate, std)
        if self.memory_query is not None:
            init_linear(self.memory_query, std)
            nn.init.normal_(self.memory_keys, std=std)
            nn.init.normal_(self.memory_values, std=std)

    # ---- sizes ------------------------------------------------------------------------------------
    @classmethod
    def param_count(cls, cfg: ModelConfig) -> int:
        d, slots = cfg.d_model, cfg.gated.slots
        memory = d * d + 2 * slots * d if slots else 0
        return Mamba2Mixer.param_count(cfg) + Attention.param_count(cfg) + d * d + d + memory

    @classmethod
    def matmul_params(cls, cfg: ModelConfig) -> int:
        d = cfg.d_model
        memory = d * d + 2 * cfg.gated.slots * d if cfg.gated.slots else 0  # query, scores and read-out
        return Mamba2Mixer.matmul_params(cfg) + Attention.matmul_params(cfg) + d * d + memory

    @classmethod
    def core_flops(cls, cfg: ModelConfig, seq_len: int) -> dict[str, float]:
        return {**Mamba2Mixer.core_flops(cfg, seq_len), **Attention.core_flops(cfg, seq_len)}

    @classmethod
    def saved_activation_bytes(cls, cfg: ModelConfig, e: int, fp8: bool = False) -> float:
        """Per token: Mamba2's and attention's; the blend's operands, d each in e bytes: g (the sigmoid's
        output), 1 - g, the attention side and Mamba2's output; with memory slots, the memory query (d, kept
        by the score product) and the softmax weights (slots) in e bytes."""
        d, slots = cfg.d_model, cfg.gated.slots
        memory = (d + slots) * e if slots else 0
        paths = Mamba2Mixer.saved_activation_bytes(cfg, e, fp8) + Attention.saved_activation_bytes(cfg, e, fp8)
        return paths + 4 * d * e + memory

    def zero3_leaves(self) -> list[nn.Module]:
        return [self]

    # ---- decoding state ---------------------------------------------------------------------------
    def empty_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> GatedState:
        return GatedState(ssm=self.ssm.empty_state(batch, device, dtype), kv=KVState())

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, ctx: MixerContext, state: GatedState | None = None) -> torch.Tensor:
        """x: (b, l, d); ctx: RoPE, documents, real keys; state: decoding state (in place)."""
        ssm = self.ssm(x, ctx, state.ssm if state is not None else None)
        glob = self.attn(x, ctx, state.kv if state is not None else None)
        g = torch.sigmoid(self.gate(x))
        stats = {"gate": g.detach()}
        if self.memory_query is not None:
            read, weights = memory_read(x, self.memory_query, self.memory_keys, self.memory_values)
            glob = glob + read
            stats["memory"] = weights.detach()
        self._stats = stats
        return (1 - g) * glob + g * ssm

    def statistics(self) -> dict[str, float]:
        """Mean and std of the gate (1 = all Mamba2), and the largest memory read mass of a slot."""
        if not self._stats:
            return {}
        g = self._stats["gate"].float()
        out = {"gate_mean": float(g.mean()), "gate_std": float(g.std())}
        if "memory" in self._stats:
            out["memory_max_slot_mass"] = float(self.memory_read_mass().max())
        return out

    def memory_read_mass(self) -> torch.Tensor:
        """(slots,) mean softmax weight each slot received in the last forward (sums to 1)."""
        return self._stats["memory"].float().flatten(0, -2).mean(0)
