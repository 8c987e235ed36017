"""Decontamination: eval sets (local jsonl, lm-eval tasks) -> n-gram index -> datatrove's NGramsDecontFilter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("datatrove", reason="datatrove is not installed here (curation runs on it)")
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


def need_lm_eval() -> None:
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness (lm_eval) is not installed here")


def test_unavailable_eval_sets_name_the_task(tmp_path: Path) -> None:
    missing = DecontConfig(files=[{"name": "gone", "path": "nope.jsonl"}])
    with pytest.raises(CurationError, match=r"^eval set gone: file .*nope.jsonl not found"):
        build_index(missing, tmp_path, tmp_path / "index")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
    with pytest.raises(CurationError, match=r"eval set b: .*bad.jsonl:1 is not a JSON object with 'text'"):
        build_index(DecontConfig(files=[{"name": "b", "path": str(bad)}]), tmp_path, tmp_path / "index")
    need_lm_eval()
    with pytest.raises(CurationError, match="^eval set no_such_task: not an lm-eval task") as err:
        lm_eval_passages(["no_such_task"], str(tmp_path))
    assert "\n" not in str(err.value)


def test_lm_eval_tasks_from_local_task_yamls(tmp_path: Path) -> None:
    need_lm_eval()
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
    passages = lm_eval_passages(["t_gen", "t_mc"], str(tmp_path))
    assert {(p.task, p.text) for p in passages} == {
        ("t_gen", "The slow green river that the millers called the Wend."), ("t_mc", "wax and honey")}
    assert passages[0].query.startswith(("Q: Which river", "Question: What do bees"))


def test_clean_original_survives_its_contaminated_near_copy(tmp_path: Path) -> None:
    """Decontamination runs before MinHash: dedup never keeps the contaminated copy over the original."""
    from config.recipe import RecipeConfig
    from pipeline.executors import build_executors, run_executors
    from pipeline.layout import Layout
    from pipeline.preflight import preflight
    from pipeline.stages import build_stages

    from .conftest import docstring_rows

    clean = "\n\n".join(r["text"] for r in docstring_rows(8))  # ~1,000 words of prose
    contaminated = clean + "\n\n" + PASSAGES[3]["text"]  # a MinHash near duplicate (Jaccard ~0.95)
    write_jsonl(tmp_path / "src" / "part.jsonl", [{"text": contaminated, "id": "contaminated"},
                                                  {"text": clean, "id": "clean"}])
    recipe = RecipeConfig(name="order", sources=[{"name": "s", "type": "jsonl", "path": "src", "filters": []}],
                          decontamination={"files": [{"name": "local", "query_key": "question",
                                                      "path": str(EMBEDDED / "eval" / "local_passages.jsonl")}]},
                          cluster={"tasks": 1})
    layout = Layout(tmp_path / "out")
    stages = build_stages(recipe, tmp_path, layout, None, preflight(recipe, tmp_path, layout, None))
    upto = [s.name for s in stages].index("final") + 1
    run_executors("local", build_executors("local", stages[:upto], layout, recipe.cluster, 1), stages[:upto],
                  recipe.cluster)
    kept = {json.loads(line)["id"] for f in layout.curated.glob("*/s/*.jsonl") for line in f.read_text().splitlines()}
    assert kept == {"clean"}


def test_multiple_choice_eval_set_indexes_only_the_gold_choice(tmp_path: Path) -> None:
    gold, wrong = PASSAGES[3]["text"], CLEAN + " " + CLEAN
    rows = [{"question": "Which one?", "choices": [wrong, gold], "label": 1},
            {"question": "And now?", "choices": [wrong, gold], "label": "B"}]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    cfg = DecontConfig(files=[{"name": "mc", "path": str(path), "text_key": "choices", "gold_key": "label"}])
    build_index(cfg, tmp_path, tmp_path / "index")
    docs = {"gold": f"Some text. {gold}", "wrong_choice": wrong}
    assert kept(cfg, tmp_path / "index", docs) == {"wrong_choice"}
    for spec, match in [({"text_key": "choices"}, r"mc.jsonl:1: field 'choices' is a list, not a string \(multiple "
                                                  r"choice: set gold_key"),
                        ({"text_key": "label"}, r"mc.jsonl:1: field 'label' is a int, not a string$"),
                        ({"text_key": "choices", "gold_key": "question"}, "gold_key 'question' = 'Which one")]:
        bad = DecontConfig(files=[{"name": "mc", "path": str(path), **spec}])
        with pytest.raises(CurationError, match=match) as err:
            build_index(bad, tmp_path, tmp_path / "index")
        assert "\n" not in str(err.value)


def test_only_the_named_tasks_folders_are_indexed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's ~14k task YAMLs are never all indexed: only include_path, then folders naming the task."""
    need_lm_eval()
    import lm_eval.tasks

    from pipeline.decont import task_folders

    seen = []
    real = lm_eval.tasks.TaskManager

    def spy(**kwargs):
        seen.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", spy)
    with pytest.raises(CurationError, match="^eval set no_such_task: not an lm-eval task"):
        lm_eval_passages(["no_such_task"], str(tmp_path))
    assert seen and all(kw["include_defaults"] is False for kw in seen)
    assert [p.name for p in task_folders(["hellaswag"])] == ["hellaswag"]
