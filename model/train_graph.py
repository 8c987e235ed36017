"""The training forward and backward as CUDA graphs: one launch each instead of thousands.

Why: a 1.3B kernel-path forward+backward is thousands of launches (each Mamba2 layer runs ~25
Triton kernels through Triton's Python launcher, plus the GEMMs and norms). On an H100, one and two
4096-token sequences took about the same time (bench/NOTES.md): at small micro-batches the host,
not the GPU, sets the pace. A CUDA graph records the launches once and replays them.

How: `torch.cuda.make_graphed_callables` (warm-up iterations on a side stream, where Triton
autotunes outside any capture; then one forward and one backward graph). What is captured is
`HybridLM.forward(input_ids)` for one input shape: logits out, parameter gradients back. The
model's `forward` is then replaced by a dispatcher: training-mode calls with `input_ids` alone, of
the captured shape, replay the graphs; everything else (evaluation, packed documents with seq_idx
or position_ids, other shapes, caches) runs the eager forward, so one model serves both.

Requirements, checked by the callers that enable it (train/trainer.py):
  * CUDA, and parameters that keep their storage: in-place optimizer updates (DeepSpeed ZeRO-1/2,
    torch optimizers) are seen by the replays; ZeRO-3 gathers and frees parameters around each
    module, which a graph cannot follow.
  * The gradients a replay returns live in the graph's static buffers and are overwritten by the
    next replay: each backward's gradients must be consumed before the next one. DeepSpeed's ZeRO
    gradient hooks do (with fp32 gradient accumulation they add each into `grad_accum` and drop
    `.grad`); plain accumulation into `.grad` over several backwards does not.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from model.hybrid import HybridLM

log = logging.getLogger(__name__)


class _EagerLogits(nn.Module):
    """The capture target: ids (b, l) -> logits (b, l, v) through the model's eager forward. A
    separate module, hook-free, that owns no parameters of its own (they are the model's)."""

    def __init__(self, model: "HybridLM") -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return type(self.model).forward(self.model, input_ids)


class GraphedTrainingForward:
    """Installed as `model.forward` by `graph_training_forward`; see the module docstring."""

    def __init__(self, model: "HybridLM", sample_ids: torch.Tensor, capture: Callable[..., Any], warmup: int) -> None:
        self.model = model
        self.shape = tuple(sample_ids.shape)
        self.replays = 0
        self.eager_calls = 0
        target = _EagerLogits(model).train()
        # The sample becomes the graph's static input buffer (later batches are copied into it): a
        # clone, so that nothing else owns or rewrites it.
        self.graphed = capture(target, (sample_ids.clone(),), num_warmup_iters=warmup)

    def __call__(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
        cache: Any = None,
    ) -> torch.Tensor:
        model = self.model
        if (model.training and torch.is_grad_enabled() and position_ids is None and seq_idx is None
                and cache is None and tuple(input_ids.shape) == self.shape):
            self.replays += 1
            return self.graphed(input_ids)
        self.eager_calls += 1
        return type(model).forward(model, input_ids, position_ids, seq_idx, cache)


def graph_training_forward(
    model: "HybridLM",
    sample_ids: torch.Tensor,
    capture: Callable[..., Any] | None = None,
    warmup: int = 3,
) -> GraphedTrainingForward:
    """Capture the training forward/backward of `model` for batches shaped like `sample_ids` (b, l)
    long, and install the dispatcher as `model.forward`. Returns it (its `replays` / `eager_calls`
    count what ran). `capture` defaults to torch.cuda.make_graphed_callables (tests pass another)."""
    if isinstance(model.forward, GraphedTrainingForward):
        raise RuntimeError("the model's training forward is already graphed")
    if capture is None:
        if sample_ids.device.type != "cuda":
            raise RuntimeError("CUDA-graph training needs a CUDA device; train eagerly on this one")
        capture = torch.cuda.make_graphed_callables
    if not model.training:
        raise RuntimeError("capture the training forward in train mode (model.train())")
    dispatcher = GraphedTrainingForward(model, sample_ids, capture, warmup)
    model.forward = dispatcher  # instance attribute: nn.Module.__call__ finds it before the class's
    log.info("training forward+backward captured as CUDA graphs for input shape %s", dispatcher.shape)
    return dispatcher
