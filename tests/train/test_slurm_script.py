"""launch/slurm_pretrain.sbatch run on this machine with stand-ins for Slurm's two commands: the script's
rendezvous and rank variables make a working 2-process run, and a SIGTERM to every task (what Slurm
sends before the time limit) saves a checkpoint that the requeued job resumes from, bitwise.

The job is a copy of the shared reference run (tests/train/conftest.py `run_a`: 16 steps, checkpoints at
6, 12, 16) resumed from its step-6 checkpoint: stopped by the SIGTERM after step 8, requeued, and compared
with the reference step by step (CPU float32, same world: equal losses, gradient norms, learning rates and
validation losses), with keep_last pruning across the signal-time checkpoint.

The stand-ins: `scontrol show hostnames` prints this host; `srun [options] CMD...` starts SLURM_NTASKS
copies of CMD, each with its SLURM_PROCID / SLURM_LOCALID, and exits with the first non-zero code."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from .conftest import BASE_SETS, REPO, copy_checkpoint, read_metrics, run_env

SBATCH = REPO / "launch" / "slurm_pretrain.sbatch"
SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || { code=$?; [ "$rc" -eq 0 ] && rc=$code; }; done
exit $rc
"""
SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && echo 127.0.0.1
"""


def _job_id() -> int:
    """A job id whose port (20000 + id % 20000, as the script derives it) is free here."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if 20000 <= port < 40000:
            return port - 20000


def _slurm_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    # PRETRAIN_PYTHON: this interpreter, not the script's default .venv/bin/python, which a machine that runs the
    # suite from another environment lacks (the GPU machine: every task ended at once with exit 127)
    return {**run_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(REPO),
            "PRETRAIN_PYTHON": sys.executable,
            "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_ID": str(_job_id()), "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "1"}


def _args(corpus: Path, out: Path) -> list[str]:
    """run_a's settings (BASE_SETS) with `out` as the output folder."""
    sets = [*BASE_SETS, f"data.manifest={corpus}", f"train.output_dir={out}"]
    return ["--config", "tiny", *[a for s in sets for a in ("--set", s)]]


def _cmdline(process: psutil.Process) -> list[str]:
    """The process's arguments, or [] for one that ended after it was listed (a short-lived helper of the
    launcher exits between `children()` and this call on a fast machine)."""
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


@pytest.mark.slow
def test_preempted_job_saves_and_the_requeued_job_resumes_bitwise(run_a: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    copy_checkpoint(run_a, 6, out)
    env = _slurm_env(tmp_path)
    job = subprocess.Popen(["bash", str(SBATCH), *_args(corpus, out)], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while max(read_metrics(out), default=0) < 8 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    # a job that ended before step 8 fails with its output (psutil.Process of its reaped pid would only raise
    # NoSuchProcess, which hid the exit-127 cause above)
    assert job.poll() is None, f"the job ended ({job.returncode}) before step 8:\n{job.communicate()[0][-3000:]}"
    ranks = [p for p in psutil.Process(job.pid).children(recursive=True) if "launch/pretrain.py" in _cmdline(p)]
    assert len(ranks) == 2, ranks
    for p in ranks:  # --signal=TERM@600: every task at once
        p.send_signal(signal.SIGTERM)
    log, _ = job.communicate(timeout=300)
    assert job.returncode == 0, log[-3000:]
    assert "world 2 x cpu" in log and "SIGTERM: saving a checkpoint" in log
    stop_step = int((out / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert 8 <= stop_step < 16
    requeued = subprocess.run(["bash", str(SBATCH), *_args(corpus, out)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300, check=False)
    assert requeued.returncode == 0, requeued.stdout[-3000:] + requeued.stderr[-3000:]
    ref, got = read_metrics(run_a), read_metrics(out)
    assert sorted(got) == list(range(7, 17))  # the requeued job went on from the signal-time checkpoint
    for step in range(7, 17):
        for key in ("loss", "grad_norm", "lr", "val_loss"):
            assert got[step].get(key) == ref[step].get(key), (step, key)
    complete = sorted({6, stop_step, 12, 16})[-3:]  # keep_last=3
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [f"step_{s:08d}" for s in complete]
