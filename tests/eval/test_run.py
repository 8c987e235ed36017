"""End to end: lm-eval's real evaluator on the shipped local tasks, and eval/run.py as a CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import repo_first_pythonpath

from .conftest import need_lm_eval

DATA = Path(__file__).resolve().parent / "data"
REPO = Path(__file__).resolve().parents[2]


def _is_fraction(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_simple_evaluate_runs_local_tasks_and_group(lm, tasks_dir):
    from lm_eval import simple_evaluate

    from eval.benchmarks import build_task_manager, load_tasks

    names = ["local_suite"]
    manager = build_task_manager(names, tasks_dir)
    tasks = load_tasks(manager, names, allow_code_execution=False)
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=2, log_samples=False,
                              bootstrap_iters=0)
    res = results["results"]
    assert {"local_mc", "local_gen"} <= set(res)
    assert _is_fraction(res["local_mc"]["acc,none"]) and _is_fraction(res["local_mc"]["acc_norm,none"])
    assert _is_fraction(res["local_gen"]["exact_match,none"])
    assert results["n-shot"]["local_mc"] == 2
    assert results["n-samples"]["local_mc"]["effective"] == 16
    assert results["config"]["step"] == 0  # get_model_info of the backend


@pytest.mark.slow
def test_cli_end_to_end_writes_results_json(run_cli, tiny_bundle_dir, tasks_dir, manifest_path, tmp_path):
    out = tmp_path / "results" / "eval.json"
    args = ("--checkpoint", str(tiny_bundle_dir), "--benchmarks", "local_mc,local_gen,val_ppl",
            "--tasks-dir", str(tasks_dir), "--manifest", str(manifest_path), "--output", str(out),
            "--batch-size", "4", "--limit", "6", "--compare", "--set", "eval.val_seq_len=32",
            "--set", "eval.batch_size=2")
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    again = run_cli(*args)  # a rerun (e.g. after an interruption) answers every request from the cache
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Cached requests: 24, Requests remaining: 0" in again.stderr  # 6 docs x 4 choices
    assert "Cached requests: 6, Requests remaining: 0" in again.stderr
    assert json.loads(out.read_text())["results"] == doc["results"]
    res = doc["results"]
    assert _is_fraction(res["local_mc"]["acc,none"]) and res["local_mc"]["acc_stderr,none"] >= 0
    assert _is_fraction(res["local_gen"]["exact_match,none"])
    assert doc["n-samples"]["local_mc"]["effective"] == 6  # --limit
    assert doc["config"]["model"] == "hybrid" and doc["config"]["step"] == 0
    ckpt = doc["checkpoint"]
    assert ckpt["step"] == 0 and ckpt["model_config"]["pattern"] == "MAMA"
    assert ckpt["tokenizer"]["vocab_size"] == 512 and ckpt["tokenizer"]["special_ids"]["eos"] == 2
    ppl = doc["val_ppl"]
    assert ppl["seq_len"] == 32 and ppl["windows"] == 6 and ppl["packing"] == "document"
    assert math.isclose(ppl["ppl"], math.exp(ppl["nll"]))
    assert doc["eval"]["batch_size"] == 4  # the flag wins over --set
    tasks_in_table = {(r["task"], r["metric"]) for r in doc["table"]}
    assert {("local_mc", "acc"), ("local_gen", "exact_match"), ("val_ppl", "ppl"), ("val_ppl/prose", "ppl")} <= tasks_in_table
    assert doc["references"] == {}  # no reference model has scores for local tasks
    header = [c.strip() for c in proc.stdout.splitlines()[0].split("|")]
    assert header == ["task", "metric", "value", "stderr", "few-shot"]


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("eval: ")
    return last


@pytest.mark.parametrize(
    ("names", "expected"),  # not `benchmark`: pytest-benchmark owns that fixture name
    [
        ("no_such_benchmark", "unknown benchmark no_such_benchmark"),
        ("hellaswag", "hellaswag (dataset Rowan/hellaswag): ConnectionError: Couldn't reach 'Rowan/hellaswag'"),
        ("broken_local", "broken_local (dataset json"),
    ],
)
@pytest.mark.slow
def test_cli_errors_are_one_line(run_cli, tiny_bundle_dir, tmp_path, names, expected):
    proc = run_cli("--checkpoint", str(tiny_bundle_dir), "--benchmarks", names,
                   "--tasks-dir", str(DATA / "broken_task"), "--output", str(tmp_path / "r.json"))
    last = _one_line_error(proc)
    assert expected in last
    if names == "broken_local":
        assert str(DATA / "broken_task" / "missing.jsonl") in last
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_cli_bad_inputs_fail_before_any_work(run_cli, tiny_bundle_dir, tmp_path):
    assert "does not exist" in _one_line_error(run_cli("--checkpoint", str(tmp_path / "nope"), "--benchmarks", "x"))
    assert "eval.limit" in _one_line_error(run_cli("--checkpoint", str(tiny_bundle_dir), "--limit", "0"))
    assert "needs a curation manifest" in _one_line_error(
        run_cli("--checkpoint", str(tiny_bundle_dir), "--benchmarks", "val_ppl"))


def test_sandbox_has_no_network_and_limits_file_size():
    """eval/sandbox.py: the command runs in its own network namespace (no route out) with RLIMIT_FSIZE."""
    import subprocess
    import sys

    from eval import sandbox

    probe = Path(__file__).resolve().parents[1] / "helpers" / "sandbox_probe.py"
    try:
        command = sandbox.sandboxed([sys.executable, str(probe)])
    except sandbox.SandboxError as exc:
        pytest.skip(f"no user namespaces on this machine: {exc}")
    proc = subprocess.run(command, capture_output=True, text=True,
                          preexec_fn=sandbox._limits, timeout=60)
    assert proc.returncode == 0, proc.stderr
    limit, network = proc.stdout.splitlines()
    assert int(limit) == sandbox.FSIZE_LIMIT and network.startswith("no network"), proc.stdout


def test_code_execution_reruns_the_evaluation_in_the_sandbox(tiny_bundle_dir, monkeypatch):
    from eval import run, sandbox

    calls = []
    monkeypatch.setattr(sandbox, "rerun_sandboxed", lambda argv: calls.append(argv) or 0)
    monkeypatch.setattr(run, "run", lambda *a: pytest.fail("model-written code must not run outside the sandbox"))
    args = ["--checkpoint", str(tiny_bundle_dir), "--benchmarks", "humaneval", "--allow-code-execution"]
    assert run.main(args) == 0
    assert calls == [[str(Path(run.__file__).resolve()), *args]]
    monkeypatch.setenv(sandbox.MARK, "1")  # inside the sandbox: evaluate
    with pytest.raises(pytest.fail.Exception, match="outside the sandbox"):
        run.main(args)


@pytest.mark.slow
def test_lm_eval_cli_runs_the_shipped_tasks_from_another_folder(tiny_bundle_dir, tmp_path):
    """lm-eval's own CLI through the wrapper, started outside the repository: the backend is registered
    and the shipped tasks' data files resolve against their YAML's folder, not the working directory."""
    need_lm_eval()
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": repo_first_pythonpath(), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home")}
    proc = subprocess.run(
        [sys.executable, "-m", "eval.lm_eval_cli", "--model", "hybrid", "--model_args",
         f"checkpoint={tiny_bundle_dir}", "--tasks", "local_mc", "--include_path", str(REPO / "eval" / "tasks"),
         "--device", "cpu", "--limit", "3", "--output_path", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert 0 <= results["results"]["local_mc"]["acc,none"] <= 1
