"""Ranks stop (checkpoint, then exit) when the `deepspeed` command that started them ends.

`deepspeed --num_gpus N launch/pretrain.py` is two processes above the ranks: the runner
(deepspeed/launcher/runner.py, the command the user started) and the per-node launcher
(deepspeed/launcher/launch.py). On one node the runner installs no signal handler, so `kill PID`
(SIGTERM) of the user's command ends it at once while launch.py and the ranks train on. launch.py
itself forwards SIGTERM/SIGINT to the ranks. So each rank watches both processes; when either is
gone it acts as on SIGTERM: the ranks agree at the next step boundary, save a checkpoint and exit 0
(train/trainer.py), after which launch.py exits too. torchrun and srun forward signals themselves.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

import psutil

POLL_S = 1.0


def deepspeed_launchers() -> list[psutil.Process]:
    """launch.py and the runner above this rank, when it was started by the deepspeed launcher."""
    parent = psutil.Process().parent()
    try:
        if parent is None or "deepspeed.launcher.launch" not in " ".join(parent.cmdline()):
            return []
        runner = parent.parent()
        launchers = [parent]
        if runner is not None and "deepspeed" in " ".join(runner.cmdline()):
            launchers.append(runner)
        return launchers
    except psutil.Error:
        return []


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def watch_launchers(on_gone: Callable[[int], None]) -> threading.Thread | None:
    """Call `on_gone(SIGTERM)` once, from a daemon thread, when a deepspeed launcher process ends."""
    launchers = deepspeed_launchers()
    if not launchers:
        return None

    def poll() -> None:
        while all(map(_alive, launchers)):
            time.sleep(POLL_S)
        gone = next(p.pid for p in launchers if not _alive(p))
        os.write(2, f"deepspeed launcher process {gone} ended\n".encode())
        on_gone(signal.SIGTERM)

    thread = threading.Thread(target=poll, name="launcher-watch", daemon=True)
    thread.start()
    return thread
