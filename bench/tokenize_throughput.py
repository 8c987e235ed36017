"""The curation's tokenize stage against datatrove's DocumentTokenizer alone: tokens per CPU-second.

    python bench/tokenize_throughput.py [--megabytes 100] [--tasks 4] [--output DIR]

Builds a corpus of >= `--megabytes` MB of text from this interpreter's site-packages .py files (one
document each, written as curated jsonl), trains one sentencepiece tokenizer on a sample of it, then
tokenizes the whole corpus twice on one pinned core with the same tokenizer.json, seed and task count:
once with the pipeline's own `tokenize` stage (`pipeline.stages.tokenize_pipeline`) and once with a
plain `JsonlReader -> DocumentTokenizer`. CPU-seconds are user + system time of this process and its
children (the HF tokenizer's threads included). The machine's load (`uptime`) is recorded, since other
jobs on a shared machine take from the same core. Writes bench/results/tokenize_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from bench.common import environment, write_results  # noqa: E402


def build_corpus(folder: Path, megabytes: float, files: int) -> tuple[int, int]:
    """site-packages .py files as documents, round-robin over `files` jsonl files; (documents, characters)."""
    folder.mkdir(parents=True, exist_ok=True)
    outs = [open(folder / f"{i:05d}.jsonl", "w", encoding="utf-8") for i in range(files)]
    docs = chars = 0
    try:
        for path in sorted(Path(sysconfig.get_paths()["purelib"]).rglob("*.py")):
            if chars >= megabytes * 1e6:
                break
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip():
                continue
            outs[docs % files].write(json.dumps({"text": text, "id": str(path)}) + "\n")
            docs, chars = docs + 1, chars + len(text)
    finally:
        for f in outs:
            f.close()
    return docs, chars


def train_tokenizer(corpus: Path, work: Path, vocab: int) -> Path:
    """tokenizer.json of a sentencepiece BPE trained on the first ~100k lines of the corpus."""
    from config.recipe import TokenizerConfig
    from pipeline.spm_tokenizer import spm_to_hf, train_sentencepiece

    sample = work / "sample.txt"
    with open(sample, "w", encoding="utf-8") as out:
        lines = 0
        for line in open(corpus / "00000.jsonl", encoding="utf-8"):
            for text_line in json.loads(line)["text"].splitlines():
                out.write(text_line + "\n")
                lines += 1
            if lines > 100_000:
                break
    model = train_sentencepiece(sample, work / "spm", TokenizerConfig(vocab_size=vocab, input_sentence_size=100_000))
    path = work / "tokenizer.json"
    path.write_text(spm_to_hf(model).to_str())
    return path


def load_average() -> list[str]:
    """1, 5 and 15 minute load averages (as `uptime` prints them)."""
    return Path("/proc/loadavg").read_text().split()[:3]


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(pipeline: list, tasks: int, logs: Path, out: Path) -> dict:
    """Run `pipeline` with one worker; CPU and wall seconds and tokens written (.ds bytes / 2)."""
    from datatrove.executor import LocalPipelineExecutor

    executor = LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=str(logs))
    c0, w0 = cpu_seconds(), time.perf_counter()
    executor.run()
    cpu, wall = cpu_seconds() - c0, time.perf_counter() - w0
    tokens = sum(p.stat().st_size for p in out.rglob("*.ds")) // 2  # uint16 tokens (vocab < 65536)
    return {"cpu_seconds": round(cpu, 2), "wall_seconds": round(wall, 2), "tokens": tokens,
            "tokens_per_cpu_s": round(tokens / cpu)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--megabytes", type=float, default=100.0, help="Corpus size (characters / 1e6).")
    p.add_argument("--tasks", type=int, default=4, help="Tasks of both runs (as recipe cluster.tasks).")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=2, help="Runs of each (best CPU time counts: contention only adds).")
    p.add_argument("--output", help="Work folder (default: a temporary one).")
    args = p.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    work = Path(args.output or tempfile.mkdtemp(prefix="tokenize_bench_"))
    corpus = work / "curated"
    docs, chars = build_corpus(corpus, args.megabytes, args.tasks)
    tokenizer = train_tokenizer(corpus, work, args.vocab)

    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    from pipeline.stages import EOS_PIECE, tokenize_pipeline

    seed = 1234
    runs = {
        "datatrove DocumentTokenizer alone": lambda out: [
            JsonlReader(str(corpus), compression=None),
            DocumentTokenizer(str(out), str(tokenizer), eos_token=EOS_PIECE, seed=seed)],
        "pipeline tokenize stage": lambda out: tokenize_pipeline(corpus, out, tokenizer, seed),
    }
    rows = []
    for rep in range(args.repeats):  # alternate the order: a neighbour's load hits both alike
        for name in sorted(runs, reverse=bool(rep % 2)):
            out = work / f"run{rep}_{len(rows)}"
            rows.append({"run": name, "repeat": rep, **timed(runs[name](out / "ds"), args.tasks, out / "logs", out / "ds")})
    best = {name: max(r["tokens_per_cpu_s"] for r in rows if r["run"] == name) for name in runs}
    ratio = best["pipeline tokenize stage"] / best["datatrove DocumentTokenizer alone"]
    meta = environment(torch.device("cpu")) | {
        "cores": 1, "documents": docs, "characters": chars, "tasks": args.tasks, "vocab": args.vocab,
        "ratio_ours_over_datatrove": round(ratio, 3), "load_average_before_after": [LOAD_BEFORE, load_average()],
    }
    path = write_results("tokenize_throughput", rows, meta,
                         ["run", "repeat", "tokens", "cpu_seconds", "wall_seconds", "tokens_per_cpu_s"],
                         title="Tokenize stage vs datatrove's DocumentTokenizer alone (one pinned core)")
    md = path.with_suffix(".md")
    md.write_text(md.read_text() + (
        f"\nCorpus: {docs} site-packages .py files, {chars / 1e6:.1f} MB, {args.tasks} tasks, one sentencepiece "
        f"BPE of {args.vocab} pieces for both runs. Ratio of the best runs (pipeline / datatrove alone): "
        f"**{ratio:.2f}x** ({best['pipeline tokenize stage']:,} vs {best['datatrove DocumentTokenizer alone']:,} "
        f"tokens per CPU-second).\n"
        f"Load average (1/5/15 min) before: {' '.join(LOAD_BEFORE)}; after: "
        f"{' '.join(meta['load_average_before_after'][1])} (a shared 2-core machine; CPU-seconds, not wall "
        f"time, are compared).\n"))
    print(md.read_text())


LOAD_BEFORE = load_average()  # at start-up, before this script loads the core

if __name__ == "__main__":
    main()
