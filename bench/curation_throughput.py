"""Curation throughput per stage on one CPU core, and the CPU-hours it implies for production_100b.

    python bench/curation_throughput.py [--recipe embedded] [--data-root DIR] [--output DIR]

Runs the recipe from scratch with the process pinned to one core (pool workers, sentencepiece and
the HF tokenizer threads included), timing each stage's wall clock = its core-seconds. Documents and
characters per stage come from the run's report.json; tokens from the manifest. A second measurement
runs the full filter chain (language, Gopher repetition + quality, C4, FineWeb) over the curated text,
since the embedded recipe applies it only to its small planted source. Writes
bench/results/curation_throughput.{json,md}, including the production estimate and its assumptions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from bench.common import environment, write_results  # noqa: E402

# Production assumptions (stated in the results): web-English characters per token of a 32k BPE and the
# share of read text removed by filters/dedup/decontamination. Everything else comes from the recipe.
CHARS_PER_TOKEN_32K = 4.2
REMOVED_FRACTION = 0.25


def run_stages(recipe_name: str, out: Path, data_root: str | None) -> dict[str, float]:
    """Run every stage with one worker; stage name -> wall seconds."""
    from config.recipe import load_recipe
    from pipeline.executors import build_executors
    from pipeline.layout import Layout
    from pipeline.preflight import preflight
    from pipeline.stages import build_stages

    recipe, base = load_recipe(recipe_name)
    layout = Layout(out.resolve())
    tokenizer = preflight(recipe, base, layout, data_root)
    stages = build_stages(recipe, base, layout, data_root, tokenizer)
    seconds = {}
    for stage, ex in zip(stages, build_executors("local", stages, layout, recipe.cluster, workers=1), strict=True):
        t0 = time.perf_counter()
        ex.run()
        seconds[stage.name] = time.perf_counter() - t0
    return seconds


def filter_chain_rate(out: Path) -> tuple[float, int]:
    """Characters per second of all five filters applied to the curated training text (one core)."""
    from datatrove.data import Document

    from config.recipe import FiltersConfig, SourceConfig
    from pipeline.filters import build_filters

    docs = [json.loads(line) for f in sorted((out / "work" / "curated" / "train").glob("*/*.jsonl"))
            for line in f.read_text().splitlines()]
    steps = build_filters(FiltersConfig(), SourceConfig(name="all", type="pydoc"))
    chars = sum(len(d["text"]) for d in docs)
    t0 = time.perf_counter()
    for d in docs:
        doc = Document(text=d["text"], id=d["id"])
        all(step.filter(doc) is True for step in steps)  # stops at the first filter that drops it, like the chain
    return chars / (time.perf_counter() - t0), chars


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def group(name: str) -> str:
    return name.split(".")[0] if name.split(".")[0] in ("prepare", "tokenize", "merge") else name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="embedded", help="Any recipe (name in data_recipes/ or a YAML path).")
    p.add_argument("--data-root", help="Local hub mirrors for the recipe's hf sources (as pipeline/curate.py).")
    p.add_argument("--output", help="Output folder (default: a temporary one).")
    args = p.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    out = Path(args.output or tempfile.mkdtemp(prefix="curation_bench_")) / "out"

    wall = run_stages(args.recipe, out, args.data_root)
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = {f"{split}.{s['name']}": s["tokens"] for split, e in manifest["splits"].items() for s in e["sources"]}

    rows = []
    for stage in report["stages"]:
        name, steps = stage["stage"], stage["steps"]
        reader = next((s for s in steps if "characters" in s), {})
        docs, chars = reader.get("out", 0), reader.get("characters", 0)
        key = name.split(".", 1)[1] if name.startswith(("tokenize.", "merge.")) else None
        toks = tokens.get(key, 0) if key else 0
        rows.append({"stage": name, "documents": docs, "characters": chars, "tokens": toks,
                     "core_seconds": round(wall[name], 3)})
    totals: dict[str, dict] = {}
    for r in rows:  # per stage group: sum the per-source stages
        g = totals.setdefault(group(r["stage"]), {"stage": group(r["stage"]), "documents": 0, "characters": 0,
                                                  "tokens": 0, "core_seconds": 0.0})
        for k in ("documents", "characters", "tokens", "core_seconds"):
            g[k] += r[k]
    train_chars = sum(r["characters"] for r in rows if r["stage"].startswith("tokenize.train"))
    chars_per_token = train_chars / max(1, manifest["splits"]["train"]["tokens"])
    table = []
    for g in totals.values():
        s = max(g["core_seconds"], 1e-9)
        toks = g["tokens"] or g["characters"] / chars_per_token
        table.append({**g, "core_seconds": round(g["core_seconds"], 2), "docs_per_s_core": round(g["documents"] / s, 1),
                      "MB_per_s_core": round(g["characters"] / s / 1e6, 3), "tokens_per_s_core": round(toks / s),
                      "tokens_measured": bool(g["tokens"])})
    filt_rate, filt_chars = filter_chain_rate(out)

    # ---- production_100b estimate (characters through each stage / measured characters per core-second)
    from config.recipe import load_recipe

    prod, _ = load_recipe("production_100b")
    ours, _ = load_recipe(args.recipe)
    train_tokens = prod.output.total_tokens
    filtered_share = sum(w for s, w in prod.weights().items()
                         if next(x for x in prod.sources if x.name == s).filters != [])
    spm_scale = (prod.tokenizer.input_sentence_size / ours.tokenizer.input_sentence_size
                 * prod.tokenizer.vocab_size / ours.tokenizer.vocab_size)
    rate = {g["stage"]: g["characters"] / max(g["core_seconds"], 1e-9) for g in totals.values() if g["characters"]}
    # read + write: the prepare stages of sources without filters (file sources; pydoc rendering is not I/O),
    # else every prepare stage (then filters are counted twice: an upper bound)
    unfiltered = {f"prepare.{x.name}" for x in ours.sources if x.filters == [] and x.type != "pydoc"}
    plain = [r for r in rows if r["stage"] in unfiltered and r["characters"]] or \
        [r for r in rows if r["stage"].startswith("prepare.") and r["characters"]]
    rate["prepare"] = sum(r["characters"] for r in plain) / max(sum(r["core_seconds"] for r in plain), 1e-9)
    tok_rate = {g["stage"]: g["tokens"] / max(g["core_seconds"], 1e-9) for g in totals.values() if g["tokens"]}
    read_chars = train_tokens / (1 - REMOVED_FRACTION) * CHARS_PER_TOKEN_32K
    per_char = {  # estimate row -> stages whose measured rate it scales (rows of stages this recipe skips drop out)
        f"read + write (prepare without filters; as {', '.join(r['stage'] for r in plain)})": ["prepare"],
        "exact dedup": ["exact.signatures", "exact.filter"],
        "minhash signatures": ["minhash.signatures"],
        "minhash filter + split": ["final"],
    }
    core_h = {k: sum(read_chars / rate[st] for st in stages) for k, stages in per_char.items()
              if all(st in rate for st in stages)}
    core_h[f"quality filters ({filtered_share:.0%} of the mixture)"] = filtered_share * read_chars / filt_rate
    core_h["tokenizer training (1 job; lines x vocab scaling)"] = wall["tokenizer"] * spm_scale
    core_h["tokenize + merge"] = train_tokens / tok_rate["tokenize"] + train_tokens / tok_rate["merge"]
    core_h = {k: v / 3600 for k, v in core_h.items()}
    total_h = sum(core_h.values())
    meta = environment(torch.device("cpu")) | {
        "recipe": args.recipe, "cores": 1, "cpu_model": cpu_model(),
        "chars_per_token_embedded": round(chars_per_token, 3),
        "filter_chain_MB_per_s_core": round(filt_rate / 1e6, 3), "filter_chain_characters": filt_chars,
        "stage_rows": rows,
        "production_100b_estimate": {
            "core_hours_by_stage": {k: round(v, 1) for k, v in core_h.items()}, "core_hours_total": round(total_h),
            "assumptions": {"train_tokens": train_tokens, "chars_per_token_32k": CHARS_PER_TOKEN_32K,
                            "removed_fraction": REMOVED_FRACTION, "filtered_share": round(filtered_share, 3),
                            "sentencepiece_scale": round(spm_scale, 1),
                            "excluded": "hub download/streaming and parquet decoding, MinHash buckets/cluster "
                                        "(per-document, small), failed-task reruns"}},
    }
    cols = ["stage", "documents", "characters", "tokens", "core_seconds", "docs_per_s_core", "MB_per_s_core",
            "tokens_per_s_core", "tokens_measured"]
    title = f"Curation throughput per core ({args.recipe})"
    path = write_results("curation_throughput", table, meta, cols, title=title)
    md = path.with_suffix(".md")
    lines = ["", f"CPU: {meta['cpu_model']}, one core (the process and its workers pinned to it).", "",
             f"Filter chain (language + Gopher repetition/quality + C4 + FineWeb) on the curated text: "
             f"{filt_rate / 1e6:.3f} MB/s per core over {filt_chars / 1e6:.1f} MB.",
             f"Tokens per second for stages before tokenization are characters / {chars_per_token:.2f} "
             "(the embedded tokenizer's characters per token); `tokens_measured` marks measured ones.", "",
             "## Estimate for production_100b", "",
             f"Assumptions: {train_tokens:.0e} training tokens kept after removing {REMOVED_FRACTION:.0%} of the read "
             f"text, {CHARS_PER_TOKEN_32K} characters per token (32k BPE on English web text), heuristic filters on "
             f"the sources that select them ({filtered_share:.0%} of the weights), per-character costs as measured "
             f"here on code/pydoc text, sentencepiece time scaled linearly in sample lines and vocab "
             f"(x{spm_scale:.0f}). Excluded: "
             + meta["production_100b_estimate"]["assumptions"]["excluded"] + ".", "",
             "| stage | core-hours |", "|---|---|"]
    lines += [f"| {k} | {v:,.1f} |" if v < 10 else f"| {k} | {v:,.0f} |" for k, v in core_h.items()]
    lines += [f"| **total** | **{total_h:,.0f}** |", "",
              f"About {total_h:,.0f} core-hours: ~{total_h / 1000 * 60:.0f} minutes of wall clock on 1000 cores "
              f"(cluster.tasks: 1000) if the hub streams fast enough, plus the single-task stages (MinHash cluster, "
              f"tokenizer training, merges)."]
    md.write_text(md.read_text() + "\n".join(lines) + "\n")
    print(md.read_text())


if __name__ == "__main__":
    main()
