"""DeepSpeed's /dev/shm segments on CPU: released on every exit path, and left-overs of dead runs removed.

DeepSpeed's CPU shared-memory allreduce (deepspeed/ops/csrc/cpu/comm/shm.cpp) creates one segment of
tens of MB per rank, named from the uid, MASTER_ADDR, MASTER_PORT and the rank, and never unlinks it,
so every multi-process CPU run left them in RAM-backed /dev/shm, which many runs fill. A rank unlinks
its own at a normal exit (atexit) and on the fatal-error path (train.distributed._die); the peers mapped
it at initialisation and keep their mappings. A rank killed with SIGKILL cannot: at the next start,
segments of this user that no live process maps and that are older than a minute (not one that a run
starting at this moment created but has not mapped yet) are removed (`remove_stale_segments`).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

SHM = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer_"
MIN_AGE_S = 60.0


def shm_buffer_path(rank: int) -> str:
    """The segment DeepSpeed creates for `rank` of this run (its name as shm.cpp builds it)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return str(SHM / f"{PREFIX}{os.getuid()}_{addr}_{port}_{rank}")


def release_shm_buffer(rank: int) -> None:
    """Unlink this rank's segment (only the name goes: mappings of the peers stay valid)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(shm_buffer_path(rank))


def mapped_paths() -> set[str]:
    """Paths of the files that live processes (those this user may inspect) have mapped."""
    found: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            found.update(line.split(maxsplit=5)[5].removesuffix(" (deleted)").strip()
                         for line in maps.read_text().splitlines() if str(SHM) in line)
    return found


def remove_stale_segments() -> list[str]:
    """Unlink this user's DeepSpeed segments that no live process maps (left by killed runs); return them."""
    mine = sorted(SHM.glob(f"{PREFIX}{os.getuid()}_*"))
    if not mine:
        return []
    in_use = mapped_paths()
    stale = []
    for path in mine:
        with contextlib.suppress(FileNotFoundError):  # another run's start may remove it first
            if str(path) not in in_use and time.time() - path.stat().st_mtime > MIN_AGE_S:
                path.unlink()
                stale.append(str(path))
    return stale
