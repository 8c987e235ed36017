"""bench/scale_runs.py on CPU (gloo) over the test corpus: the driver of the multi-GPU runs, so that it
cannot rot."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import scale_runs

from .conftest import REPO, VOCAB, run_env


def test_results_name_the_ranks_device_not_this_processs_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The results' device is the launched ranks': the CPU under DS_ACCELERATOR=cpu although this process sees a
    GPU, and the CPU when CUDA_VISIBLE_DEVICES hides the GPUs after this process probed CUDA (is_available() keeps
    the first probe's count, device_count() reads the variable again: the GPU machine's pytest worker got cuda,
    then get_device_name's "Invalid device id")."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert scale_runs._device().type == "cpu"
    monkeypatch.delenv("DS_ACCELERATOR")
    assert scale_runs._device().type == "cuda"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # CUDA_VISIBLE_DEVICES="" after the probe
    assert scale_runs._device().type == "cpu"


@pytest.mark.slow
def test_preempt_and_resume_smoke(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference run, SIGTERM mid-run, resume on 1 process (universal) and on 2 (--resume auto): both
    continue the reference's losses (float32 on CPU: same world bitwise, other world within 1e-5). The
    launches inherit this environment, the other launched tests' run_env: one thread per rank (2 ranks of 2
    threads each, beside the other xdist worker, oversubscribe CI's 2 cores), a CPU world on a GPU machine too."""
    for key in ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR"):
        monkeypatch.setenv(key, run_env()[key])
    args = ["preempt", "--smoke", "--gpus", "2", "--out", str(tmp_path),
            "--set", f"data.manifest={corpus}", "--set", f"model.vocab_size={VOCAB}"]
    assert scale_runs.main(args) == 0
    rows = json.loads((tmp_path / "scale_preempt_tiny_smoke.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok"] * 4
    reference, preempted, other, same = rows
    assert reference["steps"] == 12 and preempted["steps"] < 12
    assert other["world_size"] == 1 and same["world_size"] == 2
    assert same["max_loss_diff_vs_reference"] == 0.0
    assert other["max_loss_diff_vs_reference"] is not None and other["max_loss_diff_vs_reference"] < 1e-5
    assert (tmp_path / "scale_preempt_tiny_smoke.md").read_text().startswith("# preempt")
    runs = tmp_path / "scale_preempt_tiny_smoke_runs"
    assert not (runs / "reference" / "checkpoints").exists()  # train.save_final=false: nothing written
    assert not (runs / "reference" / "final").exists()


def test_launch_tail_reads_only_the_last_launch(tmp_path: Path) -> None:
    """A failed launch prints its own last lines, not an earlier launch's."""
    log = tmp_path / "launch.log"
    log.write_text("first launch\nok\n")
    start = log.stat().st_size
    with log.open("a") as f:
        f.write("".join(f"line {i}\n" for i in range(50)) + "[rank 1] error: boom")
    tail = scale_runs.launch_tail(log, start, lines=3)
    assert tail == ["line 48", "line 49", "[rank 1] error: boom"]


@pytest.mark.parametrize("stage", ["checks:determinism", "scale", "fp8:1.3b", "fp8:once",
                                   pytest.param("fp8:2.7b", marks=pytest.mark.slow)])
@pytest.mark.slow
def test_gpu_stages_launch_valid_run_configs(stage: str, corpus: Path, tmp_path: Path) -> None:
    """bench/run.sh's parts that drive scale_runs or fp8_train, with CHECK_ONLY=1: every run they would
    launch has a valid config and batch split at its GPU counts. (Before the driver shortened the warm-up,
    each would have stopped at once on the presets' 2000 warm-up steps, on a lent multi-GPU machine.)"""
    env = {**os.environ, "CHECK_ONLY": "1", "DATA": str(corpus),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "bench/run.sh", stage, str(tmp_path)], cwd=REPO, env=env, timeout=300, check=True)
    log = (tmp_path / "log.txt").read_text()
    exits = re.findall(r"=== exit (\d+)", log)
    assert exits and set(exits) == {"0"}, log
    assert log.count("run configs valid") == len(exits)


@pytest.mark.parametrize(("sets", "gpus", "key"), [
    (["train.warmup_steps=2000"], "1", "train.warmup_steps"),  # a preset's warm-up, given explicitly
    ([], "3", "train.global_batch_tokens"),                     # 512 sequences over 4 x 3
])
def test_check_stops_a_bad_run_before_launch(sets: list[str], gpus: str, key: str) -> None:
    args = ["scaling", "--config", "1.3b", "--gpus", gpus, "--steps", "30", "--check", "--set", "data.manifest=unused"]
    with pytest.raises(SystemExit, match=re.escape(key)):
        scale_runs.main([*args, *[a for s in sets for a in ("--set", s)]])


def test_a_timed_out_launch_leaves_no_process_behind(tmp_path: Path) -> None:
    """`run` past its timeout stops the launcher and the processes under it (a rank left running would go
    on using the GPU while the next measurement starts)."""
    import psutil

    log = tmp_path / "launch.log"
    assert scale_runs.run([sys.executable, str(REPO / "tests" / "helpers" / "spawn_sleeper.py")], log, timeout=3) == 124
    child = int(log.read_text().split()[0])
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
