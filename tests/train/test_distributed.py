"""train.distributed: how an entry point's process ends (fail_loudly: exit code, atexit hooks, one-line errors;
each case runs in a child process, because fail_loudly ends the process it runs in), and which device a rank
trains on."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import repo_first_pythonpath

REPO = Path(__file__).resolve().parents[2]

ENTRY = """
import atexit, sys
from pathlib import Path
from train.distributed import fail_loudly

marker = Path(sys.argv[1])

def main():
    atexit.register(lambda: marker.write_text("hook ran"))
    print("working", flush=False)  # left in the buffer: the exit must flush it
    {body}

fail_loudly(main, (ValueError,))
"""


def run_entry(body: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    script = tmp_path / "entry.py"
    script.write_text(textwrap.dedent(ENTRY).replace("{body}", body))
    marker = tmp_path / "marker"
    proc = subprocess.run([sys.executable, str(script), str(marker)], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": repo_first_pythonpath(), "PATH": "/usr/bin:/bin"}, timeout=120)
    return proc, marker


def test_success_runs_atexit_hooks_flushes_and_exits_0(tmp_path: Path) -> None:
    proc, marker = run_entry("return None", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "working\n"
    assert marker.read_text() == "hook ran"


def test_success_waits_for_non_daemon_threads(tmp_path: Path) -> None:
    """As a normal exit does: a thread still writing (say, a checkpoint) finishes before the hooks run."""
    body = """import threading, time
    def write():
        time.sleep(0.5)
        marker.with_suffix(".thread").write_text("written")
    threading.Thread(target=write).start()"""
    proc, marker = run_entry(body, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert marker.with_suffix(".thread").read_text() == "written"


def test_success_with_an_idle_thread_pool_exits(tmp_path: Path) -> None:
    """An idle ThreadPoolExecutor's workers are non-daemon threads that stop only when told to at exit (a
    GPU run's compile pool): joining them first hung a finished run on an H100 until it was killed."""
    body = """from concurrent.futures import ThreadPoolExecutor
    global pool  # kept alive past main(), as inductor's cached pool is (a collected pool stops its workers)
    pool = ThreadPoolExecutor(2)
    pool.submit(marker.with_suffix(".pool").write_text, "ran").result()"""
    proc, marker = run_entry(body, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert marker.with_suffix(".pool").read_text() == "ran"
    assert marker.read_text() == "hook ran"


@pytest.mark.parametrize(("body", "code", "line"), [
    ("raise ValueError('model.d_model must be > 0: set it in the config')", 2,
     "error: model.d_model must be > 0: set it in the config"),
    ("raise RuntimeError('boom\\nsecond line')", 1, "error: RuntimeError: boom"),
])
def test_failure_prints_one_line_and_skips_hooks(tmp_path: Path, body: str, code: int, line: str) -> None:
    """A failing rank ends at once: no atexit hook (it could wait on a peer that is gone)."""
    proc, marker = run_entry(body, tmp_path)
    assert proc.returncode == code
    assert proc.stderr.strip().splitlines()[-1] == line
    assert ("Traceback" in proc.stderr) == (code == 1)  # bad input: the line alone
    assert not marker.exists()


def test_an_error_from_a_dataloader_worker_keeps_its_own_line() -> None:
    """data.num_workers > 0: torch re-raises a worker's ManifestError with the worker's traceback in the
    message; the one line printed is still the original message (the shard's name)."""
    import torch.utils.data

    from config.manifest import ManifestError
    from train.distributed import one_line

    class BadShard(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, i: int) -> int:
            raise ManifestError("shard data/00001.ds holds token id 9000 >= vocabulary 512: re-run curation")

    with pytest.raises(ManifestError) as caught:
        next(iter(torch.utils.data.DataLoader(BadShard(), num_workers=1)))
    assert str(caught.value).startswith("Caught ManifestError in DataLoader worker")
    assert one_line(caught.value) == "shard data/00001.ds holds token id 9000 >= vocabulary 512: re-run curation"
    assert one_line(ManifestError("first\nsecond")) == "first" and one_line(ManifestError()) == "ManifestError"


# ---- the rank's device ---------------------------------------------------------------------------------
def test_ds_accelerator_cpu_makes_a_cpu_world_where_cuda_is_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    """The deepspeed launcher sets CUDA_VISIBLE_DEVICES for every rank, so on a GPU machine only DeepSpeed's
    accelerator choice (DS_ACCELERATOR=cpu) keeps a CPU world on the CPU, where DeepSpeed places the model."""
    import torch

    from train.distributed import training_device, training_on_cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert not training_on_cuda()
    assert training_device(3) == torch.device("cpu")


def test_more_ranks_than_gpus_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import train.distributed as dist
    from train.errors import TrainingError

    monkeypatch.setattr(dist, "training_on_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert dist.training_device(0) == torch.device("cuda", 0)
    with pytest.raises(TrainingError, match=r"local rank 1 needs GPU 1, but this machine shows 1 GPU\(s\): launch at "
                                            r"most 1 process\(es\) per machine \(deepspeed --num_gpus 1\)"):
        dist.training_device(1)


def test_without_deepspeed_a_visible_gpu_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benches that checkpoint activations without DeepSpeed (bench/long_context.py) still train on CUDA."""
    import torch

    from train.distributed import training_on_cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setitem(sys.modules, "deepspeed.accelerator", None)  # import fails as if absent
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert training_on_cuda()
