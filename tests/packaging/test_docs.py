"""The docs a user reads point at things a user has: no file outside the repository, and every
example checkpoint path is one a shipped run config produces (`<train.output_dir>/final`)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_docs_link_nothing_outside_the_repository() -> None:
    """A `../` path (docs/ linking bench/results/, say) must resolve, from its page's folder, inside the repo."""
    outside = [f"{d.name}: {m}" for d in DOCS for m in re.findall(r"(?:\.\./)+[\w./-]+", d.read_text())
               if not (d.parent / m).resolve().is_relative_to(REPO)]
    assert not outside, outside


def test_example_checkpoints_are_folders_a_run_config_writes() -> None:
    """Every `--checkpoint X/final` in the docs is the final folder of a shipped run config's output_dir or
    of a `--set train.output_dir=X` that the docs' own commands pass."""
    finals = {f"{yaml.safe_load(p.read_text())['train']['output_dir']}/final"
              for p in (REPO / "config" / "runs").glob("*.yaml")}
    finals |= {f"{m}/final" for d in DOCS for m in re.findall(r"train\.output_dir=(\S+?)/?\s", d.read_text())}
    used = {m for d in DOCS for m in re.findall(r"--checkpoint (\S+/(?:final|consolidated))\b", d.read_text())}
    assert used and used <= finals, sorted(used - finals)
