"""A run that writes its final export and then never exits, hung in a thread wait (tests/train/test_ablation.py):
`python tests/helpers/hang_after_export.py OUT`. Writes OUT/exported, prints `exported`, then waits forever
under train.distributed.fail_loudly (which makes SIGUSR1 print the threads' stacks)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from train.distributed import fail_loudly


def main() -> None:
    (Path(sys.argv[1]) / "exported").write_text("")
    print("exported", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    fail_loudly(main, ())
