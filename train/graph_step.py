"""The training forward and backward as CUDA graphs: one launch each instead of thousands.

Why: a 1.3B kernel-path forward+backward is thousands of launches (each Mamba2 layer runs tens of
Triton kernels through Triton's Python launcher, plus the GEMMs and norms). At small micro-batches the
host, not the GPU, sets the pace: one and two sequences of a few thousand tokens take about the same
time. Replaying both passes as CUDA graphs removes the launches (the gain: see docs/performance.md).

What is captured: `HybridLM.forward` for one input shape, logits out, parameter gradients back.
The model is a `GraphedLM` (a HybridLM whose forward consults its graphs; the trainer builds it when
train.cuda_graph is on), and `graph_training_forward` gives it a dispatcher: training-mode calls of
the captured shape replay graphs; everything else (evaluation, other shapes, caches, explicit positions
without documents) runs HybridLM's forward, so one model serves both. model/ knows nothing of this:
the graphs wrap it from here, as torch.compile or float8 conversion would. Two kinds of step:
  plain      no document boundaries: the ids and their positions in. Serves `input_ids` alone
             (continuous packing; positions 0..l-1) and packed batches whose every row is one document
             or a piece of one (the loader's positions: a piece may start past 0), which the eager forward
             also runs without boundaries (model/documents.py): SDPA, Mamba2 kernels without seq_idx.
  documents  packed batches (`seq_idx`, with or without `position_ids`; with `documents=True`). The
             boundaries change every batch, the shapes must not: the inputs are the ids, positions,
             int32 seq_idx (which the Mamba2 kernels take as a tensor) and flash-attn's cu_seqlens
             padded with empty documents to a fixed capacity, with max_seqlen = the row length. The
             smallest capacity of DOC_CAPACITIES that holds the batch's documents is replayed
             (captured on first use); a batch with more documents runs eagerly. Needs flash-attn's
             varlen kernel for attention (SDPA's dense mask and FlexAttention's block mask are
             built per batch).
All steps share one memory pool. That is safe because a step's forward is always followed by its
own backward before any other step runs (one micro-batch at a time): what one step leaves in the
pool is dead by the time another runs, except its static inputs, outputs and gradients, which
stay referenced and are never handed out again.

How, and why not `torch.cuda.make_graphed_callables`: that function captures the backward with
`torch.autograd.grad` over the module's real parameters. Under a DeepSpeed ZeRO-2 engine that
capture fails (cudaErrorStreamCaptureImplicit: the default stream was made to wait on
the capture stream), after torch's warning that the parameters' gradient-accumulator nodes predate
the capture and belong to another stream. Here the capture runs on stand-in leaves that share the parameters'
storage (`torch.func.functional_call`), whose accumulators are created on the capture stream; the
replayed backward hands its gradients to the real parameters through one autograd node, so
DeepSpeed's gradient hooks run as in eager training. Otherwise it follows make_graphed_callables:
warm-up iterations first on the capture stream (Triton autotunes there, outside any capture), one
memory pool, inputs copied into static buffers.

Requirements, all checked in one place (`check_graphable`: by the trainer before any work, with the
DeepSpeed config; by `graph_training_forward` for the model):
  * CUDA, and parameters that keep their storage: in-place optimizer updates (DeepSpeed ZeRO-1/2,
    torch optimizers) are seen by the replays; ZeRO-3 gathers and frees parameters around each
    module, which a graph cannot follow.
  * The gradients a replay returns live in the graph's static buffers and are overwritten by the
    next replay: each backward's gradients must be consumed before the next one. DeepSpeed's ZeRO-2
    hooks do (each gradient is copied into the reduction bucket as it arrives), and so do ZeRO-1's
    with bf16 and `bf16.immediate_grad_update` (BF16_Optimizer folds each into its fp32 buffer and
    drops `.grad`). Without that flag BF16_Optimizer lets autograd accumulate into `.grad`, which then
    is the graph's own buffer: each replay's gradients are added to themselves (the gradient norm comes
    out many times too large). Plain accumulation into `.grad` over several backwards is not
    supported for the same reason. Weights bound to a float32 `main_grad` (train/grad_fold.py's
    fused_wgrad, model/wgrad.py) are the exception that needs nothing consumed: the captured backward adds
    their gradients into those buffers (fixed addresses) and hands them no gradient at all.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from config.loader import ConfigError
from model.attention import Attention
from model.config import ModelConfig
from model.documents import (
    DocumentLayout,
    cu_seqlens_of,
    document_starts,
    one_document_per_row,
    positions_from_seq_idx,
)
from model.hybrid import HybridLM
from model.kernels import flash_ops
from train.ds_config import zero_stage

log = logging.getLogger(__name__)

# Document capacities of the packed-batch graphs: a micro-batch replays the smallest one that holds
# its documents (more documents: eager). Each is captured on first use. flash-attn's varlen backward
# allocates (total tokens + 128 x capacity) x heads x head_dim float32 (its dq accumulator): a larger capacity
# costs memory in every replay.
DOC_CAPACITIES = (64, 512)


class CudaGraphs:
    """The graph operations the capture needs (EagerReplayGraphs below has the same methods without CUDA)."""

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


class EagerReplayGraphs(CudaGraphs):
    """CudaGraphs' interface without CUDA: a "replay" runs the captured function again and copies its
    results into the outputs of the capture, as a real replay refills its static buffers. Exercises
    everything around the graphs (static inputs, outputs and gradients, the hand-off of gradients to
    the optimizer's hooks) on any device: the CPU tests and the benchmarks' --smoke runs use it."""

    def __init__(self) -> None:
        self.captures = self.replays = 0

    def new(self) -> Any:
        return SimpleNamespace(run=None, out=None)

    def stream(self, device: torch.device) -> None:
        return None

    def pool(self) -> None:
        return None

    def capture(self, graph: Any, pool: Any, stream: Any, run: Callable[[], Any]) -> Any:
        self.captures += 1
        graph.run, graph.out = run, run()
        return graph.out

    def replay(self, graph: Any) -> None:
        self.replays += 1
        # a real replay records nothing; re-running needs autograd (Function.forward disables it)
        with torch.enable_grad():
            fresh = graph.run()
        pairs = zip(graph.out, fresh) if isinstance(fresh, tuple) else [(graph.out, fresh)]
        with torch.no_grad():
            for static, new in pairs:
                if static is not None:  # None: a weight whose gradient went to its main_grad
                    static.copy_(new)


class _EagerLogits(torch.nn.Module):
    """(ids, position_ids, layout) -> logits (b, l, v) through HybridLM's forward, never GraphedLM's
    dispatch (a stand-in graph re-runs the capture)."""

    def __init__(self, model: HybridLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                layout: DocumentLayout | None) -> torch.Tensor:
        return HybridLM.forward(self.model, input_ids, position_ids, layout)


@dataclass
class GraphInputs:
    """What one replay reads; the captured step keeps a static copy and each call's values are copied
    into it.

    ids           (b, l) long
    position_ids  (b, l) long
    seq_idx       (b, l) int32, documents steps only
    cu_seqlens    (capacity + 1,) int32, documents steps only: the batch's document starts padded
                  with b * l (empty documents), so every batch up to `capacity` documents has the
                  captured shape; flash-attn's varlen kernel skips the empty ones
    """

    ids: torch.Tensor
    position_ids: torch.Tensor | None = None
    seq_idx: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None

    @property
    def layout(self) -> DocumentLayout | None:
        """The model's document layout over these tensors (max_seqlen the row length: a bound that
        holds for every batch of this shape)."""
        if self.seq_idx is None:
            return None
        return DocumentLayout(seq_idx=self.seq_idx, cu_seqlens=self.cu_seqlens, max_seqlen=self.ids.size(1))

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.ids, self.position_ids, self.seq_idx, self.cu_seqlens) if t is not None]

    def static_copy(self) -> "GraphInputs":
        return GraphInputs(*(t.clone() if t is not None else None
                             for t in (self.ids, self.position_ids, self.seq_idx, self.cu_seqlens)))

    def copy_into(self, static: "GraphInputs") -> None:
        for dst, src in zip(static.tensors(), self.tensors()):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src, non_blocking=True)


class _CapturedStep:
    """Static buffers and the two graphs of one captured forward+backward.

    inputs     GraphInputs     static inputs (each call's are copied in)
    logits     (b, l, v)       static forward output
    grad_out   (b, l, v)       static incoming gradient of the logits
    grads      per parameter   static gradients produced by the backward graph
    """

    def __init__(self, model: HybridLM, sample: GraphInputs, ops: CudaGraphs, pool: Any, warmup: int) -> None:
        self.ops = ops
        named = list(model.named_parameters())
        self.params = [p for _, p in named]
        leaves = {f"model.{n}": _stand_in(p) for n, p in named}
        order = list(leaves.values())
        target = _EagerLogits(model)
        self.inputs = sample.static_copy()

        def forward() -> torch.Tensor:
            args = (self.inputs.ids, self.inputs.position_ids, self.inputs.layout)
            self._live = functional_call(target, leaves, args, strict=True)
            return self._live

        def backward() -> tuple[torch.Tensor | None, ...]:  # differentiates the forward that ran last
            return torch.autograd.grad(self._live, order, grad_outputs=self.grad_out, allow_unused=True)

        device = sample.ids.device
        on_cuda = device.type == "cuda"
        stream = ops.stream(device)
        if on_cuda:
            stream.wait_stream(torch.cuda.current_stream(device))
        with _on(stream if on_cuda else None):
            for _ in range(warmup):
                out = forward()
                torch.autograd.grad(out, order, grad_outputs=torch.zeros_like(out), allow_unused=True)
                del out
            self._live = None
        if on_cuda:
            torch.cuda.current_stream(device).wait_stream(stream)
        self.fwd, self.bwd = ops.new(), ops.new()
        self.logits = ops.capture(self.fwd, pool, stream, forward)
        self.grad_out = torch.zeros_like(self.logits)
        self.grads = ops.capture(self.bwd, pool, stream, backward)


def _stand_in(param: torch.Tensor) -> torch.Tensor:
    """A new leaf on the parameter's storage, with its `main_grad` if bound (model/wgrad.py: the
    captured backward then adds that weight's gradient there and returns None for it)."""
    leaf = param.detach().requires_grad_()
    main_grad = getattr(param, "main_grad", None)
    if main_grad is not None:
        leaf.main_grad = main_grad
    return leaf


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
    def forward(ctx: Any, step: _CapturedStep, inputs: GraphInputs, *params: torch.Tensor) -> torch.Tensor:
        inputs.copy_into(step.inputs)
        step.ops.replay(step.fwd)
        ctx.step = step
        return step.logits.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_logits: torch.Tensor) -> tuple[Any, ...]:
        step: _CapturedStep = ctx.step
        step.grad_out.copy_(grad_logits)
        step.ops.replay(step.bwd)
        return (None, None, *(None if g is None else g.detach() for g in step.grads))


class GraphedTrainingForward:
    """A GraphedLM's dispatcher, given by `graph_training_forward`; see the module docstring.

    steps: the captured steps by key, "plain" or the document capacity of a packed step; `replays`
    and `eager_calls` count what ran.
    """

    def __init__(self, model: HybridLM, shape: tuple[int, int], documents: bool, ops: CudaGraphs,
                 warmup: int) -> None:
        self.model, self.shape, self.documents = model, shape, documents
        self.ops, self.warmup = ops, warmup
        self.pool = ops.pool()  # one memory pool for every captured step (see the module docstring)
        self.steps: dict[str | int, _CapturedStep] = {}
        self.replays = 0
        self.eager_calls = 0
        self.warned_capacity = False

    def step_key(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                 seq_idx: torch.Tensor | None) -> str | int | None:
        """Which captured step serves a training call with these inputs: "plain", the document
        capacity of a packed step, or None when the call runs eagerly (see the module docstring).
        Host work only: the loader's seq_idx is on the host."""
        if tuple(input_ids.shape) != self.shape:
            return None
        if seq_idx is None:
            return "plain" if position_ids is None else None
        if not self.documents:
            return None
        starts = document_starts(seq_idx)
        if one_document_per_row(starts):  # no boundaries: as the eager forward, the plain step
            return "plain"
        n_docs = int(starts.sum())
        capacity = next((c for c in DOC_CAPACITIES if c >= n_docs), None)
        if capacity is None and not self.warned_capacity:  # once: short documents would flood the log
            log.warning("a packed micro-batch holds %d documents, more than the CUDA graphs' largest capacity "
                        "(%d): such micro-batches run eagerly (slower)", n_docs, DOC_CAPACITIES[-1])
            self.warned_capacity = True
        return capacity

    def graph_inputs(self, key: str | int, input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                     seq_idx: torch.Tensor | None) -> GraphInputs:
        """This call's inputs on the model's device, shaped as step `key` takes them."""
        device = input_ids.device
        if position_ids is None:
            position_ids = (torch.arange(input_ids.size(1), device=device).expand_as(input_ids) if seq_idx is None
                            else positions_from_seq_idx(seq_idx))
        if key == "plain":
            return GraphInputs(input_ids, position_ids.to(device))
        flat_starts = document_starts(seq_idx).flatten().cpu()
        cu = cu_seqlens_of(flat_starts)
        cu = torch.cat([cu, cu.new_full((key + 1 - cu.numel(),), flat_starts.numel())])  # empty documents
        return GraphInputs(input_ids, position_ids.to(device), seq_idx.to(device, torch.int32), cu.to(device))

    def _capture(self, key: str | int, inputs: GraphInputs) -> None:
        self.steps[key] = _CapturedStep(self.model, inputs, self.ops, self.pool, self.warmup)
        log.info("training forward+backward captured as CUDA graphs: input shape %s, %s", self.shape,
                 "no documents" if key == "plain" else f"up to {key} documents per micro-batch")

    def prepare(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                seq_idx: torch.Tensor | None = None) -> None:
        """Capture the step that a training call with these inputs will replay, if it is not yet
        captured (the trainer calls this before DeepSpeed's forward; `__call__` would otherwise)."""
        key = self.step_key(input_ids, position_ids, seq_idx)
        if key is not None and key not in self.steps:
            self._capture(key, self.graph_inputs(key, input_ids, position_ids, seq_idx))

    def __call__(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        seq_idx: torch.Tensor | DocumentLayout | None = None,
        cache: Any = None,
    ) -> torch.Tensor:
        model = self.model
        key = None
        if model.training and torch.is_grad_enabled() and cache is None and not isinstance(seq_idx, DocumentLayout):
            key = self.step_key(input_ids, position_ids, seq_idx)
        if key is None:
            self.eager_calls += 1
            return HybridLM.forward(model, input_ids, position_ids, seq_idx, cache)
        inputs = self.graph_inputs(key, input_ids, position_ids, seq_idx)
        if key not in self.steps:
            self._capture(key, inputs)
        self.replays += 1
        step = self.steps[key]
        return _Replay.apply(step, inputs, *step.params)


class GraphedLM(HybridLM):
    """A HybridLM whose training calls replay CUDA graphs once `graph_training_forward` captured them;
    before that, and for every call the graphs do not serve, it is HybridLM. Same parameters, state_dict
    keys and checkpoints as HybridLM."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.graphs: GraphedTrainingForward | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        seq_idx: torch.Tensor | DocumentLayout | None = None,
        cache: Any = None,
        labels: torch.Tensor | None = None,
        loss_chunk_tokens: int = 0,
    ) -> torch.Tensor:
        if self.graphs is None or loss_chunk_tokens:  # the graphs capture the whole logits, not a chunked loss
            return super().forward(input_ids, position_ids, seq_idx, cache, labels, loss_chunk_tokens)
        return self.graphs(input_ids, position_ids, seq_idx, cache)


def check_graphable(model: HybridLM, on_cuda: bool, documents: bool, ds_config: dict | None = None) -> None:
    """Every requirement of CUDA-graph training (module docstring), as one-line ConfigErrors naming the
    setting: CUDA; block types whose training forward has fixed shapes; flash-attn's varlen attention for
    packed documents (kernel path); with a DeepSpeed config, ZeRO-2, or ZeRO-1 with bf16 and
    bf16.immediate_grad_update."""
    if not on_cuda:
        raise ConfigError("train.cuda_graph needs CUDA devices: set train.cuda_graph=false on this machine")
    eager_only = sorted({layer.mixer.name for layer in model.layers if not layer.mixer.cuda_graphs})
    if eager_only:
        raise ConfigError(f"train.cuda_graph: block type(s) {', '.join(eager_only)} have data-dependent shapes "
                          "and cannot train inside a CUDA graph: set train.cuda_graph=false")
    if documents and model.impl == "kernels" and not varlen_attention(model):
        raise ConfigError("train.cuda_graph with data.packing=document needs flash-attn's varlen kernel (the documents "
                          "as a fixed-shape input): install requirements-cuda.txt and set model.attn_backend to auto "
                          "or flash, or set data.packing=continuous or train.cuda_graph=false")
    if ds_config is None:
        return
    stage = zero_stage(ds_config)
    if stage == 3:
        raise ConfigError("train.cuda_graph needs ZeRO stage 1 or 2 (train.ds_config is stage 3): ZeRO-3 gathers "
                          "parameters per module, which a graph cannot follow; use ds_configs/zero2.json or "
                          "zero1.json, or set train.cuda_graph=false")
    bf16 = ds_config.get("bf16", {})
    if stage == 1 and not (bf16.get("enabled") and bf16.get("immediate_grad_update")):
        raise ConfigError("train.cuda_graph with ZeRO-1 needs train.precision=bf16 or fp8 and "
                          "bf16.immediate_grad_update=true in train.ds_config (otherwise each replay's gradients are "
                          "added into a buffer the next replay overwrites); use "
                          "ds_configs/zero1.json or zero2.json")


def graph_training_forward(
    model: GraphedLM,
    sample_ids: torch.Tensor,
    ops: CudaGraphs | None = None,
    warmup: int = 3,
    documents: bool = False,
) -> GraphedTrainingForward:
    """Give `model` its dispatcher for training batches shaped like `sample_ids` (b, l) long. Without
    `documents` it captures the plain step from `sample_ids` now; with `documents`, packed batches
    (seq_idx given) replay steps captured on first use per document capacity, and plain calls are
    captured on first use too. Returns the dispatcher. `ops` defaults to CUDA graphs (EagerReplayGraphs
    runs the same plumbing without CUDA)."""
    if not isinstance(model, GraphedLM):
        raise TypeError(f"CUDA-graph training needs a train.graph_step.GraphedLM, got {type(model).__name__}")
    if model.graphs is not None:
        raise RuntimeError("the model's training forward is already graphed")
    if not model.training:
        raise RuntimeError("capture the training forward in train mode (model.train())")
    check_graphable(model, on_cuda=ops is not None or sample_ids.device.type == "cuda", documents=documents)
    dispatcher = GraphedTrainingForward(model, tuple(sample_ids.shape), documents, ops or CudaGraphs(), warmup)
    if not documents:
        dispatcher.prepare(sample_ids)
    model.graphs = dispatcher
    return dispatcher


def varlen_attention(model: HybridLM) -> bool:
    """Whether the model's attention runs packed documents through flash-attn's varlen kernel (the
    one document path whose shapes do not depend on the batch)."""
    backends = {mod.backend for mod in model.modules() if isinstance(mod, Attention)}
    return flash_ops() is not None and backends <= {"auto", "flash"}
