"""Per-GPU memory of a training run, term by term, from the model's shapes and the DeepSpeed config.

All sizes in bytes. P = parameters, D = data-parallel ranks (GPUs), e = bytes of the compute dtype
(2 for bf16). What each ZeRO setting keeps on a GPU (DeepSpeed 0.19, bf16 with fp32 master weights):

  stage 1 (bf16: DeepSpeed's BF16_Optimizer)  params 2P; gradients: a float32 accumulation buffer of
      every parameter (4P, not partitioned) + the bf16 .grad of the parameters that have one (CUDA graphs
      keep them as static tensors): every parameter with train.grad_fold deepspeed or copy_free, and with
      fused_wgrad only those outside the linear layers (the input embedding; norms, conv and SSM scalars are
      left out, < 0.1% of P), unless train.precision=fp8 with torchao's casts (a Float8Linear hands
      autograd a bf16 weight gradient: counted as every parameter); optimizer: float32 master + Adam
      moments of this rank's share (12P/D); comm buffers, on more than one rank: the bf16 cast of the
      float32 sums for the boundary all-reduce (2P)
  stage 2  params 2P; gradients: the float32 partition (4P/D) + the bf16 reduce bucket
      (reduce_bucket_size elements, two with overlap_comm) or, under CUDA graphs, the static bf16 .grad (2P)
  stage 3  params 2P/D + the gathered live parameters (the largest ZeRO-3 leaf twice: in use and
      prefetched, + stage3_prefetch_bucket_size); gradients 4P/D + reduce bucket; optimizer 12P/D
  offload_optimizer  master, moments and float32 gradients live in pinned host memory instead, x 1.5
      (HOST_BUFFER_FACTOR)
  offload_param (stage 3)  the bf16 partition lives on the host too (x 1.5)

Activations: the tensors each block keeps for its backward on the kernel path (counted per token
below, `block_activation_bytes`; the mixer's share by the mixer class itself,
`Mixer.saved_activation_bytes`), times the micro-batch's tokens. Activation checkpointing, in the blocks
train.checkpoint_block_types selects (all by default): full keeps a block's input instead and recomputes one
block at a time in the backward; attention / mlp drop the mixer's / MLP's saved tensors and recompute one at a
time (their input, a norm's output, stays: `block_activation_bytes`' norms term); offload moves every tensor a
block saves, its weights included, to pinned host memory and copies them back in the backward (`activations`).
The Adam moments are allocated at the end of the first step (`first_step` excludes them); under CUDA
graphs the activations live in the graphs' private memory pool, which torch.cuda.max_memory_allocated
does not count after the capture (`allocator_visible`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model.config import ModelConfig
from model.mixers import block_type
from model.sizing import block_params, count_params, mixer_params, mlp_params

CHECKPOINT_MODES = ("none", "full", "attention", "mlp", "offload")
FP32 = 4
# Host bytes per offloaded byte: DeepSpeed's own estimators' additional_buffer_factor (pinned host copies hold
# more than their tensors; docs/planner.md names the run that confirmed it).
HOST_BUFFER_FACTOR = 1.5
# Not in torch's allocator statistics: the CUDA context with cuBLAS/NCCL workspaces, and the caching
# allocator's fragmentation (reserved beyond allocated). The context is what an H100's out-of-memory report
# gives as non-PyTorch memory in a one-GPU DeepSpeed run with NCCL (train.plan_runs.oom_context_bytes reads it
# from the committed log; tests/train/test_plan.py checks the two agree); the fragmentation is assumed, 5% of the
# allocated peak (that report and nvidia-smi's figure in the runs' metrics put it at 3-7%).
CONTEXT_BYTES = 2.46 * 2**30
FRAGMENTATION = 0.05


def checkpoint_mode(value: bool | str | None) -> str:
    """train.activation_checkpointing as one of CHECKPOINT_MODES (false/true are none/full)."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "full"
    mode = str(value).lower()
    if mode in ("false", "true"):
        return "full" if mode == "true" else "none"
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"activation checkpointing {value!r} is unknown; choose one of {', '.join(CHECKPOINT_MODES)}")
    return mode


@dataclass(frozen=True)
class ZeroSetup:
    """What the planner reads from a DeepSpeed JSON (ds_configs/*.json)."""

    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False
    reduce_bucket: int = 200_000_000  # elements
    prefetch_bucket: int = 200_000_000  # elements (stage 3)
    max_live: int = 1_000_000_000  # elements (stage 3)
    overlap_comm: bool = True

    @classmethod
    def from_ds_json(cls, ds: dict[str, Any]) -> ZeroSetup:
        z = ds.get("zero_optimization", {})

        def offloaded(key: str) -> bool:
            return z.get(key, {}).get("device", "none") in ("cpu", "nvme")

        return cls(
            stage=int(z.get("stage", 0)),
            offload_optimizer=offloaded("offload_optimizer"),
            offload_params=offloaded("offload_param"),
            reduce_bucket=int(z.get("reduce_bucket_size", 200_000_000)),
            prefetch_bucket=int(z.get("stage3_prefetch_bucket_size", 200_000_000)),
            max_live=int(z.get("stage3_max_live_parameters", 1_000_000_000)),
            overlap_comm=bool(z.get("overlap_comm", True)),
        )


def largest_leaf_params(cfg: ModelConfig) -> int:
    """Parameters of the largest module ZeRO-3 gathers at once: a block's mixer or MLP (each is one
    leaf on the kernel path, train.trainer.prepare_zero3) or the embedding/head matrix."""
    mixers = max(mixer_params(cfg, kind) for kind in set(cfg.layer_pattern))
    return max(mixers, mlp_params(cfg), cfg.padded_vocab_size * cfg.d_model)


def compute_bytes(precision: str) -> int:
    """Bytes per element of the weights and activations: fp8 training keeps bf16 weights (its float8 exists
    only inside the GEMMs) and, like bf16, DeepSpeed's bf16 optimizer with float32 masters."""
    return FP32 if precision == "fp32" else 2


def model_states(cfg: ModelConfig, zero: ZeroSetup, gpus: int, precision: str = "bf16", cuda_graph: bool = False,
                 grad_fold: str = "fused_wgrad", fp8_casts: str = "torchao", fp8_copies: int = 0) -> dict[str, float]:
    """GPU bytes of params, gradients, optimizer, comm buffers, and host bytes, for one rank. `fp8_casts`:
    train.fp8.casts (torchao's float8 layers hand autograd bf16 weight gradients; `once` adds them to the
    float32 buffers as the bf16 layers do); `fp8_copies`: parameters whose float8 copies
    train.fp8.weight_casts=step keeps for the step (1 byte each in two layouts, counted with the params)."""
    p = count_params(cfg)
    e = compute_bytes(precision)
    mixed = e != FP32  # bf16 weights: float32 masters, bf16 gradients beside the float32 sums
    master = FP32 * p if mixed else 0  # float32 copy the optimizer updates
    moments = 2 * FP32 * p
    bucket = zero.reduce_bucket * e * (2 if zero.overlap_comm else 1)
    out = {"params": e * p / (gpus if zero.stage == 3 else 1) + 2 * fp8_copies, "gradients": 0.0, "optimizer": 0.0,
           "optimizer_moments": 0.0, "comm_buffers": 0.0, "host": 0.0}
    partition = (master + moments + FP32 * p) / gpus  # master, Adam moments, float32 gradients of this rank
    if zero.stage == 1 and not zero.offload_optimizer:
        # weight gradients go to the float32 buffer
        in_linears = grad_fold == "fused_wgrad" and (precision != "fp8" or fp8_casts == "once")
        with_bf16_grad = cfg.padded_vocab_size * cfg.d_model if in_linears else p
        out["gradients"] = FP32 * p + (e * with_bf16_grad if mixed else 0)
        if mixed and gpus > 1:
            # BF16_Optimizer's boundary all-reduce casts each group's float32 sums to bf16 (train/reduction.py;
            # skipped on one rank)
            out["comm_buffers"] += e * p
    elif not zero.offload_optimizer:
        out["gradients"] = FP32 * p / gpus
        if cuda_graph:
            out["gradients"] += e * p
        else:
            out["comm_buffers"] += bucket
    else:
        out["comm_buffers"] += bucket
    if zero.offload_optimizer:
        out["host"] += HOST_BUFFER_FACTOR * partition
    else:
        out["optimizer"] = (master + moments) / gpus
        out["optimizer_moments"] = moments / gpus
    if zero.stage == 3:
        live = min(zero.max_live, 2 * largest_leaf_params(cfg) + zero.prefetch_bucket)
        out["comm_buffers"] += e * live
        if zero.offload_params:
            out["host"] += HOST_BUFFER_FACTOR * out["params"]
            out["params"] = 0.0
    return out


def block_activation_bytes(cfg: ModelConfig, kind: str, e: int = 2, fp8: bool = False) -> dict[str, float]:
    """Bytes per token one block keeps for its backward on the kernel path, by part.

    norms  each RMSNorm's input and output (the next GEMM's input, and the input that checkpointing the
           mixer or the MLP keeps for its recompute): 2 norms x 2 x d
    mlp    SwiGLU: the fused gate|up GEMM output (2 f) and silu(gate)*up, the down GEMM's input (f)
    mixer  what the block type's mixer says it keeps (`Mixer.saved_activation_bytes`: each formula lives
           beside its forward, model/mamba2.py, model/attention.py, model/mixers/; `fp8`: train.precision=fp8)
    """
    d = cfg.d_model
    norms = 2 * 2 * d * e
    mlp = 3 * cfg.ffn_hidden * e
    return {"norms": norms, "mixer": block_type(kind).saved_activation_bytes(cfg, e, fp8), "mlp": mlp}


def head_activation_bytes(cfg: ModelConfig, e: int = 2) -> float:
    """Per token: the final norm's input and output, and the logits (the fused cross-entropy keeps
    the bf16 logits and writes their gradient in place, model/loss.py)."""
    return 2 * cfg.d_model * e + cfg.padded_vocab_size * e


def checkpointed(kind: str, mode: str, block_types: str | None) -> bool:
    """Whether activation checkpointing `mode` applies to a block of pattern letter `kind`:
    train.checkpoint_block_types `block_types` names the letters it applies to (None: every block), as
    train/activation_checkpointing.py's `apply_activation_checkpointing` selects them."""
    return mode != "none" and (block_types is None or kind in block_types)


def activations(cfg: ModelConfig, tokens: int, mode: str, e: int = 2, fp8: bool = False,
                block_types: str | None = None) -> dict[str, float]:
    """GPU bytes of one micro-batch's saved activations (`tokens` = micro-batch x sequence length) by
    block type ("M", "A", ...), plus "head" and "recompute" (the one block part rebuilt at a time in
    the backward), and "host" (what mode offload puts in host memory; not a GPU term).

    `mode` applies to the blocks whose letter is in `block_types` (train.checkpoint_block_types; None:
    every block); the others keep every activation. A selected block keeps, under
      full       its input only (hidden state and residual, 2 d); "recompute" is the largest whole block;
      attention  everything but its mixer's saved tensors (whatever the block type: for M the in-projection,
                 conv and scan): the mixer's input, which the checkpoint keeps, is the mixer norm's output,
                 already counted in `block_activation_bytes`' norms term; "recompute" the largest mixer;
      mlp        the same with its MLP (the MLP's input is the MLP norm's output, counted there too);
      offload    nothing on the GPU between its forward and its backward: torch.autograd.graph.save_on_cpu
                 copies every tensor the block saves to (pinned) host memory and nothing is recomputed. "host"
                 holds the whole block's saved bytes x tokens (fp8's extra included) plus its weights (e x
                 `block_params`: the GEMMs and kernels save them too, and the hook copies every saved tensor;
                 one copy per block and micro-batch). In the backward the block's tensors come back (copied when
                 each backward node unpacks them) and are freed after it: "offload_transient" counts the largest
                 selected block's saved bytes (weights included) on the GPU, and "offload_in_flight" one more
                 such block, the one copied back while the previous one is consumed. Two blocks' worth is a
                 bound: save_on_cpu copies each tensor back on demand on the compute stream, so less may be
                 resident at once. Not counted: torch's pinned host allocator rounds each allocation up to a
                 power of two (CachingHostAllocator; up to 2x per tensor) and caches the blocks it freed.

    `fp8` (train.precision=fp8): each Mamba2 mixer of a block (M's own, the `ssm` of R, G, H) also keeps its
    scan's normed output (d_inner) for the float8 out_proj's backward (`Mamba2Mixer.saved_activation_bytes`).
    With train.fp8.casts=once the same count is an upper bound: those layers keep their inputs in float8 (one
    transposed 1-byte copy where torchao keeps the bf16 tensor), which no committed run has measured yet."""
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"activation checkpointing {mode!r} is unknown; choose one of {', '.join(CHECKPOINT_MODES)}")
    inputs = 2 * cfg.d_model * e  # a block's input: the hidden state and the residual stream
    per_kind: dict[str, float] = {}
    recompute = host = offloaded = 0.0  # offloaded: the largest selected block's saved bytes (offload)
    for kind in cfg.layer_pattern:
        parts = block_activation_bytes(cfg, kind, e, fp8)
        whole = sum(parts.values())
        if not checkpointed(kind, mode, block_types):
            kept = whole
        elif mode == "full":
            kept, recompute = inputs, max(recompute, whole)
        elif mode == "offload":
            block = whole * tokens + e * block_params(cfg, kind)
            kept, host, offloaded = 0.0, host + block, max(offloaded, block)
        elif mode == "attention":
            kept, recompute = whole - parts["mixer"], max(recompute, parts["mixer"])
        else:  # mlp
            kept, recompute = whole - parts["mlp"], max(recompute, parts["mlp"])
        per_kind[kind] = per_kind.get(kind, 0.0) + kept * tokens
    out = {**per_kind, "head": head_activation_bytes(cfg, e) * tokens, "recompute": recompute * tokens, "host": host}
    if offloaded:  # one block's tensors back for its backward, one more copied back while it is consumed
        out["offload_transient"] = out["offload_in_flight"] = offloaded
    return out
