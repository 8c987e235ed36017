"""The mixer interface: what every block type owns, so that the rest of the code only iterates the registry.

A block is  h = h + mixer(norm(h));  h = h + mlp(norm(h))  (model/hybrid.py). The mixer is the part that
differs between block types; the registry (model/mixers/__init__.py) maps a pattern letter to its class.

A mixer class carries, beside its forward:
  - identity for `python -m model list`: `letter`, `name`, `description`, `design` (where it comes from);
  - its decoding state: `empty_state` returns an object with the `LayerState` methods below; a forward
    with a state of one token is the decode step, a longer one is the prefill;
  - its sizes: exact `param_count(cfg)`, the matmul weights a token passes through (`matmul_params`) and
    the non-GEMM forward FLOPs per token (`core_flops`), which model/sizing.py sums for MFU;
  - its training memory: the bytes per token its forward keeps for the backward on the kernel path
    (`saved_activation_bytes`), which the memory planner (train/plan_memory.py) sums per block;
  - its `pathway` ("ssm", "attention", or None for blocks that hold both), which places the bridges of
    `model.bridges` (model/bridges.py);
  - how it exports: `hf_layer_type` (the transformers Bamba layer type, or None: no transformers class
    expresses it), `onnx` (whether export/onnx_export.py can trace its prefill and decode);
  - training hooks: `adapter_targets` (its own Linears under the kind names a fine-tuning config uses,
    e.g. {"attention": ("q_proj", ...)}; a mixer built of other mixers names none: theirs are found),
    `context_parallel` (whether its forward handles `ctx.cp`, one rank's slice of a row split over a group
    of ranks: model/context_parallel.py), `cuda_graphs` (whether its training forward has fixed shapes, so
    that train.cuda_graph can capture it), `zero3_leaves()` (modules ZeRO-3 must gather whole: the kernel
    path reads their weights outside their own forward), `unquantized_linears` (Linears that quantization must
    leave as plain Linears and LoRA must not target: a fused kernel reads their `.weight` directly, or they
    are too small to gain), `statistics()` (what the last forward measured, logged by the trainer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
import torch.nn as nn

FP32 = 4  # bytes of a float32 element, in the `saved_activation_bytes` formulas

if TYPE_CHECKING:
    from model.config import ModelConfig
    from model.context_parallel import ContextSlice
    from model.documents import DocumentLayout


@dataclass
class MixerContext:
    """What one forward shares across all layers, computed once per batch.

    rope: (cos, sin), each (b, l, head_dim), at the tokens' positions; positions: (b, l) long;
    docs: packed-document boundaries (training / prefill), None for plain rows;
    key_valid: (b, t) real (non-padding) keys over everything cached, None when no row is padded;
    cp: this rank's slice of a context-parallel row (model/context_parallel.py), None otherwise.
    The model fills every field; a mixer run alone (tests, benches) gets only what it reads.
    """

    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    positions: torch.Tensor | None = None
    docs: "DocumentLayout | None" = None
    key_valid: torch.Tensor | None = None
    cp: "ContextSlice | None" = None

    @property
    def seq_idx(self) -> torch.Tensor | None:
        return self.docs.seq_idx if self.docs is not None else None

    @classmethod
    def of_documents(cls, seq_idx: torch.Tensor | None) -> "MixerContext":
        """A context holding only packed documents (b, l) (no boundaries precomputed): for mixers
        that read nothing else, run alone."""
        from model.documents import DocumentLayout

        return cls(docs=DocumentLayout(seq_idx=seq_idx) if seq_idx is not None else None)


class LayerState(Protocol):
    """One layer's decoding state (model/cache.py has the two base kinds)."""

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a decode step updates in place (saved and restored around a graph capture)."""
        ...

    def make_static(self, capacity: int, filled: torch.Tensor) -> None:
        """Fixed-capacity form for CUDA-graph decoding; `filled`: the cache's shared filled-column count."""
        ...

    def nbytes(self) -> int:
        """Bytes held (a KV cache counted at its filled length)."""
        ...


class Mixer(nn.Module):
    """Base of every block type's mixer. forward: (b, l, d) -> (b, l, d)."""

    letter: ClassVar[str]
    name: ClassVar[str]
    description: ClassVar[str]
    design: ClassVar[str]
    hf_layer_type: ClassVar[str | None] = None
    pathway: ClassVar[str | None] = None  # "ssm" / "attention": the pathway model.bridges connects
    onnx: ClassVar[bool] = False
    unquantized_linears: ClassVar[tuple[str, ...]] = ()
    adapter_targets: ClassVar[dict[str, tuple[str, ...]]] = {}  # kind -> its Linears (train/lora.py)
    cuda_graphs: ClassVar[bool] = True  # False: data-dependent shapes, no captured training step
    context_parallel: ClassVar[bool] = False  # True: its forward runs on a slice of a row (ctx.cp)

    def __init__(self, cfg: "ModelConfig", layer_idx: int) -> None:
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx

    # ---- execution path: the model sets it for every mixer (HybridLM.set_impl / set_attn_backend) ----
    def set_impl(self, impl: str) -> None:
        for mod in self.modules():
            if mod is not self and isinstance(mod, Mixer):
                mod.set_impl(impl)
        self.impl = impl

    def set_attn_backend(self, backend: str) -> None:
        for mod in self.modules():
            if mod is not self and isinstance(mod, Mixer):
                mod.set_attn_backend(backend)

    # ---- the interface ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, ctx: MixerContext, state: LayerState | None = None) -> torch.Tensor:
        raise NotImplementedError

    def empty_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> LayerState:
        raise NotImplementedError

    @classmethod
    def param_count(cls, cfg: "ModelConfig") -> int:
        raise NotImplementedError

    @classmethod
    def matmul_params(cls, cfg: "ModelConfig") -> int:
        """Weights a token is multiplied with (forward matmul FLOPs = 2 x this)."""
        raise NotImplementedError

    @classmethod
    def core_flops(cls, cfg: "ModelConfig", seq_len: int) -> dict[str, float]:
        """Forward FLOPs per token outside the weight matmuls, by kind ("attention", "ssd", ...)."""
        raise NotImplementedError

    @classmethod
    def saved_activation_bytes(cls, cfg: "ModelConfig", e: int, fp8: bool = False) -> float:
        """Bytes per token that one training forward keeps for its backward on the kernel path: the
        tensors autograd saves, each storage once, less the mixer's input (the block's normed hidden state,
        which the planner counts with the norms) and the parameters. e: bytes per element of the compute
        dtype (2 for bf16); float32 tensors count FP32 bytes per element. fp8: train.precision=fp8 (train/fp8.py
        converts the large Linears), for a mixer whose saved tensors change with it."""
        raise NotImplementedError

    def zero3_leaves(self) -> list[nn.Module]:
        return []

    def statistics(self) -> dict[str, float]:
        return {}
