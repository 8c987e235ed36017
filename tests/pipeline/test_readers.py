"""pipeline/sources.py's readers on empty and malformed rows: empty texts are counted (report column
`empty`), not announced with datatrove's "is your text_key correct?" warning; a missing text key is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datatrove.utils.logging import logger

from config.recipe import SourceConfig
from pipeline.sources import build_reader


@pytest.fixture()
def warnings_seen():
    seen: list[str] = []
    sink = logger.add(lambda message: seen.append(message.record["message"]), level="WARNING")
    yield seen
    logger.remove(sink)


def read_all(source: SourceConfig, base: Path) -> tuple[list[str], int]:
    reader = build_reader(source, base, tasks=1, data_root=None)
    ids = [doc.id for doc in reader.run()]
    return ids, int(reader.stats.stats["empty_documents"].total) if "empty_documents" in reader.stats.stats else 0


def test_empty_texts_are_counted_without_a_warning(tmp_path: Path, warnings_seen: list[str]) -> None:
    rows = [{"text": "a document", "id": "a"}, {"text": "", "id": "empty"}, {"text": "another", "id": "b"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "__init__.py").write_text("")  # the standard library has many empty files
    (tmp_path / "files" / "mod.py").write_text("x = 1\n")
    assert read_all(SourceConfig(name="rows", type="jsonl", path="rows.jsonl"), tmp_path) == (["a", "b"], 1)
    assert read_all(SourceConfig(name="files", type="folder", path="files", glob="*.py"), tmp_path) == (["mod.py"], 1)
    assert warnings_seen == []


def test_a_missing_text_key_warns_once_naming_the_key(tmp_path: Path, warnings_seen: list[str]) -> None:
    rows = [{"body": "x", "id": "a"}, {"body": "y", "id": "b"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_all(SourceConfig(name="rows", type="jsonl", path="rows.jsonl"), tmp_path) == ([], 0)
    assert warnings_seen == ["source rows: a row has no 'text' field (its keys: ['body', 'id']); set the source's "
                             "text_key in the recipe"]


def test_python_packages_reads_the_installed_packages_sources(tmp_path: Path, monkeypatch) -> None:
    """`python_packages` is one document per .py file under the interpreter's purelib, `exclude` pruning."""
    import sysconfig

    site = tmp_path / "site-packages"
    for rel, text in {"pkg/__init__.py": "", "pkg/core.py": "def f():\n    return 1\n",
                      "pkg/tests/test_core.py": "assert True\n", "pkg/data.json": "{}", "top.py": "x = 2\n"}.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    real = sysconfig.get_paths
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: real(*a, **k) | {"purelib": str(site)})
    source = SourceConfig(name="packages", type="python_packages", exclude=["tests"])
    assert read_all(source, tmp_path / "elsewhere") == (["pkg/core.py", "top.py"], 1)  # __init__.py: empty


def test_the_python_packages_recipe_reads_this_interpreters_packages() -> None:
    from config.recipe import load_recipe
    from pipeline.sources import source_root

    recipe, _ = load_recipe("python_packages")
    packages = next(s for s in recipe.sources if s.type == "python_packages")
    root = source_root(packages, Path("."))
    assert (root / "pytest" / "__init__.py").is_file()  # the running interpreter's site-packages


def test_pydoc_renders_without_the_callers_environment(monkeypatch) -> None:
    """pydoc prints `os.environ` (its first entries): the caller's variables must not reach the corpus."""
    import os

    from pipeline.sources import PydocReader

    caller = {"HF_TOKEN": "hf_secret_value", **{k: os.environ[k] for k in ("PATH", "PYTHONPATH") if k in os.environ}}
    monkeypatch.setattr(os, "environ", caller)  # the secret first: inside pydoc's truncated repr
    reader = PydocReader(text_key="text", id_key="id", default_metadata={"source": "pydoc"})
    reader.module_names = lambda: ["os"]
    (doc,) = list(reader.run())
    assert "environ = environ({" in doc.text and "HF_TOKEN" not in doc.text and "hf_secret" not in doc.text
