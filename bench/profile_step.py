"""Profile one forward+backward step (or, with --decode, one cached decode step) of a preset: top
ops by time, and wall vs kernel time.

Answers "where does a step spend its time" so the next optimisation targets the largest cost.
Warm-up steps (Triton autotune/compile) run first and are not profiled. Two views of the same
profile: ops by device time (`--sort device`, what the GPU does) and by host time (`--sort cpu`,
what the Python side launches; a step whose wall time exceeds its kernel time is launch-bound).

    python bench/profile_step.py --preset 1.3b --seq-len 4096 --batch 2
    python bench/profile_step.py --preset 1.3b --decode --seq-len 1024 --sort cpu
    python bench/profile_step.py --preset 1.3b --kernels --cuda-graph --fp8 tensorwise   # float8 (train/fp8.py)
    python bench/profile_step.py --smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from pydantic import ValidationError
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from bench.common import RESULTS, bench_model, environment, sync, write_results  # noqa: E402
from bench.peers import attention_twin  # noqa: E402
from config.sections import FP8Config  # noqa: E402
from model import ModelConfig  # noqa: E402
from train.activation_checkpointing import apply_activation_checkpointing  # noqa: E402
from train.fp8 import convert_to_fp8, step_weights  # noqa: E402
from train.graph_step import graph_training_forward  # noqa: E402

GAP_BINS_US = (2, 5, 10, 20, 50, 1000)
PROFILED_STEPS = 2  # every per-step figure is the profile's total over this many steps


def kernel_gaps(events: list, steps: int, top: int = 15) -> dict:
    """The GPU's idle time between consecutive kernels of `steps` profiled steps (one stream of work):
    gaps under 1 ms (kernel to kernel) summed per step and binned by length, with the largest and the
    kernels on either side; gaps of 1 ms or more (the GPU waiting for the host) listed apart, each with
    its neighbours (with two steps, one of them is the pause between them)."""
    kernels = sorted((e for e in events if e.device_type == DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    if not kernels:
        return {}
    gaps = [(b.time_range.start - a.time_range.end, a.name, b.name) for a, b in zip(kernels, kernels[1:])]
    inside = [g for g in gaps if g[0] < 1000]
    edges = (0, *GAP_BINS_US)
    bins = {f"{lo}-{hi} us": [g[0] for g in inside if lo <= g[0] < hi] for lo, hi in zip(edges, edges[1:])}

    def listed(chosen: list) -> list[dict]:
        return [{"us": round(g[0], 1), "after": g[1][:80], "before": g[2][:80]} for g in chosen]

    return {"kernels_per_step": len(kernels) / steps,
            "idle_ms_per_step": sum(max(g[0], 0) for g in inside) / steps / 1e3,
            "busy_ms_per_step": sum(e.time_range.elapsed_us() for e in kernels) / steps / 1e3,
            "bins": {k: {"count_per_step": len(v) / steps, "ms_per_step": sum(v) / steps / 1e3}
                     for k, v in bins.items()},
            "largest": listed(sorted(inside, reverse=True)[:top]),
            "host_waits": listed([g for g in gaps if g[0] >= 1000])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--act-ckpt", action="store_true")
    ap.add_argument("--twin", action="store_true",
                    help="the preset's all-attention twin (bench/peers.attention_twin: same size, wider MLPs)")
    ap.add_argument("--decode", action="store_true", help="profile one decode step after a --seq-len prompt")
    ap.add_argument("--sort", choices=("device", "cpu"), default="device", help="rank ops by device or host time")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--kernels", action="store_true",
                    help="device kernels alone (not the ops that launch them): the total is the GPU's busy time")
    ap.add_argument("--name", default=None, help="results file name (default profile_step_PRESET)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="replay the training forward and backward as CUDA graphs (train/graph_step.py), and "
                         "measure the GPU's idle time between kernels (JSON `gaps`)")
    ap.add_argument("--fp8", choices=("tensorwise", "rowwise"), default=None,
                    help="the linear layers train.precision=fp8 converts, in float8 with this recipe (train/fp8.py, "
                         "its defaults: compiled, first and last block bf16); --smoke emulates the float8 GEMMs")
    ap.add_argument("--fp8-casts", choices=("torchao", "once"), default="torchao",
                    help="train.fp8.casts: torchao's Float8Linear or train/fp8_linear.py's cast-once layers")
    ap.add_argument("--fp8-weight-casts", choices=("call", "step"), default="call",
                    help="train.fp8.weight_casts (with --fp8-casts once): step recasts the weights once per profiled "
                         "step, as the trainer does once per optimizer step")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.cuda_graph and (device.type != "cuda" or args.decode):
        ap.error("--cuda-graph: the training step on CUDA (not with --smoke or --decode)")
    preset, seq, batch = ("tiny", 64, 1) if args.smoke else (args.preset, args.seq_len, args.batch)
    cfg = ModelConfig(preset=preset)
    if args.twin:
        cfg = attention_twin(cfg)
    model = bench_model(cfg, device)
    try:
        fp8 = FP8Config(recipe=args.fp8, casts=args.fp8_casts, weight_casts=args.fp8_weight_casts) if args.fp8 else None
    except ValidationError as exc:
        ap.error(exc.errors()[0]["msg"].removeprefix("Value error, "))
    converted = convert_to_fp8(model, fp8, emulate=args.smoke) if fp8 else []
    steps = step_weights(model)
    apply_activation_checkpointing(model, "full" if args.act_ckpt else "none")
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)

    if args.decode:
        model.eval()
        with torch.inference_mode():
            logits, cache = model.prefill(ids[:, :-1])
        token = [logits.argmax(-1)]

        @torch.inference_mode()
        def step() -> None:
            token[0] = model.step(token[0], cache).argmax(-1)
    else:
        if args.cuda_graph:
            graph_training_forward(model, ids[:, :-1])

        def step() -> None:
            with steps.step() if steps is not None else nullcontext():  # weight_casts=step: one recast per step
                model.loss(ids[:, :-1], ids[:, 1:]).backward()
            for p in model.parameters():
                p.grad = None

    for _ in range(3):
        step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(PROFILED_STEPS):
            step()
        sync(device)
    wall = (time.perf_counter() - t0) / PROFILED_STEPS
    on_device = device.type == "cuda" and args.sort == "device"
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    if args.kernels and on_device:
        events = [e for e in events if e.device_type == DeviceType.CUDA]
    total = sum(getattr(e, key) for e in events) / PROFILED_STEPS
    rows = []
    for e in events[: args.top]:
        t = getattr(e, key) / PROFILED_STEPS
        rows.append({"op": e.key[:90], "calls_per_step": e.count // PROFILED_STEPS, "ms_per_step": t / 1e3,
                     "share": t / total if total else 0.0})
    meta = environment(device) | {"preset": preset, "twin": args.twin, "pattern": cfg.layer_pattern, "batch": batch,
                                  "seq_len": seq, "act_ckpt": args.act_ckpt, "decode": args.decode,
                                  "wall_ms_per_step": wall * 1e3, "profiled_ms_per_step": total / 1e3,
                                  "timer": key, "kernels_only": args.kernels and on_device,
                                  "cuda_graph": args.cuda_graph, "fp8": args.fp8,
                                  "fp8_casts": args.fp8_casts if args.fp8 else None,
                                  "fp8_weight_casts": args.fp8_weight_casts if args.fp8 else None,
                                  "fp8_linears": len(converted)}
    if device.type == "cuda":
        meta["gaps"] = kernel_gaps(prof.events(), PROFILED_STEPS)
    kind = "decode" if args.decode else "step"
    default = f"profile_{kind}_smoke" if args.smoke else f"profile_{kind}_{preset}" + (
        "_cpu_time" if key.startswith("self_cpu") and device.type == "cuda" else "")
    name = args.name or default
    write_results(name, rows, meta, ["op", "calls_per_step", "ms_per_step", "share"], args.out or RESULTS,
                  title=(f"One decode step of {preset}, batch {batch}, context {seq}" if args.decode else
                         f"One fwd+bwd step of {preset}, {batch}x{seq}" + (
                             f", float8 {args.fp8} (casts {args.fp8_casts}, weight casts per {args.fp8_weight_casts})"
                             if args.fp8 else "")) +
                  f": wall {wall * 1e3:.1f} ms, profiled {'kernels' if on_device else 'host ops'} {total / 1e3:.1f} ms"
                  + (f", GPU idle between kernels {meta['gaps']['idle_ms_per_step']:.1f} ms"
                     if meta.get("gaps") else ""))
    print(f"wall {wall * 1e3:.1f} ms/step, profiled {total / 1e3:.1f} ms/step")
    if meta.get("gaps"):
        gaps = meta["gaps"]
        print(f"GPU: {gaps['kernels_per_step']:.0f} kernels, busy {gaps['busy_ms_per_step']:.1f} ms, idle between "
              f"kernels {gaps['idle_ms_per_step']:.1f} ms per step; waits >= 1 ms: {gaps['host_waits']}")
    for r in rows[:20]:
        print(f"{r['ms_per_step']:9.2f} ms {100 * r['share']:5.1f}% x{r['calls_per_step']:<5} {r['op']}")


if __name__ == "__main__":
    main()
