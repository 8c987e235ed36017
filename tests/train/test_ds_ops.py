"""train/ds_ops.py: a stale torch-extensions build lock is reported in one line instead of a silent
wait, a live one is left alone, and a world of one never builds DeepSpeed's shared-memory comm op."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.ds_ops import check_build_locks, lock_holders, skip_shm_comm_op
from train.errors import TrainingError

from .conftest import BASE_SETS, PRETRAIN, REPO, run_env


def stale_lock(root: Path, op: str) -> Path:
    """What an interrupted FileBaton leaves: an empty `lock` file in the op's build folder, open nowhere."""
    (root / op).mkdir(parents=True)
    lock = root / op / "lock"
    os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
    return lock


def test_stale_lock_is_one_line_naming_the_file(tmp_path: Path) -> None:
    lock = stale_lock(tmp_path, "cpu_adam")
    with pytest.raises(TrainingError) as err:
        check_build_locks(tmp_path)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and f"rm {lock}" in msg and "cpu_adam" in msg


def test_live_lock_is_waited_for_and_ignored_ops_are_skipped(tmp_path: Path) -> None:
    lock = stale_lock(tmp_path, "deepspeed_shm_comm")
    check_build_locks(tmp_path, ignore=("deepspeed_shm_comm",))  # this run does not build it
    fd = os.open(lock, os.O_RDONLY)  # a build in progress keeps its lock open
    try:
        assert lock_holders(lock) == [os.getpid()]
        check_build_locks(tmp_path)
    finally:
        os.close(fd)
    assert lock_holders(lock) == []


def test_world_of_one_skips_the_shm_op_and_larger_worlds_keep_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, ShareMemCommBuilder.NAME, True)
    assert skip_shm_comm_op(2) == ()
    assert deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] is True
    assert skip_shm_comm_op(1) == (ShareMemCommBuilder.NAME,)
    monkeypatch.setattr(ShareMemCommBuilder, "load", lambda self, verbose=False: pytest.fail("built the shm op"))
    assert build_shm_op() is None


def pretrain_dry_run(corpus: Path, tmp_path: Path, extensions: Path) -> subprocess.CompletedProcess:
    sets = [*BASE_SETS, f"data.manifest={corpus}", f"train.output_dir={tmp_path / 'out'}",
            "train.global_batch_tokens=256"]
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run([sys.executable, str(PRETRAIN), "--config", "tiny", *args, "--dry-run"], cwd=REPO,
                          env={**run_env(), "TORCH_EXTENSIONS_DIR": str(extensions)}, capture_output=True,
                          text=True, timeout=180)


def test_one_process_run_ignores_a_stale_shm_lock_and_stops_on_another(corpus: Path, tmp_path: Path) -> None:
    """The issue's hang: `python launch/pretrain.py --dry-run` waited forever on the shm op's stale lock."""
    extensions = tmp_path / "ext"
    stale_lock(extensions, "deepspeed_shm_comm")
    proc = pretrain_dry_run(corpus, tmp_path, extensions)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lock = stale_lock(extensions, "cpu_adam")
    proc = pretrain_dry_run(corpus, tmp_path, extensions)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: stale build lock {lock} (left by an interrupted build of cpu_adam; no process here has it "
        f"open): delete it (rm {lock}) and rerun, unless a build on another machine sharing this folder is running")
