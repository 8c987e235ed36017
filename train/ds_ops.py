"""DeepSpeed's JIT-built C++ ops without the silent hang on a stale build lock.

DeepSpeed builds some ops on first use (on CPU: the shared-memory allreduce `deepspeed_shm_comm`, made
in every `deepspeed.init_distributed`) through torch.utils.cpp_extension.load, which guards each build
folder of ~/.cache/torch_extensions/<py>_<accelerator>/ (or $TORCH_EXTENSIONS_DIR) with a FileBaton: the
builder creates `<folder>/lock` with O_CREAT|O_EXCL, keeps it open while compiling and removes it at the
end; every other process polls until the file is gone, with no time limit and no message. A build killed
before its `finally` (Ctrl-C during the first compile, a SIGKILL) leaves the file behind, and every later
run then waits forever. The file holds no pid, but its live owner keeps it open, so a lock that no
process on this machine has open is stale.

    skipped = skip_shm_comm_op(world_size)   # before deepspeed.init_distributed: a world of one builds none
    check_build_locks(ignore=skipped)        # stale lock -> one-line TrainingError naming the file to delete

Limit: a build running on another machine that shares this home folder (NFS) holds its lock there, where
/proc here cannot see it; the error message says so.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from train.errors import TrainingError

log = logging.getLogger(__name__)


def extensions_root() -> Path:
    """The folder holding one build folder per JIT-built op, as torch.utils.cpp_extension picks it."""
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder
    from torch.utils.cpp_extension import _get_build_directory

    # torch's own resolution ($TORCH_EXTENSIONS_DIR or the user cache + py/accelerator folder); it also
    # creates the op's (empty) folder, as the build itself would
    return Path(_get_build_directory(ShareMemCommBuilder.NAME, verbose=False)).parent


def lock_holders(path: Path, proc: Path = Path("/proc")) -> list[int]:
    """Pids of the processes (of this user, the only ones /proc lets us read) that have `path` open."""
    target = os.path.realpath(path)
    pids = []
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                pids.append(int(fd_dir.parent.name))
        except OSError:  # a process that ended meanwhile, or another user's
            continue
    return pids


def check_build_locks(root: Path | None = None, proc: Path = Path("/proc"), ignore: Sequence[str] = ()) -> None:
    """Raise TrainingError (one line) for the first build lock under `root` that no process holds (ops
    named in `ignore` are not built by this run); log which process holds a live one (the build then
    waits for it, as it should)."""
    root = extensions_root() if root is None else root
    for lock in sorted(root.glob("*/lock")):
        if lock.parent.name in ignore:
            continue
        holders = lock_holders(lock, proc)
        if holders:
            log.info("waiting for process %s, which is building %s", holders[0], lock.parent.name)
            continue
        if not lock.exists():  # its build finished while we looked
            continue
        raise TrainingError(
            f"stale build lock {lock} (left by an interrupted build of {lock.parent.name}; no process here has "
            f"it open): delete it (rm {lock}) and rerun, unless a build on another machine sharing this folder "
            "is running")


def skip_shm_comm_op(world_size: int) -> tuple[str, ...]:
    """In a world of one, have DeepSpeed skip its shared-memory allreduce op (nothing to reduce with);
    returns the names of the ops skipped. `deepspeed.comm.torch.build_shm_op` builds it only if
    `deepspeed.ops.__compatible_ops__` says it is compatible, a dict DeepSpeed keeps for the process so
    that edits to it persist."""
    if world_size != 1:
        return ()
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    return (ShareMemCommBuilder.NAME,)
