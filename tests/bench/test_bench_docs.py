"""bench/README.md and docs/performance.md against what they describe: every link resolves, every suite and
part of bench/run.sh is documented, result files follow the naming scheme, and the performance page's
training table is bench/performance.py's output."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import performance

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "bench" / "README.md", REPO / "docs" / "performance.md"]
RESULT_NAME = re.compile(  # <question>_<hardware>_<date>[_companion][.ext] (bench/README.md)
    r"^[a-z0-9_.]+_(h100|h200|cpu|x[248])_\d{4}-\d{2}-\d{2}(_[a-z][a-z0-9_]*)?(\.(json|md|png|jsonl|txt|log))?$")


def _suites() -> dict[str, list[str]]:
    out = subprocess.run(["bash", "bench/run.sh", "list"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return {suite: parts.split() for suite, parts in (line.split(": ") for line in out.splitlines())}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_and_results_path_exists(page: Path) -> None:
    text = page.read_text()
    links = [t for t in re.findall(r"\]\(([^)#\s]+)\)", text) if not t.startswith(("http://", "https://"))]
    paths = re.findall(r"bench/results/[A-Za-z0-9_.-]+\.(?:md|json|png)", text)
    assert links, page
    missing = [t for t in links if not (page.parent / t).exists()] + [p for p in paths if not (REPO / p).exists()]
    assert not missing, f"{page.name} points at missing files: {missing}"


def test_every_suite_and_part_is_in_the_readme() -> None:
    readme = (REPO / "bench" / "README.md").read_text()
    suites = _suites()
    assert {"train", "inference", "parts", "data", "scale", "checks", "tests"} <= set(suites)
    for suite, parts in suites.items():
        assert f"| `{suite}` |" in readme, suite
        for part in parts:
            assert f"`{part}`" in readme, f"{suite}:{part}"


@pytest.mark.parametrize("target, message", [("nosuch", "unknown suite 'nosuch'"),
                                             ("train:nosuch", "unknown part 'nosuch' of suite train"),
                                             ("", "usage: bash bench/run.sh SUITE[:PART] OUT_DIR")])
def test_run_refuses_an_unknown_suite_or_part(target: str, message: str, tmp_path: Path) -> None:
    args = [target, str(tmp_path)] if target else [str(tmp_path)]
    proc = subprocess.run(["bash", "bench/run.sh", *args], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "results").exists()  # refused before any work


def test_run_refuses_a_suite_whose_packages_are_missing(tmp_path: Path) -> None:
    """`variants` imports mamba_ssm and causal_conv1d: without them (a CPU machine, or a GPU machine short of a
    wheel) the runner stops in one line naming them, before any work."""
    if importlib.util.find_spec("mamba_ssm") is not None:
        pytest.skip("mamba_ssm is installed here: nothing is missing")
    proc = subprocess.run(["bash", "bench/run.sh", "variants", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "suite variants needs mamba_ssm causal_conv1d" in proc.stderr
    assert not (tmp_path / "results").exists()


def test_results_follow_the_naming_scheme() -> None:
    odd = [p.name for p in (REPO / "bench" / "results").iterdir() if not RESULT_NAME.match(p.name)]
    assert not odd, f"rename to <question>_<hardware>_<date> (bench/README.md): {odd}"


def test_newest_picks_the_latest_date_of_that_question_only(tmp_path: Path) -> None:
    for name in ("q_1.3b_h100_2026-11-24", "q_1.3b_h200_2026-12-01", "q_1.3b_16k_h100_2026-12-05", "q_1.3b_h100"):
        (tmp_path / f"{name}.json").write_text("{}")
    assert performance.newest("q_1.3b", tmp_path).stem == "q_1.3b_h200_2026-12-01"
    with pytest.raises(FileNotFoundError, match="q_2.7b"):
        performance.newest("q_2.7b", tmp_path)


def test_performance_page_holds_the_computed_training_table() -> None:
    """docs/performance.md's training table is `python bench/performance.py` (rerun it when a result changes).
    Its nominal MFU is tokens/s x FLOPs per token / 989 TFLOP/s: checked here on the first step-bench row."""
    table = performance.table()
    assert table in (REPO / "docs" / "performance.md").read_text()
    path = performance.newest(performance.STEP_QUESTIONS[0])
    row = next(r for r in json.loads(path.read_text())["rows"] if r["status"] == "ok")
    nominal = row["tokens_per_s"] * row["flops_per_token"] / 989e12
    assert f"| {row['tokens_per_s']:,.0f} | {row['mfu']:.1%} | {nominal:.1%} |" in table


@pytest.mark.slow  # a python process importing torch
def test_scripts_without_out_write_to_bench_results_env(tmp_path: Path) -> None:
    """bench/run.sh sets BENCH_RESULTS to its output folder: a script's default results folder follows it,
    so nothing lands in the checkout's bench/results/."""
    env = {**os.environ, "BENCH_RESULTS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "bench/hw_ceilings.py", "--smoke"], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=120)
    assert json.loads((tmp_path / "hw_ceilings_smoke.json").read_text())["rows"]
    assert not (REPO / "bench" / "results" / "hw_ceilings_smoke.json").exists()
    # ...while the docs' table is still read from the committed results (bench/run.sh tests runs this suite)
    table = subprocess.run([sys.executable, "bench/performance.py"], cwd=REPO, env=env, check=True,
                           capture_output=True, text=True, timeout=120).stdout
    assert performance.table() in table
