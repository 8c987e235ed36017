"""What a pipeline run made, in a few lines: the end of scripts/run_default.sh.

    python launch/summary.py --data outputs/embedded --run outputs/tiny_run [--logs outputs/logs]

Names the curated data, the consolidated checkpoint, the eval results, the exports, the loss plot
(`python -m train.plot RUN` writes RUN/loss.png) and the logs, and puts the validation perplexity next
to chance: a model that learned nothing spreads its probability evenly over the vocabulary, so its
perplexity is the vocabulary size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def summary_lines(data: Path, run: Path, logs: Path | None = None) -> list[str]:
    """The summary, one line per thing made (a missing one says so)."""
    manifest = _read_json(data / "manifest.json")
    final = run / "final"
    step = _read_json(final / "meta.json").get("step")
    results = run / "eval_results.json"
    ppl = (_read_json(results).get("val_ppl") or {}).get("ppl")
    exports = sorted(p for p in (run / "exports").glob("*") if p.is_dir())
    plot = run / "loss.png"

    def where(path: Path, what: str) -> str:
        return f"{path}{what}" if path.exists() else f"{path} (missing)"

    tokens = {split: entry["tokens"] for split, entry in manifest.get("splits", {}).items()}
    lines = [
        f"data        {where(data / 'manifest.json', '')}"
        + (f"  ({', '.join(f'{n:,} {s} tokens' for s, n in tokens.items())})" if tokens else ""),
        f"checkpoint  {where(final, f'  (step {step})' if step is not None else '')}",
        f"eval table  {where(results, '')}",
        f"exports     {', '.join(map(str, exports)) if exports else where(run / 'exports', '')}",
        f"loss plot   {plot}" if plot.exists() else f"loss plot   not written: python -m train.plot {run}",
    ]
    if logs is not None:
        lines.append(f"logs        {logs}")
    vocab = manifest.get("tokenizer", {}).get("vocab_size")
    if ppl is not None:
        chance = f"; chance (uniform over the {vocab:,}-token vocabulary) would be {vocab:,}" if vocab else ""
        lines.append(f"validation perplexity {ppl:.1f}{chance}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="curation output folder (holds manifest.json)")
    p.add_argument("--run", type=Path, required=True, help="training output folder (train.output_dir)")
    p.add_argument("--logs", type=Path, help="folder of the stages' full logs")
    args = p.parse_args(argv)
    print("\n".join(summary_lines(args.data, args.run, args.logs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
