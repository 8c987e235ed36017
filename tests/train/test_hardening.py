"""Hardening of runs and checkpoints without launching training: the output-folder lock, the
COMPLETE file list and the fallback to an intact checkpoint, damaged state files, malicious pickles
(ours and DeepSpeed's loaders), the model-config check on resume and the fresh-start refusal."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from config.schema import load_run_config, save_run_config
from model.weights import CheckpointError
from train.checkpoint import latest_complete, read_state, reading, resolve_resume
from train.checkpoint_files import complete_record, enforce_data_only_loading, load_data
from train.errors import TrainingError
from train.run_lock import RunLock
from train.trainer import check_fresh_start, check_model_matches

from tests.conftest import repo_first_pythonpath

from .conftest import PRETRAIN, REPO, run_env

STATE = {"step": 0, "consumed_samples": 0, "consumed_tokens": 0, "seq_len": 64, "world_size": 2, "zero_stage": 2,
         "manifest_sha256": ""}


class WritesFile:
    """A pickle payload that, if unpickled by plain pickle, creates a file (the attack)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # noqa: ANN204
        return (Path.write_text, (self.target, "pwned"))


def make_step(root: Path, step: int, sets: tuple[str, ...] = ()) -> Path:
    """A complete step folder as Checkpointer.save lays it out (small tensors, 2 ranks), COMPLETE last."""
    folder = root / f"step_{step:08d}"
    (folder / "rng").mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(3)}}, folder / "mp_rank_00_model_states.pt")
    for rank in range(2):
        torch.save({"state": torch.zeros(2)}, folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        torch.save({"torch": torch.get_rng_state()}, folder / "rng" / f"rank_{rank:05d}.pt")
    (folder / "trainer_state.json").write_text(json.dumps({**STATE, "step": step}))
    save_run_config(load_run_config("tiny", list(sets)), folder / "run_config.yaml")
    (folder / "COMPLETE").write_bytes(complete_record(folder.name, folder))
    return folder


# ---- the output-folder lock ------------------------------------------------------------------------
def test_second_run_on_a_folder_is_refused_naming_host_and_pid(tmp_path: Path) -> None:
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(TrainingError, match=f"in use by another run \\(host .+ pid {os.getpid()}\\)"):
        RunLock(tmp_path).acquire()
    first.release()
    RunLock(tmp_path).acquire()  # free again once released


def test_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, str(REPO / "tests" / "helpers" / "hold_run_lock.py"),
                               str(tmp_path)], cwd=REPO, env={**os.environ, "PYTHONPATH": repo_first_pythonpath()},
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(TrainingError, match=f"pid {holder.pid}"):
        RunLock(tmp_path).acquire()
    holder.kill()  # kill -9: no clean-up ran
    holder.wait()
    lock = RunLock(tmp_path)
    lock.acquire()
    assert f"pid {os.getpid()}" in lock.path.read_text()


# ---- complete, intact checkpoints -----------------------------------------------------------------
def test_resume_auto_falls_back_past_a_damaged_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "checkpoints"
    old, new = make_step(root, 6), make_step(root, 12)
    assert latest_complete(root) == new
    (new / "mp_rank_00_model_states.pt").unlink()
    (new / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with caplog.at_level(logging.WARNING):
        assert resolve_resume("auto", root) == old
    assert "step_00000012 is damaged (mp_rank_00_model_states.pt is missing)" in caplog.text
    with pytest.raises(CheckpointError, match="step_00000012 is damaged: mp_rank_00_model_states.pt is missing"):
        resolve_resume(str(new), root)


@pytest.mark.parametrize("damage", ["truncate_optim", "truncate_rng", "broken_state", "older_complete_no_rng"])
def test_damaged_files_are_found_without_loading(damage: str, tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    old, new = make_step(root, 6), make_step(root, 12)
    if damage.startswith("truncate"):
        path = next(new.rglob("zero_pp_rank_1_*" if damage == "truncate_optim" else "rank_00001.pt"))
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "broken_state":
        (new / "trainer_state.json").write_text('{"step": 12')
    else:  # a COMPLETE written before it listed the files: the expected files are looked for
        (new / "COMPLETE").write_text("step_00000012\n")
        (new / "rng" / "rank_00001.pt").unlink()
    assert latest_complete(root) == old
    for folder in (old, new):
        (folder / "trainer_state.json").write_text("not json")
    with pytest.raises(CheckpointError, match="every complete checkpoint under .* is damaged"):
        latest_complete(root)


def test_broken_trainer_state_is_one_line(tmp_path: Path) -> None:
    folder = make_step(tmp_path, 6)
    (folder / "trainer_state.json").write_text('{"step": 6}')
    with pytest.raises(CheckpointError, match="trainer_state.json is missing or damaged \\(KeyError"):
        read_state(folder)


# ---- checkpoints are data, not code -----------------------------------------------------------------
def test_malicious_pickle_is_refused_by_our_loader(tmp_path: Path) -> None:
    target, path = tmp_path / "pwned", tmp_path / "rank_00000.pt"
    torch.save({"torch": WritesFile(target)}, path)
    with pytest.raises(CheckpointError, match="holds more than tensors and plain data"), reading(tmp_path):
        load_data(path)
    assert not target.exists()


def test_malicious_pickle_is_refused_by_deepspeeds_loader(tmp_path: Path) -> None:
    """DeepSpeed's zero_to_fp32 calls torch.load(weights_only=False): enforce_data_only_loading overrides it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = make_step(tmp_path, 6)
    target = tmp_path / "pwned"
    torch.save({"module": WritesFile(target)}, folder / "mp_rank_00_model_states.pt")
    enforce_data_only_loading()
    with pytest.raises(CheckpointError, match="holds more than tensors"), reading(folder):
        get_fp32_state_dict_from_zero_checkpoint(str(tmp_path), tag=folder.name)
    assert not target.exists()


def test_export_of_a_malicious_checkpoint_is_one_line_exit_2(tmp_path: Path) -> None:
    folder = make_step(tmp_path / "run" / "checkpoints", 6)
    target = tmp_path / "pwned"
    torch.save({"module": WritesFile(target)}, folder / "mp_rank_00_model_states.pt")
    (folder / "COMPLETE").write_bytes(complete_record(folder.name, folder))
    proc = subprocess.run([sys.executable, str(PRETRAIN), "--config", "tiny", "--set",
                           f"train.output_dir={tmp_path / 'run'}", "--export", "auto"],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: a file of ") and "Traceback" not in proc.stderr
    assert not target.exists()


# ---- resume checks ----------------------------------------------------------------------------------
def test_resume_with_another_architecture_names_the_keys(tmp_path: Path) -> None:
    folder = make_step(tmp_path, 6, ("model.n_layers=6",))
    check_model_matches(load_run_config("tiny", ["model.n_layers=6", "model.max_seq_len=512"]), folder)
    with pytest.raises(Exception, match="differs from the one .* at: model.n_layers; set them"):
        check_model_matches(load_run_config("tiny", ["model.n_layers=4"]), folder)


def test_fresh_start_into_an_existing_run_is_refused(tmp_path: Path) -> None:
    check_fresh_start(tmp_path, tmp_path / "checkpoints")  # an empty folder is fine
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(Exception, match="--resume none: .* holds a run .* --force"):
        check_fresh_start(tmp_path, tmp_path / "checkpoints")


def test_export_into_an_existing_folder_is_refused(tmp_path: Path) -> None:
    from train.trainer import export_checkpoint

    make_step(tmp_path / "run" / "checkpoints", 6)
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    cfg = load_run_config("tiny", [f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(Exception, match="export destination .*mine exists: pass --force"):
        export_checkpoint(cfg, "auto", str(dest))
    assert (dest / "notes.txt").read_text() == "keep me"


def test_stale_shared_memory_segments_are_removed(tmp_path: Path) -> None:
    """A segment nobody maps and older than a minute goes; one a live process maps, or a new one, stays."""
    import mmap

    from train import shm

    names = [f"{shm.PREFIX}{os.getuid()}_test-i29_{os.getpid()}_{k}" for k in ("dead", "mapped", "new")]
    paths = [shm.SHM / n for n in names]
    try:
        for path in paths:
            path.write_bytes(b"\0" * 4096)
        for path in paths[:2]:
            os.utime(path, (0, 0))
        with open(paths[1], "r+b") as fh, mmap.mmap(fh.fileno(), 4096):
            removed = shm.remove_stale_segments()
        assert str(paths[0]) in removed and not paths[0].exists()
        assert paths[1].exists() and paths[2].exists()
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


def test_fatal_error_path_releases_the_segment(tmp_path: Path) -> None:
    """fail_loudly's one-line exit (os._exit, no atexit) unlinks this rank's DeepSpeed segment too."""
    script = REPO / "tests" / "helpers" / "fail_loudly_with_segment.py"
    port = f"i29{os.getpid()}"
    segment = Path(f"/dev/shm/{'deepspeed_allreduce_buffer_'}{os.getuid()}_127.0.0.1_{port}_0")
    proc = subprocess.run([sys.executable, str(script), port], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": repo_first_pythonpath()}, timeout=120)
    assert proc.returncode == 2 and "bad input" in proc.stderr, proc.stderr
    assert not segment.exists()
