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
