"""A launcher stand-in with a child (tests/train/test_scale_runs.py): `python tests/helpers/spawn_sleeper.py`
starts itself again as a child (`--child`: sleep 120 s), prints the child's pid, and sleeps 120 s itself."""

import subprocess
import sys
import time

if __name__ == "__main__":
    if sys.argv[1:] != ["--child"]:
        child = subprocess.Popen([sys.executable, __file__, "--child"])
        print(child.pid, flush=True)
    time.sleep(120)
