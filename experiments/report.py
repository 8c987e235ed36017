"""The ablation report: OUTPUT/report.md, OUTPUT/report.json, loss.png, throughput_memory.png (atomic).

Per run, everything comes from the trainer's metrics.jsonl (train/metrics.py) and the run config:
  params, non_embedding_params   model.sizing.count_params of the run's model config
  tokens_per_s, mfu               the median step's tokens_per_s and mfu after the first two (mfu absent on CPU): a
                                  one-off stall later on (kernels autotuned for a shape first met after the first
                                  steps) moves a mean, not the median
  peak_mem_gb                     the largest mem_gb
  loss_at_<T>                     mean train loss of the steps in the last tenth of the budget up to T tokens,
                                  T = 25, 50, 75 and 100% of the budget; final_loss is loss_at at 100%
  val_loss, val_ppl               the last validation pass (at the last step: the trainer validates there)
  eval: <task> <metric>           with --eval, eval/run.py's table of the final export
Per variant: mean +- sample standard deviation over its seeds (std left out with one seed).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from config.atomic import atomic_write_bytes, atomic_write_json
from experiments.ablation import PlannedRun
from model.sizing import count_params
from train.metrics import WARMUP_STEPS, read_metrics
from train.plot import draw_loss, new_figure, save_png

FRACTIONS = (0.25, 0.5, 0.75, 1.0)
WINDOW = 0.1  # of the token budget: the steps averaged into one loss_at value


def loss_at(steps: dict[int, dict], tokens: int, window: float) -> float | None:
    """Mean train loss of the steps with tokens in (tokens - window, tokens]; the last step at or before
    `tokens` if none is in the window."""
    train = [(r["tokens"], r["loss"]) for r in steps.values() if r.get("loss") is not None and r["tokens"] <= tokens]
    inside = [loss for t, loss in train if t > tokens - window]
    if inside:
        return statistics.fmean(inside)
    return max(train)[1] if train else None


def run_row(run: PlannedRun, budget: int) -> dict:
    """One run's figures (module doc); runs without a logged step give the counts only."""
    steps = read_metrics(run.out)
    model = run.cfg.model
    row: dict = {"variant": run.variant, "seed": run.seed, "pattern": model.layer_pattern,
                 "ffn_hidden": model.ffn_hidden, "params": count_params(model),
                 "non_embedding_params": count_params(model, include_embedding=False), "finished": run.finished}
    train = [r for _, r in sorted(steps.items()) if "loss" in r]
    if not train:
        return row
    steady = train[WARMUP_STEPS:] or train
    mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
    val = [r for r in train if r.get("val_loss") is not None]
    row.update(steps=train[-1]["step"], tokens=train[-1]["tokens"],
               tokens_per_s=statistics.median(r["tokens_per_s"] for r in steady),
               mfu=statistics.median(mfu) if mfu else None, peak_mem_gb=max(r["mem_gb"] for r in train))
    for f in FRACTIONS:
        row[f"loss_at_{int(f * budget)}"] = loss_at(steps, int(f * budget), WINDOW * budget)
    row["final_loss"] = row[f"loss_at_{budget}"]
    if val:
        row.update(val_loss=val[-1]["val_loss"], val_ppl=val[-1]["val_ppl"])
    eval_doc = run.out / "final" / "eval_results.json"
    if eval_doc.is_file():
        import json

        for r in json.loads(eval_doc.read_text())["table"]:
            row[f"eval: {r['task']} {r['metric']}"] = r["value"]
    return row


def aggregate(rows: list[dict]) -> list[dict]:
    """Per variant (in order of appearance): n seeds, and for every numeric column its mean and std."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        agg: dict = {"variant": variant, "seeds": len(mine), "pattern": mine[0]["pattern"],
                     "finished": all(r["finished"] for r in mine)}
        for key in dict.fromkeys(k for r in mine for k in r):
            values = [r[key] for r in mine if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]
            if key in ("seed",) or not values:
                continue
            agg[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None)
        out.append(agg)
    return out


def _cell(value: tuple[float, float | None] | None, fmt: str) -> str:
    if value is None:
        return "-"
    mean, std = value
    return format(mean, fmt) + (f" ± {format(std, fmt)}" if std is not None else "")


def markdown(agg: list[dict], budget: int, header: str) -> str:
    """The report table: one row per variant, mean ± std over seeds."""
    loss_cols = [f"loss_at_{int(f * budget)}" for f in FRACTIONS[:-1]]
    eval_cols = list(dict.fromkeys(k for a in agg for k in a if k.startswith("eval: ")))
    cols = [("params", "params (M)", ".2f", 1e-6), ("non_embedding_params", "non-emb (M)", ".2f", 1e-6),
            ("tokens_per_s", "tokens/s", ",.0f", 1), ("mfu", "MFU %", ".1f", 100), ("peak_mem_gb", "peak mem GB", ".2f", 1),
            ("final_loss", "final train loss", ".4f", 1), ("val_loss", "val loss", ".4f", 1),
            ("val_ppl", "val ppl", ".2f", 1),
            *[(c, f"loss @ {int(c.rsplit('_', 1)[1]):,} tok", ".4f", 1) for c in loss_cols],
            *[(c, c.removeprefix("eval: "), ".4f", 1) for c in eval_cols]]
    lines = [header, "", "| variant | pattern | seeds | " + " | ".join(c[1] for c in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for a in agg:
        cells = []
        for key, _, fmt, scale in cols:
            v = a.get(key)
            cells.append(_cell(None if v is None else (v[0] * scale, None if v[1] is None else v[1] * scale), fmt))
        name = a["variant"] + ("" if a["finished"] else " (unfinished)")
        lines.append(f"| {name} | `{a['pattern']}` | {a['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mean_curve(runs: list[PlannedRun]) -> dict[int, dict]:
    """Per step, the mean over seeds of tokens, loss and val_loss (steps every seed logged)."""
    per_seed = [read_metrics(r.out) for r in runs]
    common = set.intersection(*(set(s) for s in per_seed)) if per_seed else set()
    curve = {}
    for step in sorted(common):
        recs = [s[step] for s in per_seed]
        point = {"tokens": recs[0].get("tokens")}
        for key in ("loss", "val_loss"):
            vals = [r.get(key) for r in recs]
            if all(isinstance(v, (int, float)) for v in vals):
                point[key] = statistics.fmean(vals)
        if point["tokens"] is not None:
            curve[step] = point
    return curve


def write_plots(runs: list[PlannedRun], agg: list[dict], output: Path) -> list[Path]:
    """loss.png (every variant's seed-mean loss vs tokens on one axis) and throughput_memory.png."""
    variants = list(dict.fromkeys(r.variant for r in runs))
    fig, (ax,) = new_figure(width=9.0)
    draw_loss(ax, {v: mean_curve([r for r in runs if r.variant == v]) for v in variants})
    ax.set_title("loss vs tokens (mean over seeds)")
    paths = [save_png(fig, output / "loss.png")]
    fig, axes = new_figure(2, width=6.0)
    for ax, key, label in zip(axes, ("tokens_per_s", "peak_mem_gb"), ("tokens/s", "peak memory (GB)")):
        names = [a["variant"] for a in agg if key in a]
        means = [a[key][0] for a in agg if key in a]
        errs = [a[key][1] or 0.0 for a in agg if key in a]
        ax.bar(names, means, yerr=errs, color=[f"C{variants.index(n) % 10}" for n in names], capsize=3)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    paths.append(save_png(fig, output / "throughput_memory.png"))
    return paths


def write_report(runs: list[PlannedRun], budget: int, output: Path, command: str) -> Path:
    """report.md, report.json (per run and per variant) and the plots under `output`."""
    rows = [run_row(r, budget) for r in runs]
    agg = aggregate(rows)
    per_step = runs[0].cfg.train.global_batch_tokens
    header = (f"# Ablation report\n\n`{command}`\n\n{budget:,} tokens per run ({budget // per_step} steps of "
              f"{per_step:,} tokens, train.seq_len {runs[0].cfg.train.seq_len}); mean ± std over seeds; "
              "definitions in experiments/report.py and docs/experiments.md.\n\n![loss](loss.png)\n"
              "![throughput and memory](throughput_memory.png)")
    write_plots(runs, agg, output)
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows]
    atomic_write_json(output / "report.json", {"command": command, "tokens": budget, "runs": clean,
                                               "variants": [{k: list(v) if isinstance(v, tuple) else v
                                                             for k, v in a.items()} for a in agg]})
    path = output / "report.md"
    atomic_write_bytes(path, markdown(agg, budget, header).encode())
    return path
