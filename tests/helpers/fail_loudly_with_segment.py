"""A rank that owns a DeepSpeed shared-memory segment and fails with bad input through
train.distributed.fail_loudly (tests/train/test_hardening.py): `python tests/helpers/fail_loudly_with_segment.py PORT`.
Exits 2 with one line; the segment named after PORT must be gone afterwards."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from train import distributed, shm


def main() -> None:
    raise ValueError("bad input")


if __name__ == "__main__":
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    Path(shm.shm_buffer_path(0)).write_bytes(b"x")
    distributed._SHM_RANK.append(0)
    distributed.fail_loudly(main, (ValueError,))
