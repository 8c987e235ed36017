"""End to end on the small recipe: what was removed and why, shards, manifest, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from config.manifest import load_manifest

pytest.importorskip("datatrove", reason="datatrove is not installed here (curation runs on it)")
from pipeline.spm_tokenizer import load_hf_tokenizer

from .conftest import REPO

pytestmark = pytest.mark.slow  # launched runs / long exports: the full tier only (README, "Tests")


def curated_ids(out: Path, source: str) -> set[str]:
    return {json.loads(line)["id"] for f in (out / "work" / "curated").glob(f"*/{source}/*.jsonl")
            for line in f.read_text().splitlines()}


def test_planted_documents_removed_for_the_right_reason(curated: Path) -> None:
    kept = curated_ids(curated, "planted")
    good = {f"good/{k}" for k in ("lighthouse", "bread", "rivers", "chess", "bees", "library", "volcano",
                                  "garden", "trains", "memory")}
    assert kept == good  # every good document survives; bad, duplicate and contaminated ones do not
    report = json.loads((curated / "report.json").read_text())
    steps = {(st["stage"], s["step"].split(": ")[-1]): s for st in report["stages"] for s in st["steps"]}
    reasons = {name: s.get("reasons", {}) for (stage, name), s in steps.items() if stage == "prepare.planted"}
    assert reasons["🌍 Language ID (py3langid)"] == {"language_fr": 1}
    assert reasons["👯 Gopher Repetition"] == {"dup_line_frac": 1}
    assert reasons["🥇 Gopher Quality"] == {"gopher_short_doc": 1}
    assert reasons["⛰ C4 Quality"] == {"curly_bracket": 1, "lorem_ipsum": 1}
    assert reasons["🍷 FineWeb Quality"] == {"line_punct_ratio": 1}
    assert report["dedup"]["exact_removed"] == 2  # dup/exact-bread + the copied code file
    assert report["dedup"]["minhash_removed"] == 1  # dup/near-rivers
    assert report["decontamination"] == {"removed": 2, "by_task": {"local_passages": 2}}
    assert "copy-of-" not in " ".join(curated_ids(curated, "code"))


def test_manifest_totals_equal_shard_contents(curated: Path) -> None:
    m = load_manifest(curated / "manifest.json")
    m.verify()
    assert m.tokenizer.vocab_size == 700 and m.token_dtype == "uint16" and m.eos_id == 2
    for entry in m.splits.values():
        docs = tokens = 0
        for source in entry.sources:
            for shard in source.shards:
                ids = np.fromfile(m.resolve(shard.path), dtype=np.uint16)
                ends = np.fromfile(m.resolve(shard.index), dtype=np.uint64)
                assert len(ids) == shard.tokens and len(ends) == shard.documents and ends[-1] == len(ids)
                assert (ids[ends - 1] == m.eos_id).all() and (ids == m.eos_id).sum() == len(ends)
                docs, tokens = docs + len(ends), tokens + len(ids)
        assert (docs, tokens) == (entry.documents, entry.tokens)
    code = next(s for s in m.splits["train"].sources if s.name == "code")
    assert len(code.shards) > 1  # shard_tokens splits it
    assert abs(sum(s.weight for s in m.splits["train"].sources) - 1) < 1e-9 and code.weight == 0.5


def test_shards_decode_to_the_curated_text(curated: Path) -> None:
    m = load_manifest(curated)
    sp = spm.SentencePieceProcessor(model_file=str(m.resolve(m.tokenizer.model)))
    hf = load_hf_tokenizer(m.resolve(m.tokenizer.json_path))
    for split in ("train", "validation"):
        for source in m.splits[split].sources:
            folder = curated / "work" / "curated" / split / source.name
            texts = {json.loads(line)["text"] for f in folder.glob("*.jsonl") for line in f.read_text().splitlines()}
            decoded = set()
            for shard in source.shards:
                ids = np.fromfile(m.resolve(shard.path), dtype=np.uint16).tolist()
                ends = np.fromfile(m.resolve(shard.index), dtype=np.uint64).tolist()
                for start, end in zip([0] + ends[:-1], ends, strict=True):
                    doc = ids[start:end - 1]
                    decoded.add(sp.decode(doc))
                    assert hf.decode(doc) == sp.decode(doc)
            assert decoded == texts


def test_datatrove_dataset_reads_the_shards(curated: Path) -> None:
    from datatrove.utils.dataset import DatatroveFolderDataset

    m = load_manifest(curated)
    folder = m.source_folders("train")["code"]
    ds = DatatroveFolderDataset(str(folder), seq_len=64, token_size=m.token_size, return_positions=True)
    code = next(s for s in m.splits["train"].sources if s.name == "code")
    assert len(ds) == sum(shard.tokens // 65 for shard in code.shards)  # windows of seq_len + 1 per file
    item = ds[3]
    ids, pos = item["input_ids"], item["positions"]
    assert ids.shape == pos.shape == (65,)
    # positions restart right after each EOS
    for i in np.nonzero(ids[:-1].numpy() == m.eos_id)[0]:
        assert pos[i + 1] == 0


def shard_digests(out: Path) -> dict[str, str]:
    m = json.loads((out / "manifest.json").read_text())
    digests = {s["path"]: s["sha256"] for sp in m["splits"].values() for src in sp["sources"] for s in src["shards"]}
    return digests | {"tokenizer": m["tokenizer"]["sha256"], "tokenizer.json": m["tokenizer"]["json_sha256"]}


def test_killed_run_resumes_to_identical_output(small_recipe: dict, curated: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "pipeline" / "curate.py"), "--recipe", str(small_recipe["path"]),
           "--output", str(out), "--data-root", str(small_recipe["data_root"]), "--workers", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    marker = out / "work" / "logs" / "minhash.signatures" / "completions" / "00000"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its pool workers, mid-pipeline
    proc.wait()
    assert not (out / "manifest.json").exists()
    # also lose a finished task of an earlier stage (marker and output), as if its node had died
    (out / "work" / "logs" / "exact.filter" / "completions" / "00001").unlink()
    for f in (out / "work" / "exact_deduped").glob("*/00001.jsonl"):
        f.unlink()
    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "done before: skipped" in resumed.stderr  # completed tasks were not run again
    assert shard_digests(out) == shard_digests(curated)
    m = load_manifest(out)
    m.verify()


def test_rerun_of_a_finished_run_changes_nothing(small_recipe: dict, curated: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(curated, out)
    manifest = (out / "manifest.json").read_bytes()
    cmd = [sys.executable, str(REPO / "pipeline" / "curate.py"), "--recipe", str(small_recipe["path"]),
           "--output", str(out), "--data-root", str(small_recipe["data_root"])]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "manifest.json").read_bytes() == manifest
    assert "train" in proc.stdout and "manifest:" in proc.stdout  # the report table is printed


@pytest.mark.parametrize("change", ["--limit-docs", "--set"])
def test_output_folder_of_another_recipe_is_refused(small_recipe: dict, curated: Path, tmp_path: Path,
                                                    change: str) -> None:
    from .conftest import run_cli

    out = tmp_path / "copy"
    shutil.copytree(curated / "work", out / "work")
    extra = ["--limit-docs", "5"] if change == "--limit-docs" else ["--set", "output.seed=8"]
    proc = run_cli("--recipe", str(small_recipe["path"]), "--output", str(out), "--data-root",
                   str(small_recipe["data_root"]), *extra)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "different recipe" in proc.stderr


def test_console_shows_stages_and_report_full_logs_go_to_files(curated: Path) -> None:
    """By default datatrove's per-task INFO lines (pipelines, stats, progress) stay in the task logs."""
    console = (curated.parent / "console.txt").read_text()
    assert "stage 1/" in console and "manifest:" in console
    assert "Launching pipeline" not in console and "Stats:" not in console
    task_logs = "".join(p.read_text() for p in (curated / "work" / "logs").glob("*/logs/task_*.log"))
    assert "Launching pipeline" in task_logs and "Stats" in task_logs
