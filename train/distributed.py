"""Process-group set-up, preemption signals and failing loudly on every rank.

Launchers: `deepspeed` (its launcher sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* and passes
--local_rank), `torchrun` (same variables), Slurm via launch/slurm_pretrain.sbatch (maps SLURM_*
to them), or plain `python` (a world of one: the variables are filled in here).

Failures: `fail_loudly` wraps an entry point. A bad-input error (config, manifest, data, resume)
prints one line `[rank R] message` (no traceback) and exits 2; anything else prints its traceback
and then that one line, and exits 1. The process ends with os._exit so no rank waits in a
collective or an atexit hook for a peer that is gone; the launcher (deepspeed, torchrun, srun
--kill-on-bad-exit) then stops the other ranks, and ranks blocked in NCCL fail on the
collective timeout (TORCH_NCCL_ASYNC_ERROR_HANDLING).

Success: once the entry point returns, the non-daemon threads are joined and the atexit hooks run (the
shared-memory release of train/shm.py, wandb's), as at a normal exit, and the process ends with os._exit(0),
skipping interpreter finalization. In CI a 2-process gloo run that had logged all its steps exited 250
(a rank's SIGABRT, through the deepspeed launcher) during that teardown; the known way for it to abort
is the process group's C++ threads freeing tensors that hold Python references while the interpreter
is torn down (pytorch/pytorch#179291). A finished run has nothing left to finalize, so its exit code
must not depend on that teardown.
"""

from __future__ import annotations

import atexit
import faulthandler
import logging
import os
import signal
import socket
import sys
import threading
import traceback
import warnings
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType
from typing import Callable, NoReturn

import torch

from train.shm import release_shm_buffer, remove_stale_segments

log = logging.getLogger(__name__)

NCCL_DEFAULTS = {
    # A failed or timed-out collective tears the process down instead of hanging it.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_DEBUG": "WARN",
}
_SHM_RANK: list[int] = []  # this process's DeepSpeed shared-memory segment (train/shm.py), once created
DIST_TIMEOUT = timedelta(minutes=30)  # covers the slowest collective phase: saving/converting a 13B checkpoint


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill_launch_env() -> None:
    """Make a plain `python launch/pretrain.py` a world of one process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def env_rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment, before the process group exists."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def training_on_cuda() -> bool:
    """Whether this process (and the ranks it launches, which inherit its environment) trains on CUDA: DeepSpeed's
    accelerator is CUDA, the device the engine places the model on, and a GPU is visible. DS_ACCELERATOR=cpu
    makes a CPU world (gloo) on a GPU machine; hiding the GPUs is not enough under the deepspeed launcher, which
    sets CUDA_VISIBLE_DEVICES for every rank it starts.

    The variable is read here rather than through deepspeed.accelerator.get_accelerator (which reads it too):
    DeepSpeed caches its choice for the process, and a launching process (bench/scale_runs.py, a test) may set
    the variable after that; the kernel-only benches run without DeepSpeed. device_count() re-reads
    CUDA_VISIBLE_DEVICES, where is_available() keeps the process's first probe."""
    if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
        return False
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def training_device(local_rank: int) -> torch.device:
    """This rank's device: cuda:<local rank>, or the CPU (`training_on_cuda`). TrainingError (one line) when the
    launcher started more ranks on this machine than it shows GPUs: CUDA would fail later with an invalid ordinal."""
    if not training_on_cuda():
        return torch.device("cpu")
    gpus = torch.cuda.device_count()
    if local_rank >= gpus:
        from train.errors import TrainingError

        raise TrainingError(f"local rank {local_rank} needs GPU {local_rank}, but this machine shows {gpus} GPU(s): "
                            f"launch at most {gpus} process(es) per machine (deepspeed --num_gpus {gpus}), or set "
                            "DS_ACCELERATOR=cpu for a CPU world")
    return torch.device("cuda", local_rank)


def init_distributed() -> DistEnv:
    """Initialise the process group through DeepSpeed: NCCL on GPUs, gloo on CPU."""
    import deepspeed

    from train.ds_ops import check_build_locks, skip_shm_comm_op

    fill_launch_env()
    skipped = skip_shm_comm_op(int(os.environ["WORLD_SIZE"]))
    check_build_locks(ignore=skipped)  # a stale lock would make DeepSpeed's op build wait forever, silently
    local_rank = int(os.environ["LOCAL_RANK"])
    device = training_device(local_rank)
    if device.type == "cuda":
        for key, value in NCCL_DEFAULTS.items():
            os.environ.setdefault(key, value)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if backend == "gloo" and local_rank == 0:
        stale = remove_stale_segments()
    deepspeed.init_distributed(dist_backend=backend, timeout=DIST_TIMEOUT)
    env = DistEnv(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)
    if backend == "gloo":
        atexit.register(release_shm_buffer, env.rank)
        _SHM_RANK.append(env.rank)  # _die releases it too: os._exit skips atexit
    configure_logging(env.rank)
    if backend == "gloo" and local_rank == 0 and stale:
        log.info("removed %d shared-memory segment(s) of killed runs: %s", len(stale), ", ".join(stale))
    return env


def configure_logging(rank: int) -> None:
    """INFO from rank 0, errors from every rank (and warnings too with --verbose:
    config.console.every_rank_warns; the ranks would repeat rank 0's), each line tagged with its rank;
    DeepSpeed's own INFO chatter off."""
    from deepspeed.utils import logger as ds_logger

    from config.console import every_rank_warns

    # torch's own collectives, called by DeepSpeed, warn about their deprecated names on every call
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    other_ranks = logging.WARNING if every_rank_warns() else logging.ERROR
    logging.basicConfig(level=logging.INFO if rank == 0 else other_ranks, force=True,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    ds_logger.setLevel(logging.WARNING)


def barrier() -> None:
    if torch.distributed.is_initialized():
        nccl = torch.distributed.get_backend() == "nccl"
        torch.distributed.barrier(device_ids=[torch.cuda.current_device()] if nccl else None)


class StopSignal:
    """SIGTERM/SIGINT set a flag instead of killing the process; the trainer checks it at the next step
    boundary, where the ranks agree (all_reduce) to save a checkpoint and exit 0 together. The end of
    the deepspeed launcher's processes sets it too (train/launcher_watch.py)."""

    def __init__(self) -> None:
        from train.launcher_watch import watch_launchers

        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        watch_launchers(lambda signum: self._handle(signum, None))  # `kill` of the deepspeed command

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            name = signal.Signals(signum).name
            os.write(2, f"[rank {env_rank()[0]}] {name}: saving a checkpoint at the next step boundary\n".encode())
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None


def fail_loudly(main: Callable[[], None], user_errors: tuple[type[BaseException], ...]) -> NoReturn:
    """Run `main` and end the process: exit 0 once it returns; on an exception print one line naming
    the rank and exit 2 (bad input) or 1 (see module doc). Meanwhile SIGUSR1 prints every thread's Python
    stack to stderr (`kill -USR1 PID`: where a hung rank waits; the ablation runner sends it to a run that
    does not exit after its final export)."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        main()
    except user_errors as exc:
        _die(one_line(exc), 2)
    except BaseException as exc:  # noqa: BLE001 - every failure must end this rank loudly
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        traceback.print_exc()
        _die(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", 1)
    _finish()


def one_line(exc: BaseException) -> str:
    """The line a user error prints: its message's first line; for one re-raised from a DataLoader worker
    (torch's message is "Caught X in DataLoader worker process N." and the worker's traceback), the
    original message, the traceback's last line."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        return lines[-1].split(": ", 1)[-1]
    return lines[0]


def _finish() -> NoReturn:
    """What a normal exit does before finalization (join the non-daemon threads, run the atexit
    hooks), then exit code 0 without the finalization."""
    sys.stdout.flush()
    sys.stderr.flush()
    # What interpreter shutdown runs first, and how: threading's own exit hooks (they tell the idle workers of
    # every ThreadPoolExecutor, inductor's compile pool for one, to stop; joining those workers before that
    # waits forever), then the wait for every non-daemon thread. Private, but no public function does this.
    threading._shutdown()
    atexit._run_exitfuncs()  # what they print is flushed below
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _die(message: str, code: int) -> NoReturn:
    for rank in _SHM_RANK:
        release_shm_buffer(rank)
    rank, world = env_rank()
    prefix = f"[rank {rank}] " if world > 1 else ""
    sys.stdout.flush()
    sys.stderr.write(f"{prefix}error: {message}\n")
    sys.stderr.flush()
    os._exit(code)
