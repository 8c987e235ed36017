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


def write_wheel(folder: Path, name: str, version: str, script: str | None = None) -> Path:
    """A pure-Python wheel of package `name`, with a console script if given (zipfile: no build tools, no index)."""
    import zipfile

    info, data = f"{name}-{version}.dist-info", f"{name}-{version}.data"
    files = {f"{name}/__init__.py": f"VERSION = {version!r}\n",
             **({f"{data}/scripts/{script}": "#!python\nprint('ok')\n"} if script else {}),
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


@pytest.mark.slow
def test_consecutive_installs_keep_earlier_console_scripts_and_replace_versions(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Two calls into one SITE (as two device calls on one warm machine): the first call's console script
    survives the second's (`pip --target --upgrade` replaced all of bin/: the deepspeed launcher went missing),
    and a newer version of a package replaces the older one, its metadata included."""
    site = tmp_path / "site"
    monkeypatch.setenv("SITE", str(site))
    monkeypatch.setenv("WORKERS", "0")
    target = ("tests/packaging/test_gpu_script.py", "-k", "missing_wheel_folder")
    write_wheel(tmp_path / "first", "gpu_one", "1.0", "launcher_one")
    write_wheel(tmp_path / "second", "gpu_two", "1.0", "launcher_two")
    write_wheel(tmp_path / "second", "gpu_one", "2.0")
    assert run(str(tmp_path / "first"), str(tmp_path / "out1"), *target).returncode == 0
    proc = run(str(tmp_path / "second"), str(tmp_path / "out2"), *target)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p.name for p in (site / "bin").iterdir()} == {"launcher_one", "launcher_two"}
    assert sorted(p.name for p in site.glob("gpu_one-*.dist-info")) == ["gpu_one-2.0.dist-info"]
    assert (site / "gpu_one" / "__init__.py").read_text() == "VERSION = '2.0'\n"


def test_session_timeout_ends_with_a_summary_and_junit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SESSION_TIMEOUT stops starting tests once passed, so a run cut short still writes its summary and
    junit.xml (a pytest killed by the device call's limit wrote neither)."""
    pytest.importorskip("pytest_timeout")
    monkeypatch.setenv("SITE", str(tmp_path / "site"))
    monkeypatch.setenv("WORKERS", "0")
    monkeypatch.setenv("SESSION_TIMEOUT", "0.01")
    (tmp_path / "wheels").mkdir()
    proc = run(str(tmp_path / "wheels"), str(tmp_path / "out"), "tests/config/test_config.py")
    assert proc.returncode != 0
    assert "session-timeout: 0.01 sec exceeded" in (tmp_path / "out" / "pytest.log").read_text()
    suite = ET.parse(tmp_path / "out" / "junit.xml").getroot().find("testsuite")
    assert 0 < int(suite.get("tests")) < 10


def test_deepspeed_without_its_launcher_is_a_one_line_error(tmp_path: Path) -> None:
    """deepspeed imports but `deepspeed` is not on PATH (its wheel's bin/ not added): one line in a second,
    not every launched test failing with FileNotFoundError minutes later."""
    pytest.importorskip("deepspeed")
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (shim / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:/usr/bin:/bin", "SITE": str(tmp_path / "site")}
    (tmp_path / "wheels").mkdir()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "test_gpu.sh"), str(tmp_path / "wheels"),
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "deepspeed imports but its launcher is not on PATH" in proc.stderr
    assert not (tmp_path / "out" / "pytest.log").exists()
