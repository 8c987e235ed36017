"""The registry of MLP kinds: `model.mlp` names one, every block carries it after its mixer.

An MLP kind is a module class built as `cls(d_model, hidden)` with `impl` ("reference" / "kernels", set by
HybridLM.set_impl) and, as class attributes and methods, what the rest of the code asks of it:
  name            the config value (`model.mlp`)
  description     one line for `python -m model list`
  hf_export       whether transformers' Bamba (SwiGLU only) expresses it
  param_count     exact parameters at `cfg.d_model` / `cfg.ffn_hidden` (all of them matmul weights)
  reset(std, out_std)  initialisation: input projections at std, the projection into the residual at out_std
SwiGLU lives in model/layers.py, beside its kernel path. Adding a kind is its class, one entry in `_KINDS`
and its tests
(tests/model/test_block_types.py checks every registered kind).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.layers import SwiGLU, init_linear
from model.wgrad import Linear

if TYPE_CHECKING:
    from model.config import ModelConfig


class GeluMLP(nn.Module):
    """down(gelu(up(x))), no biases: the GPT-2 / Megatron MLP. x: (b, l, d) -> (b, l, d). The same on both
    execution paths (two GEMMs and one elementwise op: nothing to fuse)."""

    name = "gelu"
    description = "down(gelu(up(x))): the two-matrix GPT-2 / Megatron MLP"
    hf_export = False

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.up_proj = Linear(d_model, hidden, bias=False)
        self.down_proj = Linear(hidden, d_model, bias=False)
        self.impl = "reference"

    @classmethod
    def param_count(cls, cfg: "ModelConfig") -> int:
        return 2 * cfg.d_model * cfg.ffn_hidden

    def reset(self, std: float, out_std: float) -> None:
        init_linear(self.up_proj, std)
        init_linear(self.down_proj, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


_KINDS: dict[str, type[nn.Module]] = {cls.name: cls for cls in (SwiGLU, GeluMLP)}


def mlp_kinds() -> dict[str, type[nn.Module]]:
    """Name -> MLP class, in registration order."""
    return _KINDS


def mlp_type(name: str) -> type[nn.Module]:
    """The class of MLP kind `name`; ValueError naming the kinds that exist."""
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"unknown MLP kind {name!r}: known kinds are {', '.join(_KINDS)}") from None
