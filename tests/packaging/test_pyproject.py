"""pyproject.toml as pip builds it: the project's packages without bench/, the pinned requirements as
dependencies, and the `hybrid-lm` console script whose subcommands are the stages' entrypoints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from launch import cli

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ["model", "config", "pipeline", "train", "eval", "export", "launch", "adapt"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel pip builds from a copy of the sources (nothing is installed)."""
    src = tmp_path_factory.mktemp("src")
    for name in ["pyproject.toml", "README.md", "requirements.txt", "requirements-cuda.txt"]:
        shutil.copy(REPO / name, src / name)
    for name in [*PACKAGES, "bench"]:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(src / "dist"), str(src)], check=True, capture_output=True, timeout=120)
    return zipfile.ZipFile(next((src / "dist").glob("hybrid_lm-*.whl")))


def dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    return wheel.read(next(n for n in wheel.namelist() if n.endswith(f".dist-info/{name}"))).decode()


def test_wheel_holds_the_project_packages_and_their_data_not_bench(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == set(PACKAGES)
    assert "config/runs/tiny.yaml" in names and "eval/tasks/local_mc/train.jsonl" in names


def test_dependencies_are_the_pinned_requirements(wheel: zipfile.ZipFile) -> None:
    pins = {line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()} - {""}
    declared = {line.removeprefix("Requires-Dist: ") for line in dist_info(wheel, "METADATA").splitlines()
                if line.startswith("Requires-Dist: ") and "extra ==" not in line}
    assert declared == pins


def test_console_script_dispatches_to_each_entrypoint(wheel: zipfile.ZipFile) -> None:
    assert "hybrid-lm = launch.cli:main" in dist_info(wheel, "entry_points.txt")
    import eval.run
    import launch.adapt
    import launch.export
    import launch.finetune
    import launch.generate
    import launch.pretrain
    import pipeline.curate

    mains = {"curate": pipeline.curate.main, "pretrain": launch.pretrain.main, "eval": eval.run.main,
             "export": launch.export.main, "generate": launch.generate.main, "finetune": launch.finetune.main,
             "convert": launch.export.convert, "adapt": launch.adapt.main}
    assert set(cli.SUBCOMMANDS) == {*mains, "list"}
    for name, main in mains.items():
        assert cli.entrypoint(name) is main


def test_subcommands_run_with_their_own_flags(capsys: pytest.CaptureFixture) -> None:
    from model.__main__ import preset_rows

    assert cli.main(["list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["presets"] == preset_rows(verify=False)
    with pytest.raises(SystemExit) as done:
        cli.main(["generate", "--help"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage: hybrid-lm generate")
    assert cli.main(["nope"]) == 2 and "unknown subcommand 'nope'" in capsys.readouterr().err
