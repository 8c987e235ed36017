"""Show a running or finished training run in the terminal: `python -m train.watch RUN_DIR [--follow]`.

Reads RUN_DIR/metrics.jsonl (train/metrics.py), nothing else, so it works on a copy of the folder or
over a shared filesystem while the run goes on: progress, ETA, loss, validation loss, tokens/s, MFU,
memory and, where the run logged them, each rank's GPU utilisation, memory, temperature and power.
--follow redraws every --interval seconds until the run reaches its last step (Ctrl-C leaves).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from train.gpu_stats import FIELDS
from train.metrics import _duration, read_metrics


def _last(steps: dict[int, dict], key: str) -> dict | None:
    return next((steps[s] for s in sorted(steps, reverse=True) if steps[s].get(key) is not None), None)


def finished(steps: dict[int, dict]) -> bool:
    last = _last(steps, "max_steps")
    return last is not None and last["step"] >= last["max_steps"]


def render(run_dir: Path, now: float | None = None) -> Group:
    """The run's state as rich renderables (a summary table, then per-rank GPU stats if logged)."""
    steps = read_metrics(run_dir)
    path = run_dir / "metrics.jsonl"
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("run", str(run_dir))
    last = _last(steps, "loss")
    if last is None:
        summary.add_row("status", "no step logged yet")
        return Group(summary)
    total = last.get("max_steps") or last["step"]
    age = (now or time.time()) - path.stat().st_mtime
    state = "finished" if finished(steps) else f"ETA {_duration(last['eta_s'])}, last update {_duration(age)} ago"
    summary.add_row("progress", Group(f"step {last['step']}/{total} ({100 * last['step'] / total:.1f}%), {state}",
                                      ProgressBar(total=total, completed=last["step"], width=50)))
    summary.add_row("tokens", f"{last['tokens']:,}")
    summary.add_row("loss", f"{last['loss']:.4f}" if last["loss"] is not None else "non-finite")
    val = _last(steps, "val_loss")
    if val is not None:
        summary.add_row("validation", f"loss {val['val_loss']:.4f}, ppl {val['val_ppl']:.2f} (step {val['step']})")
    rate = last.get("tokens_per_s_avg") or last["tokens_per_s"]
    summary.add_row("tokens/s", f"{rate:,.0f}" + (f", MFU {100 * last['mfu']:.1f}%" if last.get("mfu") else ""))
    summary.add_row("peak memory", f"{last['mem_gb']:.2f} GB (rank 0)")
    gpu = _last(steps, f"{FIELDS[0]}/0") or _last(steps, f"{FIELDS[1]}/0")
    if gpu is None:
        return Group(summary)
    table = Table(title=f"GPUs at step {gpu['step']}", title_justify="left")
    for head in ("rank", "util %", "memory GB", "temp C", "power W"):
        table.add_column(head, justify="right")
    ranks = sorted({int(k.rsplit("/", 1)[1]) for k in gpu if k.split("/")[0] in FIELDS})

    def cell(field: str, rank: int, fmt: str) -> str:
        value = gpu.get(f"{field}/{rank}")
        return "-" if value is None else format(value, fmt)

    for r in ranks:
        mem = f"{cell('gpu_mem_used_gb', r, '.1f')} / {cell('gpu_mem_total_gb', r, '.1f')}"
        table.add_row(str(r), cell("gpu_util_pct", r, ".0f"), mem, cell("gpu_temp_c", r, ".0f"),
                      cell("gpu_power_w", r, ".0f"))
    return Group(summary, table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.watch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a training output folder (train.output_dir)")
    p.add_argument("--follow", action="store_true", help="keep redrawing until the run's last step")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between redraws with --follow")
    args = p.parse_args(argv)
    if not (args.run_dir / "metrics.jsonl").is_file():
        print(f"error: {args.run_dir}/metrics.jsonl does not exist (yet): pass a training output folder, "
              "after the run's first step", file=sys.stderr)
        sys.exit(2)
    console = Console()
    if not args.follow:
        console.print(render(args.run_dir))
        return
    try:
        with Live(render(args.run_dir), console=console, auto_refresh=False) as live:
            while not finished(read_metrics(args.run_dir)):
                time.sleep(args.interval)
                live.update(render(args.run_dir), refresh=True)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
