"""The training table of docs/performance.md, computed from the committed result files.

    python bench/performance.py        # prints the markdown table (docs/performance.md holds it verbatim)

MFU in two conventions: over the bf16 GEMM peak measured on the machine of the run (what the trainer and
the benches log: `train.peak_tflops` / meta.matmul_peak_tflops) and over the H100's nominal dense bf16
989 TFLOP/s, as peers publish it (the H200 has the same nominal figure). The second is computed here as
tokens/s x model FLOPs per token / 989e12, with the FLOPs per token of model.sizing (the count the trainer
and the benches use: 6 x matmul parameters + attention and SSD terms at the run's sequence length).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from bench.common import COMMITTED  # noqa: E402

NOMINAL_BF16_TFLOPS = 989.0  # H100 / H200 SXM, dense bf16 (NVIDIA's datasheet figure, without sparsity)
# the step bench: ours (graphed ZeRO-1) against each peer; the newest file of each question is read
STEP_QUESTIONS = ("train_step_vs_twin_1.3b", "train_step_vs_bamba_1.3b", "train_step_vs_bamba_16k_1.3b")
# launch/pretrain.py with the fastest settings, the newest run on each card (bench/run.sh train:pretrain
# writes the next ones as pretrain_1.3b_<gpu>_<date>: list them here)
PRETRAIN_RUNS = ("pretrain_1.3b_zero1_cb_grad_graph_h100_2026-11-24",
                 "pretrain_1.3b_zero1_registry_graph_h200_2026-12-06",
                 "pretrain_2.7b_h100_2026-12-07")
MODEL_NAMES = {"ours_graph": "ours (CUDA graphs)", "ours": "ours",
               "attention_graph": "all-attention twin (CUDA graphs)", "attention": "all-attention twin",
               "hf_bamba": "HF Bamba (eager)", "hf_llama": "HF Llama"}
DATE = re.compile(r"_(\d{4}-\d{2}-\d{2})$")


def newest(question: str, results: Path = COMMITTED) -> Path:
    """The newest `<question>_<hardware>_<date>.json` of `results`."""
    found = [p for p in results.glob(f"{question}_*.json")
             if DATE.search(p.stem) and p.stem[: -len("_2026-01-01")].rsplit("_", 1)[0] == question]
    if not found:
        raise FileNotFoundError(f"no {question}_<hardware>_<date>.json in {results}")
    return max(found, key=lambda p: DATE.search(p.stem).group(1))


def _row(what: str, tokens_per_s: float, mfu: float, flops_per_token: float, mem_gb: float, link: str) -> str:
    nominal = tokens_per_s * flops_per_token / (NOMINAL_BF16_TFLOPS * 1e12)
    return f"| {what} | {tokens_per_s:,.0f} | {mfu:.1%} | {nominal:.1%} | {mem_gb:.1f} | {link} |"


def pretrain_row(stem: str, results: Path = COMMITTED) -> str:
    """One launch/pretrain.py run as the planner reads it (train/plan_runs.py: median tokens/s and MFU of
    steps >= 3, peak memory of steps >= 2)."""
    from config.schema import load_run_config
    from model.sizing import train_flops_per_token
    from train.plan_runs import committed_runs

    run = next((r for r in committed_runs(results) if r.name == stem), None)
    if run is None:
        raise FileNotFoundError(f"{results}/{stem}_metrics.jsonl with its .md is not a finished run")
    cfg = load_run_config(run.config, run.overrides)
    t = cfg.train
    what = (f"`launch/pretrain.py` {cfg.model.preset}, {t.micro_batch_size} x {t.seq_len} x "
            f"{t.global_batch_tokens // (t.micro_batch_size * t.seq_len)}, {run.device}")
    return _row(what, run.tokens_per_s, run.mfu, train_flops_per_token(cfg.model, t.seq_len), run.mem_gb,
                f"[{stem}](../bench/results/{run.md})")


def step_rows(path: Path) -> list[str]:
    """Every model of one step-bench file (the bench's own tokens/s, MFU and FLOPs per token)."""
    data = json.loads(path.read_text())
    out = []
    for r in data["rows"]:
        if r.get("status") != "ok":
            continue
        what = (f"step bench, {MODEL_NAMES.get(r['model'], r['model'])}, {r['micro_batch']} x {r['seq_len']} x "
                f"{r['grad_accum']}, {data['meta']['device']}")
        out.append(_row(what, r["tokens_per_s"], r["mfu"], r["flops_per_token"], r["peak_mem_gb"],
                        f"[{path.stem}](../bench/results/{path.stem}.md)"))
    return out


def table(results: Path = COMMITTED) -> str:
    header = ("| what (one GPU, ZeRO-1, bf16; the step benches: 1.3B preset) | tokens/s | MFU (measured GEMM peak) | MFU (989 TFLOP/s) "
              "| peak memory GB | result |")
    lines = [header, "|---|---|---|---|---|---|"]
    lines += [pretrain_row(stem, results) for stem in PRETRAIN_RUNS]
    for question in STEP_QUESTIONS:
        lines += step_rows(newest(question, results))
    return "\n".join(lines)


def main() -> int:
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
