"""The committed pretrain runs (bench/results/pretrain_*_metrics.jsonl) against the planner's predictions.

A run is its trainer metrics file `pretrain_<name>_metrics.jsonl` and the markdown file that names it
(`pretrain_<name>.md`, or the family's .md listing it): that file's `launch/pretrain.py` command line
gives the run config (re-loaded with its --set overrides) and its `Device:` line the GPU. Measured:
steady tokens/s = median of steps >= 3; peak memory = max mem_gb (torch.cuda.max_memory_allocated) of
steps >= 2; first-step memory = step 1's. New runs named this way (`bash bench/run.sh presets OUT`)
join the table as soon as they are committed.

Under CUDA graphs torch.cuda.max_memory_allocated stops counting the activations once captured (they
live in the graphs' private pool), so a graphed run's steady memory is compared with the planner's
`allocator_visible` and its first step (the capture) with `first_step`.

One-GPU ZeRO-1 runs started before train/reduction.py (REDUCTION_SKIP_FROM, its commit) also ran
BF16_Optimizer's boundary all-reduce alone, whose bf16 cast of the float32 sums (2P) the planner now
counts on more than one GPU only: their predictions add it back, as the code they ran allocated it.
"""

from __future__ import annotations

import json
import re
import shlex
import statistics
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from config.schema import RunConfig
from train.plan import GIB, Plan, plan
from train.plan_memory import model_states
from train.plan_speed import RESULTS

MEMORY_BOUND, SPEED_BOUND = 0.10, 0.15
REDUCTION_SKIP_FROM = datetime(2026, 12, 7, 7, 57)  # UTC: train/reduction.py's commit (88d5830)


@dataclass
class Run:
    name: str  # the metrics file's stem without _metrics
    md: str
    device: str
    overrides: list[str]
    config: str
    gpus: int
    tokens_per_s: float
    mem_gb: float
    first_mem_gb: float
    mfu: float | None  # the median the trainer logged over the steps of tokens_per_s (None: not logged)
    started: datetime  # the markdown's `date:` (UTC), else the date at the end of the run's name


def _command(text: str) -> list[str] | None:
    """The first `launch/pretrain.py` command of a markdown file, as argv (backslash continuations joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    for line in joined.splitlines():
        if "launch/pretrain.py" in line and "--config" in line:
            return shlex.split(line.strip().strip("`"))
    return None


def _names(md: Path, metrics: Path) -> bool:
    """Whether `md` names `metrics`, in full or as `..._<rest>` after the md's own stem less its GPU tag."""
    text = md.read_text()
    family = md.stem.rsplit("_", 1)[0]
    rest = metrics.name[len(family):] if metrics.name.startswith(family) else None
    return metrics.name in text or (rest is not None and f"...{rest}" in text)


def _md_for(metrics: Path) -> Path | None:
    own = metrics.with_name(metrics.name[: -len("_metrics.jsonl")] + ".md")
    if own.is_file():
        return own
    return next((md for md in sorted(metrics.parent.glob("pretrain_*.md")) if _names(md, metrics)), None)


def committed_runs(results: Path = RESULTS) -> list[Run]:
    """Every pretrain run of `results` with a command line and at least 3 steps."""
    runs = []
    for metrics in sorted(results.glob("pretrain_*_metrics.jsonl")):
        md = _md_for(metrics)
        text = md.read_text() if md else ""
        argv = _command(text) if md else None
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "tokens_per_s" in r]  # step rows (the file also holds validation rows)
        failed = re.search(r"^# .*, exit (\d+)$", text, re.MULTILINE)
        if argv is None or len(rows) < 3 or (failed and failed.group(1) != "0"):  # a run that did not finish
            continue
        device = re.search(r"Device: ([^;(\n]+)", text)
        gpus = int(argv[argv.index("--num_gpus") + 1]) if "--num_gpus" in argv else 1
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        steady = [r for r in rows if r["step"] >= 3]
        mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
        runs.append(Run(
            name=metrics.name[: -len("_metrics.jsonl")], md=md.name, device=device.group(1).strip() if device else "?",
            overrides=sets, config=argv[argv.index("--config") + 1], gpus=gpus,
            tokens_per_s=statistics.median(r["tokens_per_s"] for r in steady),
            mem_gb=max(r["mem_gb"] for r in rows if r["step"] >= 2), first_mem_gb=rows[0]["mem_gb"],
            mfu=statistics.median(mfus) if mfus else None, started=_started(text, metrics.name)))
    return runs


def _started(md_text: str, name: str) -> datetime:
    stamp = re.search(r"date: (\d{4}-\d\d-\d\d \d\d:\d\d) UTC", md_text)
    if stamp:
        return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M")
    return datetime.strptime(re.search(r"(\d{4}-\d\d-\d\d)_metrics", name).group(1), "%Y-%m-%d")


def run_config(run: Run) -> RunConfig:
    """The run's config: its preset with the --set overrides of its command line (a run that predates
    train.checkpoint_block_types gets its default, None: checkpointing, if any, in every block, as it ran)."""
    from config.schema import load_run_config

    return load_run_config(run.config, run.overrides)


def predicted(run: Run, cfg: RunConfig) -> Plan:
    """The planner's numbers for `cfg` (the run's config) on the run's GPUs."""
    gpu = "h200" if "H200" in run.device else "h100"
    return plan(cfg, gpus=run.gpus, gpu=gpu)


def lone_reduce_bytes(run: Run, cfg: RunConfig, p: Plan) -> float:
    """What a one-GPU run started before REDUCTION_SKIP_FROM allocated for the reduction the planner now counts
    only with company: the planner's comm buffers on two GPUs less those on one (the bf16 cast of ZeRO-1's
    float32 sums; 0 for the other settings)."""
    if run.gpus != 1 or run.started >= REDUCTION_SKIP_FROM:
        return 0.0
    states = [model_states(cfg.model, p.zero, gpus, cfg.train.precision, cfg.train.cuda_graph, cfg.train.grad_fold,
                             cfg.train.fp8.casts)
              for gpus in (1, 2)]
    return states[1]["comm_buffers"] - states[0]["comm_buffers"]


def compare(run: Run) -> dict[str, float]:
    """Predicted and measured numbers of one run, and their relative errors (predicted / measured - 1)."""
    cfg = run_config(run)
    p = predicted(run, cfg)
    cast = lone_reduce_bytes(run, cfg, p)
    mem = ((p.allocator_visible if cfg.train.cuda_graph else p.allocated) + cast) / 1e9
    first = (p.first_step + cast) / 1e9
    rate = p.speed.tokens_per_s if p.speed else float("nan")
    return {"mem_pred": mem, "mem_meas": run.mem_gb, "mem_err": mem / run.mem_gb - 1,
            "first_pred": first, "first_meas": run.first_mem_gb, "first_err": first / run.first_mem_gb - 1,
            "rate_pred": rate, "rate_meas": run.tokens_per_s, "rate_err": rate / run.tokens_per_s - 1}


def activation_runs(results: Path = RESULTS) -> list[dict[str, float]]:
    """bench/memory_scaling.py's training rows (memory_vs_length_*.json) of our model (one forward + backward,
    batch 1, no optimizer): measured activation_gb (peak minus weights and gradients) vs the planner's activations."""
    from model.config import ModelConfig
    from train.plan_memory import activations

    out = []
    for path in sorted(results.glob("memory_vs_length_*.json")):
        data = json.loads(path.read_text())
        cfg = ModelConfig(preset=data["meta"]["preset"])
        for row in data["rows"]:
            if row["model"] == "ours" and row["mode"] == "train" and row.get("activation_gb"):
                mode = "full" if row["act_ckpt"] else "none"
                # memory_scaling.py checkpoints every block; a row naming its letters keeps them
                acts = activations(cfg, data["meta"]["batch"] * row["seq_len"], mode,
                                   block_types=row.get("checkpoint_block_types"))
                pred = sum(v for k, v in acts.items() if k != "host") / 1e9
                out.append({"file": path.name, "device": data["meta"]["device"], "seq_len": row["seq_len"],
                            "mode": mode, "pred": pred, "meas": row["activation_gb"],
                            "err": pred / row["activation_gb"] - 1})
    return out


def check_table(results: Path = RESULTS) -> str:
    """Markdown: every committed run, predicted vs measured (memory in GB = 1e9 bytes)."""
    lines = [("| run | device | peak memory GB pred / meas (err) | step-1 memory GB pred / meas (err) | "
              "tokens/s pred / meas (err) |"), "|---|---|---|---|---|"]
    for run in committed_runs(results):
        c = compare(run)
        lines.append(f"| {run.name} | {run.device} | {c['mem_pred']:.1f} / {c['mem_meas']:.1f} ({c['mem_err']:+.1%}) "
                     f"| {c['first_pred']:.1f} / {c['first_meas']:.1f} ({c['first_err']:+.1%}) | "
                     f"{c['rate_pred']:,.0f} / {c['rate_meas']:,.0f} ({c['rate_err']:+.1%}) |")
    lines += ["", "| activations of one forward + backward | device | tokens | checkpointing | GB pred / meas (err) |",
              "|---|---|---|---|---|"]
    lines += [f"| {a['file']} | {a['device']} | {a['seq_len']} | {a['mode']} | {a['pred']:.2f} / {a['meas']:.2f} "
              f"({a['err']:+.1%}) |" for a in activation_runs(results)]
    return "\n".join(lines)


OOM_REPORT = re.compile(r"this process has ([\d.]+) GiB memory in use\. Of the allocated memory ([\d.]+) GiB is "
                        r"allocated by PyTorch.*? and ([\d.]+) GiB is reserved by PyTorch but unallocated")


def oom_context_bytes(log: Path) -> float:
    """Memory outside torch's allocator (CUDA context, cuBLAS and NCCL workspaces) in the first out-of-memory
    report of a launch log: in use minus allocated minus reserved-but-unallocated. ValueError without one."""
    found = OOM_REPORT.search(log.read_text())
    if found is None:
        raise ValueError(f"{log}: no CUDA out-of-memory report")
    in_use, allocated, unallocated = (float(g) for g in found.groups())
    return (in_use - allocated - unallocated) * GIB
