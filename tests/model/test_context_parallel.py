"""Context parallelism (model/context_parallel.py): 2 and 4 gloo processes, each holding a slice of every row,
give the loss and every parameter's gradient of one process on the whole rows (float64, relative error
<= 1e-10). The ranks run tests/model/context_parallel_worker.py (its docstring lists the cases: packed
documents crossing slice boundaries and one ending exactly at one, plain rows, activation checkpointing)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import repo_first_pythonpath

WORKER = Path(__file__).with_name("context_parallel_worker.py")
REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_split_rows_match_whole_rows(tmp_path: Path) -> None:
    """One launch of 4 processes checks groups of 2 (two of them, side by side) and the group of 4."""
    world, out, port = 4, tmp_path / "errors.json", _free_port()
    env = {**os.environ, "PYTHONPATH": repo_first_pythonpath(), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), str(port), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    errors = json.loads(out.read_text())
    cases = ("documents", "plain", "documents_checkpointed")
    assert set(errors) == {f"{size} ranks, {case}" for size in (2, 4) for case in cases}
    for case, err in errors.items():
        assert err["n_params"] > 50, case  # every parameter of the MAGM model compared
        assert err["loss"] <= TOLERANCE, (case, err)
        assert err["grad"] <= TOLERANCE, (case, err)
