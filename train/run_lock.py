"""One run per output folder: an exclusive lock on <output_dir>/.run.lock for the life of a run.

Two runs on one folder overwrite each other's checkpoints and metrics. The lock is an flock(2) on
the file, held by the process that took it (rank 0) until it exits, however it exits: the kernel
drops the lock of a dead process, so a lock left by a killed run is taken over by the next one
without any clean-up. The file holds the holder's host and pid so that the refusal can name them.
flock covers one host and NFS v4 or Lustre mounted with flock support; a filesystem without
lock support is an error saying so.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from train.errors import TrainingError

LOCK_NAME = ".run.lock"


class RunLock:
    """Holds the lock of `out_dir` from `acquire` until the process ends (or `release`)."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise TrainingError naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown host and pid"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise TrainingError(f"train.output_dir {self.path.parent} is in use by another run ({holder}): "
                                    "wait for it to end or pass another train.output_dir") from None
            raise TrainingError(f"cannot lock {self.path} ({exc.strerror}): put train.output_dir on a filesystem "
                                "with flock support") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None
