"""Loss plots from metrics.jsonl: `python -m train.plot RUN_DIR [--output PNG]`.

Writes RUN_DIR/loss.png (train loss and validation loss against tokens seen); the trainer draws it
at the end of every run (train/metrics.py, rank 0). The ablation report (experiments/report.py)
draws every variant on one axis with the same `draw_loss`. Files are written atomically.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

PLOT_NAME = "loss.png"


def new_figure(n_axes: int = 1, width: float = 7.0) -> tuple[Any, list[Any]]:
    """A headless matplotlib figure with `n_axes` side-by-side axes."""
    import matplotlib

    matplotlib.use("Agg")  # no display: training machines have none
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_axes, figsize=(width * n_axes, 4.5), squeeze=False)
    return fig, list(axes[0])


def draw_loss(ax: Any, runs: dict[str, dict[int, dict]]) -> None:
    """Train loss (line) and validation loss (dashed, markers) against tokens, one colour per run.
    `runs`: label -> read_metrics-style {step: record with tokens, loss and/or val_loss}."""
    for i, (label, steps) in enumerate(runs.items()):
        colour = f"C{i % 10}"
        train = [(r["tokens"], r["loss"]) for _, r in sorted(steps.items()) if r.get("loss") is not None]
        val = [(r["tokens"], r["val_loss"]) for _, r in sorted(steps.items())
               if r.get("val_loss") is not None and "tokens" in r]
        if train:
            ax.plot(*zip(*train), color=colour, linewidth=1.2, label=f"{label} train")
        if val:
            ax.plot(*zip(*val), color=colour, linestyle="--", marker="o", markersize=3, label=f"{label} validation")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # runs with no logged step yet draw nothing to label
        ax.legend(fontsize=8)


def save_png(fig: Any, path: Path) -> Path:
    """Render `fig` to `path` atomically and release it."""
    import matplotlib.pyplot as plt

    from config.atomic import atomic_write_bytes

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def write_run_plot(run_dir: Path, output: Path | None = None) -> Path:
    """The loss plot of one run (default RUN_DIR/loss.png)."""
    from train.metrics import read_metrics

    run_dir = Path(run_dir)
    fig, (ax,) = new_figure()
    draw_loss(ax, {run_dir.name: read_metrics(run_dir)})
    ax.set_title(f"{run_dir.name}: loss")
    return save_png(fig, output or run_dir / PLOT_NAME)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a training output folder (holding metrics.jsonl)")
    p.add_argument("--output", type=Path, help=f"PNG path (default RUN_DIR/{PLOT_NAME})")
    args = p.parse_args(argv)
    if not (args.run_dir / "metrics.jsonl").is_file():
        print(f"error: {args.run_dir}/metrics.jsonl does not exist: pass a training output folder "
              "(train.output_dir)", file=sys.stderr)
        sys.exit(2)
    print(write_run_plot(args.run_dir, args.output))


if __name__ == "__main__":
    main()
