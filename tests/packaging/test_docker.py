"""What can be checked about the container without a Docker engine (none runs on these machines)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _requirement_lines(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


def test_every_copied_path_exists():
    copies = [args for op, args in _instructions(DOCKERFILE) if op == "COPY"]
    assert copies, "the Dockerfile copies nothing"
    for args in copies:
        *sources, _dest = shlex.split(args)
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile COPY source {src} does not exist"


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-cuda.txt"])
def test_requirements_are_pinned(name):
    for req in _requirement_lines(name):
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[a-z,]+\])?==[0-9][A-Za-z0-9.+\-]*", req), f"{name}: {req!r} is not pinned"


def test_pip_installs_come_from_the_pinned_files():
    runs = "; ".join(args for op, args in _instructions(DOCKERFILE) if op == "RUN")
    for cmd in re.findall(r"pip install ([^&;]*)", runs):
        words = [w for w in shlex.split(cmd) if not w.startswith("-") and "$" not in w and "/" not in w]
        # allowed: tooling upgrades, the requirement files and the project itself
        for w in words:
            assert w in {"pip", "setuptools", "wheel", "requirements.txt", "requirements-cuda.txt", "."}, (
                f"Dockerfile installs {w!r} outside the pinned requirement files"
            )
    torch_pin = [r for r in _requirement_lines("requirements.txt") if r.startswith("torch==")]
    assert torch_pin and "grep -E '^torch==' requirements.txt" in DOCKERFILE


def test_runs_as_non_root():
    users = [args for op, args in _instructions(DOCKERFILE) if op == "USER"]
    assert users and users[-1] not in ("root", "0")


def _commands() -> list[str]:
    cmds = [svc["command"] for svc in COMPOSE["services"].values()]
    cmds += re.findall(r"^#\s+((?:python|deepspeed) .+)$", DOCKERFILE, flags=re.M)
    return cmds


def test_named_entrypoints_configs_and_recipes_exist():
    cmds = _commands()
    assert any("pipeline/curate.py" in c for c in cmds) and any("launch/pretrain.py" in c for c in cmds)
    for cmd in cmds:
        words = shlex.split(cmd)
        for w in words:
            if w.endswith(".py"):
                assert (ROOT / w).is_file(), f"entrypoint {w} named in the container docs does not exist"
        if "--config" in words:
            name = words[words.index("--config") + 1]
            assert (ROOT / "config" / "runs" / f"{name}.yaml").is_file(), f"run config {name} does not exist"
        if "--recipe" in words:
            name = words[words.index("--recipe") + 1]
            assert (ROOT / "data_recipes" / f"{name}.yaml").is_file(), f"recipe {name} does not exist"


def test_build_context_excludes_data_and_checkpoints():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for item in (".venv", "outputs/", "*.safetensors", ".git"):
        assert item in ignored, f".dockerignore must exclude {item}"
