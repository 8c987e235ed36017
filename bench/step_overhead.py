"""What a DeepSpeed optimizer step costs on top of forward+backward, micro-batch by micro-batch.

At 1 x 8192 on one H100 the graphed 1.3B forward+backward alone ran 48k tokens/s but the ZeRO-2 step
42k: about 25 ms per 8,192-token micro-batch go to the engine. This script splits that time. One
model, one batch; each variant times the micro-batches of --steps optimizer steps (--grad-accum
micro-batches each, a device sync after every micro-batch):
  fwd_bwd         no engine: forward+backward in bf16, autograd accumulating bf16 .grad (the floor)
  zero2           ds_configs/zero2.json as shipped (overlap_comm, contiguous gradients, fp32 accumulation)
  zero2 <key=v>   the same with settings changed (--variants; `key` in zero_optimization, or a dotted
                  path such as bf16.check_grad_overflow)
  zero1           ds_configs/zero1.json as shipped (bf16.immediate_grad_update: DeepSpeed's BF16_Optimizer
                  folds each gradient into its fp32 buffer in the gradient hook), with train.grad_fold's
                  default as training installs it (fused_wgrad: the linear layers' weight-gradient GEMMs add
                  into those buffers, the other gradients fold without a float32 copy)
  zero1 copy_free_fold   the same with every gradient folded without the copy (train.grad_fold copy_free)
  zero1 deepspeed_fold   the same with DeepSpeed's own fold (a float32 copy of each gradient first)
Columns: micro_ms (median of the micro-batches that do not step the optimizer), boundary_ms (median of
those that do), overhead_ms (micro_ms minus fwd_bwd's), tokens_per_s of the whole step, peak memory.
With --profile, the top ops (by host and by device time) of one micro-batch that does not step the
optimizer and one that does, of the first engine variant (JSON only).

The forward and backward replay CUDA graphs on CUDA (train/graph_step.py, what train.cuda_graph
does: the engine's share is then not hidden behind launch gaps); on CPU their eager stand-in
(EagerReplayGraphs). Timing only: every micro-batch is the same batch, so this script cannot tell
right gradients from wrong ones; bench/grad_norm_check.py does (ZeRO-1 without
bf16.immediate_grad_update fails it under the graphs).

    python bench/step_overhead.py --preset 1.3b --seq-len 8192
    python bench/step_overhead.py --smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from bench import peers  # noqa: E402
from bench.common import RESULTS, environment, median, sync, write_results  # noqa: E402
from bench.profile_step import kernel_gaps  # noqa: E402
from bench.train_step_throughput import ZERO_JSONS, build_engine, ds_config  # noqa: E402
from config.base import deep_merge  # noqa: E402
from model import ModelConfig  # noqa: E402
from train.graph_step import EagerReplayGraphs, graph_training_forward  # noqa: E402
from train.grad_fold import DEFAULT_FOLD  # noqa: E402

NAME = "step_overhead"
COLUMNS = ["variant", "micro_ms", "boundary_ms", "overhead_ms", "tokens_per_s", "peak_mem_gb", "status"]
DEFAULT_VARIANTS = "zero2,zero2 overlap_comm=false,zero2 contiguous_gradients=false,zero2 reduce_bucket_size=2e9,zero1"


def parse_value(text: str) -> bool | int | str:
    """A variant's value: true/false, a number (5e8 allowed), else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(float(text))
    except ValueError:
        return text


FOLD_WORDS = {"deepspeed_fold": "deepspeed", "copy_free_fold": "copy_free"}  # variant word -> train.grad_fold fold


def parse_variant(text: str) -> tuple[int, dict, str]:
    """'zero2 key=value ...' -> (stage, overrides of the DeepSpeed config, gradient fold). A key without a
    dot is a zero_optimization key; a dotted key is a path from the top (bf16.check_grad_overflow=false);
    a word of FOLD_WORDS picks ZeRO-1's gradient fold (train/grad_fold.py; default fused_wgrad)."""
    head, *pairs = text.split()
    if head not in ("zero1", "zero2"):
        raise argparse.ArgumentTypeError(f"variant {text!r}: start with zero1 or zero2")
    overrides: dict = {"zero_optimization": {}}
    folds = [FOLD_WORDS[p] for p in pairs if p in FOLD_WORDS]
    for pair in (p for p in pairs if p not in FOLD_WORDS):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"variant {text!r}: '{pair}' is not key=value")
        *path, leaf = key.split(".") if "." in key else ["zero_optimization", key]
        node = overrides
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = parse_value(value)
    if len(folds) > 1:
        raise argparse.ArgumentTypeError(f"variant {text!r}: one fold word at most")
    return int(head[-1]), overrides, folds[0] if folds else DEFAULT_FOLD


def micro_times(run_micro, grad_accum: int, steps: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Seconds of each micro-batch over `steps` optimizer steps after one untimed step: (those that
    do not step the optimizer, those that do)."""
    for i in range(grad_accum):
        run_micro(i == grad_accum - 1)
    sync(device)
    inner, boundary = [], []
    for _ in range(steps):
        for i in range(grad_accum):
            last = i == grad_accum - 1
            t0 = time.perf_counter()
            run_micro(last)
            sync(device)
            (boundary if last else inner).append(time.perf_counter() - t0)
    return inner, boundary


def timing_row(inner: list[float], boundary: list[float], device: torch.device) -> dict:
    """Median milliseconds of the two kinds of micro-batch, and the peak device memory so far."""
    row = {"micro_ms": 1e3 * median(inner), "boundary_ms": 1e3 * median(boundary)}
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return row


def profile_micro(run_micro, last: bool, device: torch.device, top: int = 20) -> dict:
    """The top ops of one micro-batch (stepping the optimizer if `last`), by host and by device self time,
    and on CUDA the GPU's busy and idle time over it (profile_step.kernel_gaps: the idle time from the
    first kernel to the last, and the waits of 1 ms or more for the host)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run_micro(last)
        sync(device)
    events = [{"op": e.key[:90], "calls": e.count, "host_ms": e.self_cpu_time_total / 1e3,
               "device_ms": getattr(e, "self_device_time_total", 0) / 1e3} for e in prof.key_averages()]
    found: dict = {f"by_{key.split('_')[0]}": sorted(events, key=lambda e: e[key], reverse=True)[:top]
                   for key in ("host_ms", "device_ms")}
    if device.type == "cuda":
        found["gaps"] = kernel_gaps(prof.events(), steps=1)
    return found


def floor_variant(cfg: ModelConfig, ids: torch.Tensor, args: argparse.Namespace, device: torch.device) -> dict:
    """Forward+backward alone: bf16 model (float32 on CPU), autograd accumulating into .grad. Timing
    only: under the graphs `.grad` can alias the graph's gradient buffer (train/graph_step.py), so the
    accumulated values are not meaningful; the add per parameter is the cost being timed."""
    model = peers.build("ours", cfg, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    install_graphs(model, ids)

    def run_micro(last: bool) -> None:
        peers.train_loss("ours", model, ids).backward()
        if last:
            model.zero_grad(set_to_none=True)

    return timing_row(*micro_times(run_micro, args.grad_accum, args.steps, device), device)


def install_graphs(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """The training graphs: CUDA graphs on CUDA, their eager stand-in elsewhere (same plumbing)."""
    graph_training_forward(model, ids[:, :-1], ops=None if ids.is_cuda else EagerReplayGraphs())


def engine_variant(cfg: ModelConfig, ids: torch.Tensor, stage: int, overrides: dict, fold: str,
                   args: argparse.Namespace, device: torch.device, profile: bool) -> dict:
    """The DeepSpeed step with ZeRO `stage` and `overrides` on the run's config for this batch shape."""
    micro_batch, seq = ids.shape[0], ids.shape[1] - 1
    config = deep_merge(ds_config(seq, micro_batch, args.grad_accum, device.type == "cuda", ZERO_JSONS[stage]),
                        overrides)
    torch.manual_seed(0)  # the same initial weights for every variant
    model, engine = build_engine("ours", cfg, device, config, fold)
    try:
        install_graphs(model, ids)

        def run_micro(last: bool) -> None:
            engine.backward(engine(ids))
            engine.step()

        inner, boundary = micro_times(run_micro, args.grad_accum, args.steps, device)
        row = timing_row(inner, boundary, device)
        if profile:  # micro_times ended on a step: the next micro-batch does not step, the last one does
            row["profile"] = profile_micro(run_micro, False, device)
            for _ in range(args.grad_accum - 2):
                run_micro(False)
            row["profile_step"] = profile_micro(run_micro, True, device)
        return row
    finally:
        engine.destroy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps per variant")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="comma-separated engine variants: zero1|zero2 [key=value ...] (zero_optimization keys or dotted paths)")
    ap.add_argument("--profile", action="store_true", help="profile micro-batches of the first engine variant")
    ap.add_argument("--smoke", action="store_true", help="tiny preset, 32 tokens, 2 micro-batches, 1 step")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset, args.seq_len, args.grad_accum, args.steps = "tiny", 32, 2, 1
    variants = [(v.strip(), *parse_variant(v.strip())) for v in args.variants.split(",")]
    from train.distributed import init_distributed

    device = init_distributed().device  # a world of one: NCCL on GPU, gloo on CPU
    torch.manual_seed(0)
    cfg = peers.fit_length(ModelConfig(preset=args.preset), args.seq_len)
    ids = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq_len + 1), device=device)
    tokens_per_step = args.micro_batch * args.seq_len * args.grad_accum
    meta = environment(device) | {"preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                                  "grad_accum": args.grad_accum, "steps": args.steps,
                                  "cuda_graph": device.type == "cuda"}
    name = args.name or f"{NAME}_{args.preset}" + ("_smoke" if args.smoke else "")
    title = f"DeepSpeed step cost per micro-batch, {args.preset}, {args.micro_batch} x {args.seq_len}: {meta['device']}"
    rows: list[dict] = []
    jobs = [("fwd_bwd", lambda: floor_variant(cfg, ids, args, device))]
    for k, (label, stage, overrides, fold) in enumerate(variants):
        jobs.append((label, lambda s=stage, o=overrides, f=fold, p=args.profile and k == 0:
                     engine_variant(cfg, ids, s, o, f, args, device, p)))
    with peers.startup_objects_frozen():  # each row's memory release collects only what the rows built
        for label, job in jobs:
            row = {"variant": label} | peers.run_guarded(job, device)  # releases memory, restarts the peak
            if row["status"] == "ok":
                step_s = ((args.grad_accum - 1) * row["micro_ms"] + row["boundary_ms"]) / 1e3
                row["tokens_per_s"] = tokens_per_step / step_s
                if rows and "micro_ms" in rows[0]:
                    row["overhead_ms"] = row["micro_ms"] - rows[0]["micro_ms"]
            rows.append(row)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items() if k != "profile"}, flush=True)
            write_results(name, rows, meta, COLUMNS, args.out, title=title)
    print(f"wrote {args.out / name}.json/.md", flush=True)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
