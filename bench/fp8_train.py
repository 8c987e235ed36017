"""bf16 against float8 training (train.precision=fp8, train/fp8.py) in `launch/pretrain.py`, one GPU, the same
settings and data: tokens/s, peak memory and the smoothed training loss of each run, the curves in one PNG.

    python bench/fp8_train.py --config 1.3b --variants bf16,fp8,fp8_rowwise:30 --steps 300 \\
        --set data.manifest=outputs/embedded/manifest.json --set model.vocab_size=8192 --out DIR
    python bench/fp8_train.py --smoke --set data.manifest=M --set model.vocab_size=V --out /tmp/fp8  # CPU (fp32)

Each variant is one fresh launch (`name` or `name:steps`, the variant's own step count: a throughput-only
row): bf16; fp8 (tensorwise); fp8_rowwise; fp32 (the CPU smoke). The settings besides the precision are
FAST_SETS (ZeRO-1 with the fused weight-gradient fold and CUDA graphs: the fastest bf16 setting,
bench/results/pretrain_1.3b_zero1_registry_graph_h200_2026-12-06.md) plus --set. Per run: steady tokens/s (median over
the steps after STEADY_AFTER: start-up, torch.compile and the graph capture apart), peak memory over the steps
after the first (the capture's) and of the first, and the training loss smoothed over the last SMOOTH steps;
each run of the first variant's length is compared with it (tokens/s ratio, smoothed-loss difference in %).
Writes <name>.json (with every step's loss), <name>.md, <name>.png, <name>_launch.log and each run's
metrics.jsonl (<name>_<variant>_metrics.jsonl) to --out; `bash bench/run.sh fp8:1.3b` and `fp8:2.7b` are the
GPU commands.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the repo's packages first

from bench.common import RESULTS, environment, pyplot, save_figure, write_results  # noqa: E402
from bench.scale_runs import (  # noqa: E402
    RUN_SETS,
    SMOKE_SETS,
    _device,
    check_runs,
    deepspeed_cmd,
    fresh_work,
    launch_logged,
)
from train.metrics import read_metrics  # noqa: E402

VARIANTS = {
    "bf16": ["train.precision=bf16"],
    "fp8": ["train.precision=fp8", "train.fp8.recipe=tensorwise"],
    "fp8_rowwise": ["train.precision=fp8", "train.fp8.recipe=rowwise"],
    "fp8_once": ["train.precision=fp8", "train.fp8.recipe=tensorwise", "train.fp8.casts=once"],
    "fp8_once_step": ["train.precision=fp8", "train.fp8.recipe=tensorwise", "train.fp8.casts=once",
                      "train.fp8.weight_casts=step"],
    "fp32": ["train.precision=fp32"],
}
FAST_SETS = ["train.cuda_graph=true", "train.ds_config=ds_configs/zero1.json", "train.grad_fold=fused_wgrad",
             "data.packing=continuous", "train.eval_every=0", "train.log_every=10", "train.wandb.mode=disabled"]
STEADY_AFTER = 10  # steps left out of tokens/s: start-up, compilation, graph capture
SMOOTH = 50  # steps of the trailing mean that smooths the loss
COLUMNS = ["variant", "steps", "tokens_per_step", "tokens_per_s", "speedup", "peak_mem_gb", "first_step_mem_gb",
           "loss_smoothed", "loss_diff_pct", "status"]


def parse_variants(spec: str, steps: int) -> list[tuple[str, int]]:
    """'bf16,fp8,fp8_rowwise:40' -> [(name, steps)]; SystemExit (one line) for an unknown name."""
    out = []
    for item in spec.split(","):
        name, _, n = item.partition(":")
        if name not in VARIANTS:
            raise SystemExit(f"error: unknown variant {name!r}: choose from {', '.join(VARIANTS)}")
        out.append((name, int(n) if n else steps))
    return out


def smoothed(losses: list[float], window: int = SMOOTH) -> list[float]:
    """Trailing mean over the last `window` values at each step."""
    out, total = [], 0.0
    for i, x in enumerate(losses):
        total += x - (losses[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def summarise(variant: str, run_dir: Path, rc: int) -> dict:
    """One row from a run's metrics.jsonl (the per-step losses kept for the plot)."""
    steps = {s: r for s, r in sorted(read_metrics(run_dir).items()) if "loss" in r}
    row: dict = {"variant": variant, "steps": len(steps), "status": "ok" if rc == 0 else f"exit {rc}"}
    if not steps:
        return row
    rates = {s: r["tokens_per_s"] for s, r in steps.items()}
    steady = [v for s, v in rates.items() if s > STEADY_AFTER] or list(rates.values())
    mems = [r.get("mem_gb") or 0.0 for s, r in steps.items() if s > 1]
    losses = [r["loss"] for r in steps.values()]
    last = steps[max(steps)]
    row.update(tokens_per_step=last["tokens"] // max(steps), tokens_per_s=statistics.median(steady),
               peak_mem_gb=max(mems, default=None), first_step_mem_gb=steps[min(steps)].get("mem_gb"),
               loss_smoothed=smoothed(losses)[-1], losses=losses)
    return row


def compare(rows: list[dict]) -> None:
    """Speedup and smoothed-loss difference of each row against the first (runs of its length only)."""
    ref = rows[0]
    for row in rows:
        if row.get("tokens_per_s") and ref.get("tokens_per_s"):
            row["speedup"] = row["tokens_per_s"] / ref["tokens_per_s"]
        if row.get("steps") == ref.get("steps") and row.get("loss_smoothed") and ref.get("loss_smoothed"):
            row["loss_diff_pct"] = 100 * (row["loss_smoothed"] / ref["loss_smoothed"] - 1)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """The training loss of every run (thin) and its trailing mean (thick) against the step."""
    fig, ax = pyplot().subplots(figsize=(8, 4.5))
    for i, row in enumerate(r for r in rows if r.get("losses")):
        steps = range(1, len(row["losses"]) + 1)
        ax.plot(steps, row["losses"], color=f"C{i}", alpha=0.25, linewidth=0.8)
        ax.plot(steps, smoothed(row["losses"]), color=f"C{i}", linewidth=1.8,
                label=f"{row['variant']}, {row['steps']} steps (trailing mean of {SMOOTH})")
    ax.set(xlabel="optimizer step", ylabel="training loss (nats/token)", title=title)
    ax.set_ylim(top=min(ax.get_ylim()[1], 8.0))  # the first steps' loss (~ln vocab) would flatten the curves
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="1.3b", help="run config name or YAML")
    ap.add_argument("--variants", default="bf16,fp8",
                    help=f"comma-separated NAME[:STEPS], NAME one of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps of a variant without its own count")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per launch")
    ap.add_argument("--smoke", action="store_true", help="CPU: the tiny preset, fp32 then a short fp32 run")
    ap.add_argument("--check", action="store_true", help="validate every run's config, launch nothing")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument("--work", type=Path, help="run folders (default <out>/<name>_runs)")
    ap.add_argument("--name", help="results file name (default fp8_train_<config>)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # keep what was written
    base = [*RUN_SETS, *FAST_SETS]
    if args.smoke:  # no CUDA graphs, ZeRO-1's bf16 fold or float8 on CPU: the driver and its files only
        args.config, args.steps, args.variants = "tiny", 6, "fp32,fp32:3"
        base = [*RUN_SETS, *SMOKE_SETS, "train.ds_config=ds_configs/zero2.json"]
    variants = parse_variants(args.variants, args.steps)
    runs = {}
    for i, (variant, steps) in enumerate(variants):
        sets = [*base, *VARIANTS[variant], *args.sets, f"train.max_steps={steps}"]
        if not any(s.startswith("train.warmup_steps=") for s in args.sets):
            sets.append(f"train.warmup_steps={max(1, steps // 10)}")
        check_runs(args.config, sets, [1])  # every run validated before the first launch
        runs[f"{i}_{variant}_{steps}"] = (variant, sets)
    if args.check:
        print(f"{args.config}: run configs valid for {args.variants}")
        return 0
    name = args.name or f"fp8_train_{Path(args.config).stem}" + ("_smoke" if args.smoke else "")
    work, log = fresh_work(args.work or args.out, name)
    meta = environment(_device()) | {"config": args.config, "variants": args.variants, "base_sets": base,
                                     "extra_sets": args.sets, "steady_after": STEADY_AFTER, "smooth": SMOOTH}
    rows: list[dict] = []
    title = f"{args.config}: bf16 vs float8 ({meta['device']})"
    try:
        for label, (variant, sets) in runs.items():
            rc = launch_logged(label, deepspeed_cmd(1, args.config, sets, "none", work / label), log, args.timeout)
            rows.append(summarise(variant, work / label, rc))
            if (work / label / "metrics.jsonl").is_file():  # every step's record beside the results, named
                # <name>_<variant>[_throughput]_metrics.jsonl (bench/README.md, "Result names")
                again = "_throughput" if any(r["variant"] == variant for r in rows[:-1]) else ""
                shutil.copy(work / label / "metrics.jsonl", args.out / f"{name}_{variant}{again}_metrics.jsonl")
            compare(rows)
            write_results(name, rows, meta, COLUMNS, args.out, title=title)  # the JSON keeps each step's loss
            plot(rows, args.out / f"{name}.png", title)
    finally:  # the runs' console output beside the results, also after a SIGTERM
        shutil.copy(log, args.out / f"{name}_launch.log")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
