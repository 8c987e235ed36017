"""scripts/test_gpu.sh: installs a wheel folder, runs pytest, writes junit.xml + log + environment."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # python3 = this one
    return subprocess.run(["bash", str(REPO / "scripts" / "test_gpu.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.slow
def test_runs_pytest_and_writes_results(tmp_path: Path) -> None:
    wheels, out = tmp_path / "wheels", tmp_path / "out"
    wheels.mkdir()
    proc = run(str(wheels), str(out), "tests/config/test_config.py", "-k", "overrides_are_parsed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) > 0 and suite.get("failures") == suite.get("errors") == "0"
    assert "passed" in (out / "pytest.log").read_text()
    assert (out / "environment.txt").read_text().startswith("python ")


def test_missing_wheel_folder_is_a_one_line_error(tmp_path: Path) -> None:
    proc = run(str(tmp_path / "nope"), str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr
