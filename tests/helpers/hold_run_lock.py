"""Holds a train.run_lock.RunLock and sleeps (tests/train/test_hardening.py kills it with SIGKILL):
`python tests/helpers/hold_run_lock.py FOLDER`. Prints `held` once the lock is taken."""

from __future__ import annotations

import sys
import time

from train.run_lock import RunLock

if __name__ == "__main__":
    RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(60)
