"""Each quality filter removes the planted bad documents it is meant for and keeps every good one."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("datatrove", reason="datatrove is not installed here (curation runs on it)")
from datatrove.data import Document

from config.recipe import FiltersConfig, SourceConfig
from pipeline.filters import build_filters
from pipeline.wordtok import WORD_TOKENIZER

from .conftest import EMBEDDED

PLANTED = [json.loads(line) for line in (EMBEDDED / "planted.jsonl").read_text().splitlines()]
GOOD = [d for d in PLANTED if d["kind"] == "good"]


def only(name: str):
    (step,) = build_filters(FiltersConfig(), SourceConfig(name="s", type="pydoc", filters=[name]))
    return step


def kept_ids(step, docs: list[dict]) -> set[str]:
    return {d.id for d in step.run(iter(Document(text=d["text"], id=d["id"]) for d in docs))}


@pytest.mark.parametrize("name, bad", [
    ("language", "bad/french"),
    ("gopher_repetition", "bad/repetitive"),
    ("gopher_quality", "bad/short"),
    ("c4", "bad/lorem"),
    ("c4", "bad/curly"),
    ("fineweb", "bad/list"),
])
def test_filter_removes_its_planted_document_and_keeps_good_ones(name: str, bad: str) -> None:
    docs = GOOD + [d for d in PLANTED if d["id"] == bad]
    assert kept_ids(only(name), docs) == {d["id"] for d in GOOD}


def test_language_filter_records_language_and_score() -> None:
    step = only("language")
    doc = Document(text=GOOD[0]["text"], id="x")
    assert list(step.run(iter([doc]))) == [doc]
    assert doc.metadata["language"] == "en" and doc.metadata["language_score"] > 0.9


def test_source_filter_selection_and_disabled_filters() -> None:
    cfg = FiltersConfig()
    names = lambda source: [type(s).__name__ for s in build_filters(cfg, source)]  # noqa: E731
    everything = names(SourceConfig(name="s", type="pydoc"))
    assert everything == ["LangIdFilter", "GopherRepetitionFilter", "GopherQualityFilter", "C4QualityFilter",
                          "FineWebQualityFilter"]
    assert names(SourceConfig(name="s", type="pydoc", filters=[])) == []
    cfg.c4.enabled = False
    assert "C4QualityFilter" not in names(SourceConfig(name="s", type="pydoc"))


def test_thresholds_reach_the_datatrove_filters() -> None:
    cfg = FiltersConfig()
    cfg.gopher_quality.min_doc_words = 20
    cfg.language.threshold = 0.9
    steps = build_filters(cfg, SourceConfig(name="s", type="pydoc", filters=["gopher_quality", "language"]))
    assert steps[0].threshold == 0.9 and steps[1].min_doc_words == 20


def test_word_tokenizer_is_offline_and_splits_sentence_ends() -> None:
    words = WORD_TOKENIZER.word_tokenize("The end. Don't stop: f(x) = 2.\nNext line")
    assert words == ["The", "end", ".", "Do", "n't", "stop", ":", "f", "(", "x", ")", "=", "2", ".", "Next", "line"]
