"""bench/fp8_train.py's summary of launched runs (the launches themselves: `--smoke`, docs/fp8.md), from
synthetic metrics.jsonl files: steady tokens/s, peak memory, smoothed loss, the comparison and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.fp8_train import compare, parse_variants, plot, smoothed, summarise


def write_run(folder: Path, losses: list[float], rate: float, mem: float) -> Path:
    """metrics.jsonl of a run: step 1 slow and with the capture's memory, then `rate` tokens/s at `mem` GB."""
    folder.mkdir(parents=True)
    lines = [{"step": s, "loss": loss, "tokens": 8192 * s, "tokens_per_s": rate / 10 if s == 1 else rate,
              "mem_gb": mem + 5 if s == 1 else mem} for s, loss in enumerate(losses, 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_variants_and_smoothing() -> None:
    assert parse_variants("bf16,fp8_rowwise:30", 300) == [("bf16", 300), ("fp8_rowwise", 30)]
    with pytest.raises(SystemExit, match="unknown variant 'fp16'"):
        parse_variants("bf16,fp16", 300)
    assert smoothed([4.0, 2.0, 6.0, 8.0], window=2) == [4.0, 3.0, 4.0, 7.0]


def test_rows_compare_each_run_with_the_first(tmp_path: Path) -> None:
    bf16 = summarise("bf16", write_run(tmp_path / "a", [6.0] * 40 + [4.0] * 60, 50_000.0, 27.0), 0)
    fp8 = summarise("fp8", write_run(tmp_path / "b", [6.0] * 40 + [4.04] * 60, 65_000.0, 26.0), 0)
    short = summarise("fp8_rowwise", write_run(tmp_path / "c", [6.0] * 20, 55_000.0, 26.5), 0)
    rows = [bf16, fp8, short, summarise("fp8", tmp_path / "missing", 1)]
    compare(rows)
    assert (bf16["tokens_per_s"], bf16["peak_mem_gb"], bf16["first_step_mem_gb"]) == (50_000.0, 27.0, 32.0)
    assert fp8["speedup"] == pytest.approx(1.3) and short["speedup"] == pytest.approx(1.1)
    assert fp8["loss_smoothed"] == pytest.approx(4.04) and fp8["loss_diff_pct"] == pytest.approx(1.0)
    assert "loss_diff_pct" not in short  # another length: a throughput-only row
    assert rows[3] == {"variant": "fp8", "steps": 0, "status": "exit 1"}
    plot(rows, tmp_path / "loss.png", "test")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
