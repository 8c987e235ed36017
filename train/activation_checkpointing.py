"""Activation checkpointing, applied to a built model from outside (as torchtitan's `apply_ac`).

`train.activation_checkpointing` picks what the backward recomputes or where saved activations live;
`train.checkpoint_block_types` picks which blocks (pattern letters, model/mixers):
  none       keep every activation (the default);
  full       recompute each selected block (mixer + MLP): only the block's inputs stay saved;
  attention  recompute each selected block's mixer, the token-mixing layer (for `A` blocks the q/k/v
             projections, RoPE and the attention core; for `M` blocks the in-projection, conv and scan);
             its MLP keeps its activations;
  mlp        recompute each selected block's MLP only (its (b, l, ffn_hidden) intermediates are the
             widest tensors of a block);
  offload    recompute nothing: the selected blocks' saved activations go to (pinned, on CUDA) CPU
             memory in the forward and come back in the backward (torch.autograd.graph.save_on_cpu).

The wrapped forward is set on the module instance, so parameter names, state_dict keys and checkpoints
are unchanged (torch's `checkpoint_wrapper` adds a `_checkpoint_wrapped_module` level and needs
state_dict hooks to hide it). Only training forwards (grad enabled, module in train mode, no decoding
state) are wrapped: evaluation and decoding run as before. Recomputation replays the same operations on
the same inputs, so loss and gradients are the same as without.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from train.distributed import training_on_cuda

Mode = Literal["none", "full", "attention", "mlp", "offload"]
MODES: tuple[str, ...] = ("none", "full", "attention", "mlp", "offload")
WRAPPED = "_activation_checkpointing"  # instance attribute naming the mode a module was wrapped with


def _training(module: nn.Module, state_at: int | None, args: tuple, kwargs: dict) -> bool:
    """Whether this call is a training forward: grad on, train mode, no decoding state (the forward's
    `state` argument, positional index `state_at`) passed."""
    state = None
    if state_at is not None:
        state = kwargs.get("state", args[state_at] if len(args) > state_at else None)
    return torch.is_grad_enabled() and module.training and state is None


def _recomputed(module: nn.Module, state_at: int | None, forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not _training(module, state_at, args, kwargs):
            return forward(*args, **kwargs)
        # non-reentrant: keyword arguments, inputs without grad and ZeRO-3's parameter hooks all work
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _offloaded(module: nn.Module, state_at: int | None, forward: Callable[..., Any]) -> Callable[..., Any]:
    pin = training_on_cuda()  # pinned host memory needs a CUDA context

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not _training(module, state_at, args, kwargs):
            return forward(*args, **kwargs)
        with torch.autograd.graph.save_on_cpu(pin_memory=pin):
            return forward(*args, **kwargs)

    return run


def _wrap(module: nn.Module, mode: str, state_at: int | None) -> None:
    if getattr(module, WRAPPED, None) is not None:
        raise ValueError(f"{type(module).__name__} is already wrapped for activation checkpointing "
                         f"({getattr(module, WRAPPED)})")
    make = _offloaded if mode == "offload" else _recomputed
    module.forward = make(module, state_at, module.forward)  # the instance attribute shadows the class's forward
    setattr(module, WRAPPED, mode)


def apply_activation_checkpointing(model: nn.Module, mode: str, block_types: str | None = None) -> list[int]:
    """Wrap the blocks of `model` (a HybridLM: `model.layers`, each with `.kind`, `.mixer`, `.mlp`) whose
    pattern letter is in `block_types` (None: all) as `mode` says. Returns the wrapped layers' indices."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "none":
        return []
    chosen = [i for i, layer in enumerate(model.layers) if block_types is None or layer.kind in block_types]
    for i in chosen:
        layer = model.layers[i]
        # where each forward takes its decoding state: Block(x, residual, ctx, state), mixer(x, ctx, state), mlp(x)
        target, state_at = {"attention": (layer.mixer, 2), "mlp": (layer.mlp, None)}.get(mode, (layer, 3))
        _wrap(target, mode, state_at)
    return chosen


def remove_activation_checkpointing(model: nn.Module) -> None:
    """Undo `apply_activation_checkpointing`: every wrapped module runs its class's forward again."""
    for module in model.modules():
        if getattr(module, WRAPPED, None) is not None:
            del module.forward
            delattr(module, WRAPPED)
