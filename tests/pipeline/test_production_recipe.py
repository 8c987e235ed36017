"""production_100b: fails fast offline naming the source; with --data-root it reads local mirrors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from config.manifest import load_manifest
from config.recipe import load_recipe

from .conftest import docstring_rows, make_mirror, run_cli

pytest.importorskip("datatrove", reason="datatrove is not installed here (curation runs on it)")


def test_offline_fails_fast_naming_the_source(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = run_cli("--recipe", "production_100b", "--output", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: source fineweb_edu: cannot reach hub dataset HuggingFaceFW/fineweb-edu")
    assert time.monotonic() - start < 60 and not (tmp_path / "out").exists()


def test_missing_mirror_names_the_source(tmp_path: Path) -> None:
    recipe, _ = load_recipe("production_100b")
    first = recipe.sources[0]
    make_mirror(tmp_path, first.hub_id, [{"text": "x", "id": "0"}], config=first.hub_config)
    proc = run_cli("--recipe", "production_100b", "--output", str(tmp_path / "out"), "--data-root", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert f"source dclm: no local mirror of mlfoundations/dclm-baseline-1.0-parquet at {tmp_path}" in proc.stderr


@pytest.mark.slow
def test_runs_from_local_mirrors(tmp_path: Path) -> None:
    """The real recipe on a fake mirror of all 8 sources (shrunk with --set/--limit-docs to stay fast)."""
    recipe, _ = load_recipe("production_100b")
    rows = docstring_rows(64)
    mirrors = tmp_path / "mirrors"
    for i, source in enumerate(recipe.sources):
        docs = [{source.text_key: r["text"], source.id_key: f"{source.name}-{r['id']}",
                 **{field: f"{field}-{j}" for field in source.metadata.values()}} for j, r in enumerate(rows[i::8])]
        make_mirror(mirrors, source.hub_id, docs, config=source.hub_config, data_dir=source.hub_data_dir)
    out = tmp_path / "out"
    proc = run_cli("--recipe", "production_100b", "--output", str(out), "--data-root", str(mirrors),
                   "--limit-docs", "6", "--set", "tokenizer.vocab_size=400",
                   "--set", "decontamination.lm_eval_tasks=[]", "--set", "cluster.tasks=1",
                   "--set", "output.validation_fraction=0.2", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert {s: r["read"] for s, r in report["sources"].items()} == {s.name: 6 for s in recipe.sources}
    m = load_manifest(out)
    m.verify()
    assert [s.name for s in m.splits["train"].sources] == [s.name for s in recipe.sources]
    assert m.splits["train"].tokens > 0 and m.tokenizer.vocab_size == 400
    first = json.loads((out / "work" / "filtered" / "code" / "00000.jsonl").read_text().splitlines()[0])
    assert first["metadata"]["repo"].startswith("max_stars_repo_name-") and first["id"].startswith("code-")
