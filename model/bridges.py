"""Bidirectional bridges between the SSM and attention pathways (`model.bridges: true`).

The design's DynamicHybridModel has "bidirectional bridge modules": gated information flow between the SSM
and the Transformer pathways. Here a bridge carries one block's mixer output into another block's mixer
input, at the same position, through a projection and a per-channel gate:

    in_i(x)_t = norm_i(h)_t + g_i * (W_i m_j(.)_t)          g_i: (d,), zero at init;  W_i: (d, d)

with m_j the mixer output of the source block j and norm_i(h) block i's normed input. Which blocks are
bridged (`bridge_sources`), by the mixers' `pathway` (model/mixers; `M` and `H` are "ssm", `A` is
"attention", the blocks that hold both pathways, `R` and `G`, take no bridge):
  - SSM -> attention: every attention block receives from the nearest preceding SSM block;
  - attention -> SSM: every SSM block right after an attention block receives from that block.

Why this form:
  - causal: the bridge is pointwise in time (position t of the source feeds position t of the target), and
    the source is an earlier layer of the same forward, so decoding needs no state beyond the blocks' own;
  - a closed start: g = 0 makes a model with bridges compute exactly the plain hybrid at init (the gate gets
    a gradient from the first step; W learns once g opens; ReZero / LayerScale's zero-init residual gates);
  - into the mixer's input rather than its output: the attention block's queries, keys and values (and the
    SSM's B, C, dt) see the other pathway's view of the token, which is the exchange the design asks for;
    adding to the output would only be a second residual branch;
  - a per-channel gate, not a per-token one: it is the cheapest gate that starts exactly closed.
Each bridge is a module called for its output, so ZeRO-3 gathers its weights as it does a Linear's.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from model.config import ModelConfig
from model.layers import init_linear
from model.mixers import block_type
from model.wgrad import Linear


def bridge_sources(pattern: str) -> dict[int, int]:
    """Target layer -> source layer of every bridge of a layer pattern (the module docstring's rule)."""
    pathway = [block_type(letter).pathway for letter in pattern]
    last: dict[str, int] = {}
    out = {}
    for i, kind in enumerate(pathway):
        if kind == "attention" and "ssm" in last:
            out[i] = last["ssm"]
        elif kind == "ssm" and i > 0 and pathway[i - 1] == "attention":
            out[i] = i - 1
        if kind is not None:
            last[kind] = i
    return out


class Bridge(nn.Module):
    """g * W m: (b, l, d) -> (b, l, d), g zero at init."""

    def __init__(self, d_model: int, std: float) -> None:
        super().__init__()
        self.proj = Linear(d_model, d_model, bias=False)
        self.gate = nn.Parameter(torch.zeros(d_model))
        self.gate._no_weight_decay = True  # read by the optimizer's parameter grouping: decay would close it
        init_linear(self.proj, std)

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        return self.gate.to(source.dtype) * self.proj(source)


class Bridges(nn.Module):
    """Every bridge of a model, keyed by target layer. `sources`: target -> source layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.sources = bridge_sources(cfg.layer_pattern)
        self.links = nn.ModuleDict({str(t): Bridge(cfg.d_model, cfg.resolved_init_std) for t in self.sources})

    @staticmethod
    def param_count(cfg: ModelConfig) -> int:
        return len(bridge_sources(cfg.layer_pattern)) * (cfg.d_model * cfg.d_model + cfg.d_model) if cfg.bridges else 0

    @staticmethod
    def matmul_params(cfg: ModelConfig) -> int:
        return len(bridge_sources(cfg.layer_pattern)) * cfg.d_model * cfg.d_model if cfg.bridges else 0

    def keeps(self, layer: int) -> bool:
        """Whether the model must keep `layer`'s mixer output for a later bridge."""
        return layer in self.sources.values()

    def inflow(self, layer: int, outputs: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """What `layer` receives (b, l, d), or None; outputs: the kept mixer outputs by layer."""
        source = self.sources.get(layer)
        return None if source is None else self.links[str(layer)](outputs[source])
