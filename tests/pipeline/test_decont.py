"""Decontamination: eval sets (local jsonl, lm-eval tasks) -> n-gram index -> datatrove's NGramsDecontFilter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from datatrove.data import Document

from config.recipe import DecontConfig
from pipeline.decont import build_index, decont_filter, lm_eval_passages
from pipeline.errors import CurationError

from .conftest import EMBEDDED, write_jsonl

PASSAGES = [json.loads(line) for line in (EMBEDDED / "eval" / "local_passages.jsonl").read_text().splitlines()]
CLEAN = ("The museum opens at nine in the morning and closes at six in the evening, except on public holidays "
         "when it closes early.")


def kept(cfg: DecontConfig, index: Path, texts: dict[str, str]) -> set[str]:
    step = decont_filter(cfg, index)
    return {d.id for d in step.run(iter(Document(text=t, id=i) for i, t in texts.items()))}


def test_documents_sharing_a_13_gram_with_an_eval_passage_are_removed(tmp_path: Path) -> None:
    cfg = DecontConfig(files=[{"name": "local", "path": str(EMBEDDED / "eval" / "local_passages.jsonl"),
                               "query_key": "question"}])
    counts = build_index(cfg, EMBEDDED, tmp_path)
    assert set(counts) == {"local"} and counts["local"] > 0
    passage = PASSAGES[3]["text"]
    words = passage.split()
    docs = {
        "verbatim": f"Intro sentence here. {passage} Outro.",
        "recased_repunctuated": " ".join(words[:15]).upper().replace(",", " ;"),  # normalization ignores case/punct
        "prompt_then_answer_start": PASSAGES[1]["question"] + " " + " ".join(PASSAGES[1]["text"].split()[:6]),
        "twelve_words_only": " ".join(words[:12]),
        "clean": CLEAN,
    }
    assert kept(cfg, tmp_path, docs) == {"twelve_words_only", "clean"}


def test_unavailable_eval_sets_name_the_task(tmp_path: Path) -> None:
    missing = DecontConfig(files=[{"name": "gone", "path": "nope.jsonl"}])
    with pytest.raises(CurationError, match=r"^eval set gone: file .*nope.jsonl not found"):
        build_index(missing, tmp_path, tmp_path / "index")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
    with pytest.raises(CurationError, match=r"eval set b: .*bad.jsonl:1 is not a JSON object with 'text'"):
        build_index(DecontConfig(files=[{"name": "b", "path": str(bad)}]), tmp_path, tmp_path / "index")
    with pytest.raises(CurationError, match="^eval set no_such_task: not an lm-eval task") as err:
        lm_eval_passages(["no_such_task"], str(tmp_path), include_defaults=False)
    assert "\n" not in str(err.value)


def test_lm_eval_tasks_from_local_task_yamls(tmp_path: Path) -> None:
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"question": "Which river flows through the old town?",
                                                "answer": "The slow green river that the millers called the Wend."}])
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "What do bees make?", "choices": ["wax and honey", "glass"],
                                              "answer": 0}])
    common = {"dataset_path": "json", "test_split": "test", "metadata": {"version": 1.0}}
    (tmp_path / "gen.yaml").write_text(yaml.safe_dump({
        "task": "t_gen", **common, "dataset_kwargs": {"data_files": {"test": str(gen)}},
        "output_type": "generate_until", "doc_to_text": "Q: {{question}}\nA:", "doc_to_target": "{{answer}}"}))
    (tmp_path / "mc.yaml").write_text(yaml.safe_dump({
        "task": "t_mc", **common, "dataset_kwargs": {"data_files": {"test": str(mc)}}, "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "choices", "doc_to_target": "answer"}))
    passages = lm_eval_passages(["t_gen", "t_mc"], str(tmp_path), include_defaults=False)
    assert {(p.task, p.text) for p in passages} == {
        ("t_gen", "The slow green river that the millers called the Wend."), ("t_mc", "wax and honey")}
    assert passages[0].query.startswith(("Q: Which river", "Question: What do bees"))
