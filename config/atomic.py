"""Atomic file writes: a temporary file in the same folder, fsync, then rename.

An interrupted write never leaves a half-written file under the final name. A leaf module (imports
nothing of the project): the model, curation, training, evaluation and export all write through it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what a plain open() would give: mkstemp's 0600 is for secrets, not results
DIR_MODE = 0o777 & ~_UMASK  # what a plain mkdir() would give: mkdtemp's 0700 likewise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file + fsync + rename in the same directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600; results are for everyone the umask allows
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the folder `tmp` to `final`, replacing an older folder there (never leaves a partial `final`)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """A temporary folder beside `final` to write into; renamed to `final` (replacing it) when the block
    ends without an error, removed when it fails. Files and folders get FILE_MODE / DIR_MODE."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        for path in [tmp, *tmp.rglob("*")]:
            if not path.is_symlink():
                path.chmod(DIR_MODE if path.is_dir() else FILE_MODE)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
