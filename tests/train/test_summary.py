"""launch/summary.py: the end of scripts/run_default.sh names what the run made and compares the
validation perplexity with chance (the vocabulary size)."""

from __future__ import annotations

import json
from pathlib import Path

from launch.summary import summary_lines


def fake_outputs(root: Path) -> tuple[Path, Path]:
    data, run = root / "embedded", root / "tiny_run"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({
        "tokenizer": {"vocab_size": 8192},
        "splits": {"train": {"tokens": 1200000}, "validation": {"tokens": 30000}}}))
    (run / "final").mkdir(parents=True)
    (run / "final" / "meta.json").write_text(json.dumps({"step": 200}))
    (run / "eval_results.json").write_text(json.dumps({"val_ppl": {"ppl": 95.04}}))
    for fmt in ("hf", "onnx"):
        (run / "exports" / fmt).mkdir(parents=True)
    return data, run


def test_summary_names_every_output_and_chance(tmp_path: Path) -> None:
    data, run = fake_outputs(tmp_path)
    lines = summary_lines(data, run, tmp_path / "logs")
    assert lines == [
        f"data        {data / 'manifest.json'}  (1,200,000 train tokens, 30,000 validation tokens)",
        f"checkpoint  {run / 'final'}  (step 200)",
        f"eval table  {run / 'eval_results.json'}",
        f"exports     {run / 'exports' / 'hf'}, {run / 'exports' / 'onnx'}",
        f"loss plot   not written: python -m train.plot {run}",
        f"logs        {tmp_path / 'logs'}",
        "validation perplexity 95.0; chance (uniform over the 8,192-token vocabulary) would be 8,192",
    ]
    (run / "loss.png").write_bytes(b"png")
    assert f"loss plot   {run / 'loss.png'}" in summary_lines(data, run)


def test_summary_says_what_is_missing(tmp_path: Path) -> None:
    lines = summary_lines(tmp_path / "none", tmp_path / "run")
    assert lines[1] == f"checkpoint  {tmp_path / 'run' / 'final'} (missing)"
    assert lines[3] == f"exports     {tmp_path / 'run' / 'exports'} (missing)"
    assert not any(line.startswith("validation perplexity") for line in lines)
