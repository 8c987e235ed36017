"""Predicted training tokens/s per GPU from measured per-layer costs (bench/results/).

Inputs, all read from committed result files (their device, date and command are in each file):
  BLOCK_COSTS (block_costs_1.3b_h100_<date>.json)  forward+backward ms of each block part (Mamba2 mixer, attention
      mixer, MLP, norm, LM head + loss) at one preset's widths (bench/block_costs.py)
  step_overhead_*.json            what DeepSpeed adds per micro-batch (overhead_ms) and per optimizer
      step (boundary_ms - micro_ms) for ZeRO-1 and ZeRO-2 (bench/step_overhead.py); the newest file
      holding each variant
Scaling assumptions (stated in every plan):
  - a part's time scales with its forward FLOPs per token (model.sizing's terms) at the measured
    efficiency: wider layers run GEMMs at least as efficiently, so this errs slow for 2.7B-13B;
  - the H200 runs the same kernels in the same time as the H100 (same SMs and clocks; its faster memory
    only helps the memory-bound parts);
  - DeepSpeed's per-micro-batch cost scales with the parameters P, its optimizer step with P / GPUs;
    ZeRO-3 is charged ZeRO-2's costs (its parameter gathers overlap the compute; no ZeRO-3 run measured);
  - activation checkpointing recomputes the forward of what it drops: +1/3 of that part's time; mode offload
    recomputes nothing and copies each selected block's saved tensors (and weights: train.plan_memory.activations'
    "host") to the host in the forward and back in the backward at PCIE_BYTES_PER_S, not overlapped;
  - several GPUs: gradient/parameter communication overlapped with compute to 95% efficiency within a
    node (<= 8 GPUs) and 90% across nodes (docs/cluster.md; no multi-GPU run committed yet);
  - CPU optimizer offload: DeepSpeedCPUAdam at CPU_ADAM_PARAMS_PER_S and the float32 gradients down,
    bf16 parameters up over PCIe at PCIE_BYTES_PER_S, not overlapped; parameter offload moves the
    bf16 shard up twice per micro-batch (forward and backward).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from model.config import ATTENTION, MAMBA, ModelConfig
from model.mixers import block_type
from model.sizing import count_params, mlp_params
from train.plan_memory import ZeroSetup, activations, checkpointed

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
BLOCK_COSTS = "block_costs_1.3b_h100_2026-11-24.json"
# Not measured here (stated in every plan that offloads): DeepSpeedCPUAdam's rate on a 16-32 core host
# (the ZeRO-Offload paper's range) and effective PCIe 5 x16 host<->device bandwidth.
CPU_ADAM_PARAMS_PER_S = 1.0e9
PCIE_BYTES_PER_S = 25e9
INTRA_NODE_EFFICIENCY, INTER_NODE_EFFICIENCY = 0.95, 0.90
GPUS_PER_NODE = 8


class MissingMeasurement(ValueError):
    """A committed result the prediction needs is absent."""


@dataclass
class Speed:
    tokens_per_s: float  # per GPU
    micro_ms: float  # one micro-batch's forward + backward (+ recompute + DeepSpeed's per-micro cost)
    boundary_ms: float  # the optimizer step
    sources: list[str] = field(default_factory=list)


@lru_cache(maxsize=8)
def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _mixer_flops(cfg: ModelConfig, kind: str, seq_len: int) -> float:
    bt = block_type(kind)
    return 2.0 * bt.matmul_params(cfg) + sum(bt.core_flops(cfg, seq_len).values())


def part_ms_per_token(cfg: ModelConfig, seq_len: int, results: Path = RESULTS) -> tuple[dict[str, float], str]:
    """ms per token of each part at `cfg`'s widths: "M", "A" (mixers), "mlp", "norm", "head"."""
    path = results / BLOCK_COSTS
    if not path.is_file():
        raise MissingMeasurement(f"{path} is missing: the per-layer costs come from bench/block_costs.py")
    data = _json(path)
    ref = ModelConfig(preset=data["meta"]["preset"])
    tokens = data["meta"]["tokens"]
    rows = [r for r in data["rows"] if r.get("ms") and r["part"] != "estimate"]
    ref_len = min({r["seq_len"] for r in rows}, key=lambda s: abs(s - seq_len))
    at_len = [r for r in rows if r["seq_len"] == ref_len]

    def ms(part: str, prefer: str) -> float:
        cands = [r for r in at_len if r["part"] == part]
        pick = next((r for r in cands if prefer in r["variant"]), cands[0])
        return pick["ms"] / tokens

    chunk = f"chunk {cfg.mamba.chunk_size}"
    out = {
        MAMBA: ms("mamba_mixer", chunk) * _mixer_flops(cfg, MAMBA, seq_len) / _mixer_flops(ref, MAMBA, ref_len),
        ATTENTION: ms("attention_mixer", "sdpa") * _mixer_flops(cfg, ATTENTION, seq_len) / _mixer_flops(ref, ATTENTION,
                                                                                                      ref_len),
        "mlp": ms("mlp", "ours") * mlp_params(cfg) / mlp_params(ref),
        "norm": ms("norm", "fused") * cfg.d_model / ref.d_model,
        "head": ms("head_loss", "") * cfg.padded_vocab_size * cfg.d_model / (ref.padded_vocab_size * ref.d_model),
    }
    return out, f"{path.name} ({data['meta']['device']}, {data['meta']['date']}, seq {ref_len})"


def deepspeed_ms(stage: int, results: Path = RESULTS) -> tuple[float, float, float, str]:
    """(per-micro-batch ms, optimizer-step ms, parameters of the measured model, source) of ZeRO `stage`
    (stage 3: stage 2's, see the module doc)."""
    variant = f"zero{min(stage, 2)}"
    best = None
    for path in sorted(results.glob("step_overhead_*.json")):
        data = _json(path)
        for row in data.get("rows", []):
            newer = best is None or data["meta"]["date"] > best[0]["meta"]["date"]
            if row.get("variant") == variant and row.get("status") == "ok" and newer:
                best = (data, row, path)
    if best is None:
        raise MissingMeasurement(f"no {variant} row in {results}/step_overhead_*.json (bench/step_overhead.py)")
    data, row, path = best
    params = count_params(ModelConfig(preset=data["meta"]["preset"]))
    return (max(row["overhead_ms"], 0.0), row["boundary_ms"] - row["micro_ms"], params,
            f"{path.name} {variant} ({data['meta']['device']}, {data['meta']['date']})")


def scaling_efficiency(gpus: int) -> float:
    if gpus == 1:
        return 1.0
    return INTRA_NODE_EFFICIENCY if gpus <= GPUS_PER_NODE else INTER_NODE_EFFICIENCY


def predict(cfg: ModelConfig, seq_len: int, micro_batch: int, accumulation: int, zero: ZeroSetup, gpus: int,
            mode: str, results: Path = RESULTS, block_types: str | None = None, e: int = 2,
            fp8: bool = False) -> Speed:
    """Tokens/s per GPU of one optimizer step of `accumulation` micro-batches of micro_batch x seq_len.
    `mode` recomputes in the blocks whose letter is in `block_types` (train.checkpoint_block_types; None:
    all): full the whole block, attention its mixer (any block type's), mlp its MLP; offload recomputes
    nothing and moves the blocks' saved bytes (`e` bytes per element, `fp8` train.precision=fp8: the
    activations' sizes) down and up over PCIe, not overlapped."""
    parts, src_blocks = part_ms_per_token(cfg, seq_len, results)
    redo = 4.0 / 3.0
    per_token = parts["head"] + parts["norm"]
    for kind in cfg.layer_pattern:
        if kind not in parts:
            raise MissingMeasurement(f"no measured cost for block type {kind!r} in {BLOCK_COSTS}")
        mixer, mlp, norms = parts[kind], parts["mlp"], 2 * parts["norm"]
        if not checkpointed(kind, mode, block_types):
            pass
        elif mode == "full":
            mixer, mlp, norms = mixer * redo, mlp * redo, norms * redo
        elif mode == "attention":
            mixer *= redo
        elif mode == "mlp":
            mlp *= redo
        per_token += mixer + mlp + norms
    tokens = micro_batch * seq_len
    micro_over, boundary, ref_params, src_ds = deepspeed_ms(zero.stage, results)
    p = count_params(cfg)
    micro = per_token * tokens + micro_over * p / ref_params
    step = boundary * p / (ref_params * gpus)
    if zero.offload_optimizer:
        step = 1e3 * (p / gpus / CPU_ADAM_PARAMS_PER_S + 6 * p / gpus / PCIE_BYTES_PER_S)
    if zero.offload_params:
        micro += 1e3 * 2 * 2 * p / gpus / PCIE_BYTES_PER_S
    if mode == "offload":  # device -> host in the forward, host -> device in the backward
        micro += 1e3 * 2 * activations(cfg, tokens, mode, e, fp8, block_types)["host"] / PCIE_BYTES_PER_S
    total_ms = accumulation * micro + step
    rate = tokens * accumulation / (total_ms / 1e3) * scaling_efficiency(gpus)
    return Speed(rate, micro, step, [src_blocks, src_ds])
