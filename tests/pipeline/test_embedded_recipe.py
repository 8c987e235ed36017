"""The embedded recipe's own readers (stdlib sources, pydoc) and shipped data, on a document budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from config.manifest import load_manifest

from .conftest import run_cli

pytest.importorskip("datatrove", reason="datatrove is not installed here (curation runs on it)")


@pytest.mark.slow
def test_embedded_recipe_runs_offline(tmp_path: Path) -> None:
    out = tmp_path / "embedded"
    proc = run_cli("--recipe", "embedded", "--output", str(out), "--limit-docs", "40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = load_manifest(out)
    m.verify()
    assert m.tokenizer.vocab_size == 8192 and m.recipe.name == "embedded"
    train = {s.name: s for s in m.splits["train"].sources}
    assert set(train) == {"stdlib", "pydoc", "planted"} and all(s.tokens > 0 for s in train.values())
    assert (train["stdlib"].weight, train["pydoc"].weight, train["planted"].weight) == (0.6, 0.35, 0.05)
    report = json.loads((out / "report.json").read_text())
    assert report["decontamination"]["removed"] == 2 and report["sources"]["planted"]["after_filters"] == 14
    pydoc = [json.loads(line) for f in (out / "work" / "filtered" / "pydoc").glob("*.jsonl")
             for line in f.read_text().splitlines()]
    assert len(pydoc) > 30 and all(d["id"].startswith("pydoc/") and "NAME\n" in d["text"] for d in pydoc)
    assert not any(" at 0x" in d["text"] for d in pydoc)  # addresses removed: renders are reproducible
    assert "manifest:" in proc.stdout
