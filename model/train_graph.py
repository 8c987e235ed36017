"""The training forward and backward as CUDA graphs: one launch each instead of thousands.

Why: a 1.3B kernel-path forward+backward is thousands of launches (each Mamba2 layer runs ~25
Triton kernels through Triton's Python launcher, plus the GEMMs and norms). On an H100, one and two
4096-token sequences took about the same time (bench/NOTES.md): at small micro-batches the host,
not the GPU, sets the pace. Replaying both passes as CUDA graphs measured 2.1x faster at 1 x 4096.

What is captured: `HybridLM.forward(input_ids)` for one input shape, logits out, parameter
gradients back. `graph_training_forward` installs a dispatcher as the model's `forward`:
training-mode calls with `input_ids` alone, of the captured shape, replay the graphs; everything
else (evaluation, packed documents with seq_idx or position_ids, other shapes, caches) runs the
eager forward, so one model serves both.

How, and why not `torch.cuda.make_graphed_callables`: that function captures the backward with
`torch.autograd.grad` over the module's real parameters. Under a DeepSpeed ZeRO-2 engine that
capture failed on an H100 (cudaErrorStreamCaptureImplicit: the default stream was made to wait on
the capture stream), after torch's warning that the parameters' gradient-accumulator nodes predate
the capture and belong to another stream. Here the capture runs on stand-in leaves that share the parameters'
storage (`torch.func.functional_call`), whose accumulators are created on the capture stream; the
replayed backward hands its gradients to the real parameters through one autograd node, so
DeepSpeed's gradient hooks run as in eager training. Otherwise it follows make_graphed_callables:
warm-up iterations first on the capture stream (Triton autotunes there, outside any capture), one
memory pool for both graphs, inputs copied into a static buffer.

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
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch.autograd.function import once_differentiable
from torch.func import functional_call

if TYPE_CHECKING:
    from model.hybrid import HybridLM

log = logging.getLogger(__name__)


class CudaGraphs:
    """The graph operations the capture needs. Tests substitute a stand-in with the same methods
    (one that re-runs `run` on replay and copies the result into the captured outputs)."""

    def new(self) -> Any:
        return torch.cuda.CUDAGraph()

    def stream(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device)

    def pool(self) -> Any:
        return torch.cuda.graph_pool_handle()

    def capture(self, graph: Any, pool: Any, stream: Any, run: Callable[[], Any]) -> Any:
        """Record `run` into `graph` on `stream` (memory from `pool`); returns its outputs, which
        become the graph's static output buffers."""
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            return run()

    def replay(self, graph: Any) -> None:
        graph.replay()


class _EagerLogits(torch.nn.Module):
    """ids (b, l) -> logits (b, l, v) through the model's class forward, never the dispatcher that
    replaces the instance's `forward` (a stand-in graph re-runs the capture)."""

    def __init__(self, model: "HybridLM") -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return type(self.model).forward(self.model, input_ids)


class _CapturedStep:
    """Static buffers and the two graphs of one captured forward+backward.

    ids        (b, l) long     static input (each call's ids are copied in)
    logits     (b, l, v)       static forward output
    grad_out   (b, l, v)       static incoming gradient of the logits
    grads      per parameter   static gradients produced by the backward graph
    """

    def __init__(self, model: "HybridLM", sample_ids: torch.Tensor, ops: CudaGraphs, warmup: int) -> None:
        self.ops = ops
        named = list(model.named_parameters())
        self.params = [p for _, p in named]
        leaves = {f"model.{n}": p.detach().requires_grad_() for n, p in named}  # same storage, new leaves
        order = list(leaves.values())
        target = _EagerLogits(model)
        self.ids = sample_ids.clone()

        def forward() -> torch.Tensor:
            self._live = functional_call(target, leaves, (self.ids,), strict=True)
            return self._live

        def backward() -> tuple[torch.Tensor, ...]:  # differentiates the forward that ran last
            return torch.autograd.grad(self._live, order, grad_outputs=self.grad_out)

        on_cuda = sample_ids.device.type == "cuda"
        stream = ops.stream(sample_ids.device)
        if on_cuda:
            stream.wait_stream(torch.cuda.current_stream(sample_ids.device))
        with _on(stream if on_cuda else None):
            for _ in range(warmup):
                out = forward()
                torch.autograd.grad(out, order, grad_outputs=torch.zeros_like(out))
                del out
            self._live = None
        if on_cuda:
            torch.cuda.current_stream(sample_ids.device).wait_stream(stream)
        pool = ops.pool()
        self.fwd, self.bwd = ops.new(), ops.new()
        self.logits = ops.capture(self.fwd, pool, stream, forward)
        self.grad_out = torch.zeros_like(self.logits)
        self.grads = ops.capture(self.bwd, pool, stream, backward)


@contextmanager
def _on(stream: Any) -> Iterator[None]:
    if stream is None:
        yield
    else:
        with torch.cuda.stream(stream):
            yield


class _Replay(torch.autograd.Function):
    """One autograd node: forward replays the forward graph, backward the backward graph and hands
    the static gradients to the real parameters (inputs 2..)."""

    @staticmethod
    def forward(ctx: Any, step: _CapturedStep, input_ids: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        if input_ids.data_ptr() != step.ids.data_ptr():
            step.ids.copy_(input_ids)
        step.ops.replay(step.fwd)
        ctx.step = step
        return step.logits.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_logits: torch.Tensor) -> tuple[Any, ...]:
        step: _CapturedStep = ctx.step
        step.grad_out.copy_(grad_logits)
        step.ops.replay(step.bwd)
        return (None, None, *(g.detach() for g in step.grads))


class GraphedTrainingForward:
    """Installed as `model.forward` by `graph_training_forward`; see the module docstring."""

    def __init__(self, model: "HybridLM", sample_ids: torch.Tensor, ops: CudaGraphs, warmup: int) -> None:
        self.model = model
        self.shape = tuple(sample_ids.shape)
        self.replays = 0
        self.eager_calls = 0
        self.step = _CapturedStep(model, sample_ids, ops, warmup)

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
            return _Replay.apply(self.step, input_ids, *self.step.params)
        self.eager_calls += 1
        return type(model).forward(model, input_ids, position_ids, seq_idx, cache)


def graph_training_forward(
    model: "HybridLM",
    sample_ids: torch.Tensor,
    ops: CudaGraphs | None = None,
    warmup: int = 3,
) -> GraphedTrainingForward:
    """Capture the training forward/backward of `model` for batches shaped like `sample_ids` (b, l)
    long, and install the dispatcher as `model.forward`. Returns it (its `replays` / `eager_calls`
    count what ran). `ops` defaults to CUDA graphs (tests pass a stand-in)."""
    if isinstance(model.forward, GraphedTrainingForward):
        raise RuntimeError("the model's training forward is already graphed")
    if ops is None:
        if sample_ids.device.type != "cuda":
            raise RuntimeError("CUDA-graph training needs a CUDA device; train eagerly on this one")
        ops = CudaGraphs()
    if not model.training:
        raise RuntimeError("capture the training forward in train mode (model.train())")
    dispatcher = GraphedTrainingForward(model, sample_ids, ops, warmup)
    model.forward = dispatcher  # instance attribute: nn.Module.__call__ finds it before the class's
    log.info("training forward+backward captured as CUDA graphs for input shape %s", dispatcher.shape)
    return dispatcher
