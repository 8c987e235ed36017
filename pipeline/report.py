"""The run report: documents in/out and removal reasons per stage and step (from datatrove's per-task
stats under work/logs/<stage>/stats/), dedup rate, decontamination hits and documents/tokens per source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datatrove.utils.stats import MetricStatsDict, PipelineStats, Stats, TimingStats

from pipeline.layout import Layout


def _task_stats(path: Path) -> PipelineStats:
    """One task's stats file. (datatrove's PipelineStats.from_json leaves each metric a raw dict.)"""
    steps = []
    for data in json.loads(path.read_text()):
        step = Stats(data["name"])
        step.time_stats = TimingStats.from_dict(data["time_stats"])
        step.stats = MetricStatsDict.from_dict(data["stats"])
        steps.append(step)
    return PipelineStats(steps)


def stage_stats(logs: Path) -> list[Stats]:
    """Stats of each step of a stage, summed over its tasks (empty if the stage never ran)."""
    files = sorted((logs / "stats").glob("*.json"))
    return sum((_task_stats(f) for f in files), start=PipelineStats()).stats


def _count(stat: Stats, key: str) -> int:
    return int(stat.stats[key].total) if key in stat.stats else 0


def step_summary(stat: Stats) -> dict[str, Any]:
    """in/out/removed (with reasons) for filters and dedup filters; documents for readers/writers."""
    s = stat.stats
    out: dict[str, Any] = {"step": stat.name, "seconds": round(stat.time_stats.total, 3)}
    if "doc_len" in s and "total" not in s:  # a reader: documents and characters produced
        out["out"], out["characters"] = s["doc_len"].n, int(s["doc_len"].total)
        out["empty"] = _count(stat, "empty_documents")  # rows without text, skipped
    if "total" in s:
        out["in"] = _count(stat, "total")
        out["out"] = _count(stat, "forwarded") if "forwarded" in s or "dropped" in s else out["in"]
    if "dropped" in s:
        out["removed"] = _count(stat, "dropped")
        out["reasons"] = {k.removeprefix("dropped_"): int(v.total) for k, v in sorted(s.items())
                          if k.startswith("dropped_")}
    extra = {k: int(v.total) for k, v in s.items()
             if k.startswith("contaminated_") or k in ("tokens", "train", "validation")}
    return out | extra


def _per_source_counts(stat: Stats, prefix: str = "") -> dict[str, int]:
    """A writer's documents per source, from its per-output-file counters (`[prefix]<source>/XXXXX.jsonl`)."""
    counts: dict[str, int] = {}
    for key, value in stat.stats.items():
        if key.endswith(".jsonl") and key.startswith(prefix):
            source = key.removeprefix(prefix).split("/")[0]
            counts[source] = counts.get(source, 0) + int(value.total)
    return counts


def build_report(layout: Layout, stage_names: list[str], manifest: dict[str, Any],
                 recipe_name: str, recipe_sha256: str) -> dict[str, Any]:
    stages = {name: stage_stats(layout.logs(name)) for name in stage_names}
    sources: dict[str, dict[str, int]] = {}
    decont_steps = []
    for name, steps in stages.items():
        if name.startswith("prepare.") and steps:
            src = name.removeprefix("prepare.")
            written = _count(steps[-1], "total")
            decont = [step_summary(s) for s in steps if "N-grams" in s.name]
            read = step_summary(steps[0])
            sources[src] = {"read": read.get("out", 0), "empty": read.get("empty", 0),
                            "after_filters": decont[0].get("in", 0) if decont else written}
            if decont:
                sources[src]["after_decontamination"] = written
            decont_steps += decont
    if stages.get("exact.filter"):
        for src, n in _per_source_counts(stages["exact.filter"][-1]).items():
            sources.setdefault(src, {})["after_exact_dedup"] = n
    for split, entry in manifest["splits"].items():
        for src in entry["sources"]:
            row = sources.setdefault(src["name"], {})
            row[f"{split}_documents"], row[f"{split}_tokens"] = src["documents"], src["tokens"]

    def removed(stage: str, step_prefix: str) -> int:
        return sum(step_summary(s).get("removed", 0) for s in stages.get(stage, []) if step_prefix in s.name)

    dedup_in = sum(r.get("after_decontamination", r.get("after_filters", 0)) for r in sources.values())
    exact, near = removed("exact.filter", "exact-deduplication"), removed("final", "MinHash")
    return {
        "recipe": {"name": recipe_name, "sha256": recipe_sha256},
        "stages": [{"stage": name, "seconds": round(sum(s.time_stats.total for s in steps), 3),
                    "steps": [step_summary(s) for s in steps]} for name, steps in stages.items()],
        "sources": sources,
        "dedup": {"input_documents": dedup_in, "exact_removed": exact, "minhash_removed": near,
                  "rate": round((exact + near) / dedup_in, 6) if dedup_in else 0.0},
        "decontamination": {"removed": sum(s.get("removed", 0) for s in decont_steps),
                            "by_task": {k.removeprefix("contaminated_"): v for s in decont_steps
                                        for k, v in s.items() if k.startswith("contaminated_")}},
        "totals": {split: {"documents": e["documents"], "tokens": e["tokens"]}
                   for split, e in manifest["splits"].items()},
    }


def format_report(report: dict[str, Any]) -> str:
    """Two plain-text tables: steps (in/out/why removed), then documents and tokens per source."""
    lines = [f"{'stage':<28}{'step':<34}{'in':>10}{'out':>10}{'removed':>9}  reasons"]
    for stage in report["stages"]:
        for step in stage["steps"]:
            if "in" not in step and "out" not in step:
                continue
            top = sorted(step.get("reasons", {}).items(), key=lambda kv: -kv[1])[:4]
            reasons = ", ".join(f"{k}={v}" for k, v in top)
            name = step["step"].split(": ", 1)[-1].encode("ascii", "ignore").decode().strip()
            lines.append(f"{stage['stage']:<28}{name[:33]:<34}{step.get('in', ''):>10}{step.get('out', ''):>10}"
                         f"{step.get('removed', ''):>9}  {reasons}")
    cols = ["read", "empty", "after_filters", "after_decontamination", "after_exact_dedup", "train_documents", "validation_documents",
            "train_tokens", "validation_tokens"]
    lines += ["", f"{'source':<20}" + "".join(f"{c:>22}" for c in cols)]
    for src, row in report["sources"].items():
        lines.append(f"{src:<20}" + "".join(f"{row.get(c, '-'):>22}" for c in cols))
    d, dc = report["dedup"], report["decontamination"]
    lines += ["", f"dedup: {d['exact_removed']} exact + {d['minhash_removed']} near duplicates of "
              f"{d['input_documents']} documents (rate {d['rate']:.2%}); decontamination removed {dc['removed']} "
              f"{dc['by_task']}",
              "totals: " + ", ".join(f"{k} {v['documents']} documents / {v['tokens']} tokens"
                                     for k, v in report["totals"].items())]
    return "\n".join(lines)
