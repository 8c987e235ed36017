"""Benchmark names, reference scores and the results table."""

from __future__ import annotations

import pytest

from eval.benchmarks import CODE_SUITE, STANDARD_SUITE, expand_benchmarks, load_tasks
from eval.errors import EvalError
from eval.report import Row, attach_references, format_table, lm_eval_rows, load_references, val_ppl_rows


@pytest.mark.slow
def test_standard_suite_names_exist_in_lm_eval(builtin_tasks):
    index = builtin_tasks.task_index
    for name in [*STANDARD_SUITE.values(), *CODE_SUITE.values()]:
        assert name in index, name


def test_code_execution_needs_the_flag(builtin_tasks):
    with pytest.raises(EvalError, match="humaneval executes model-written code: pass --allow-code-execution"):
        load_tasks(builtin_tasks, ["humaneval"], allow_code_execution=False)


def test_expand_benchmarks():
    standard = list(STANDARD_SUITE.values())
    assert expand_benchmarks(["standard"], False) == standard
    assert expand_benchmarks(["piqa", "standard", "val_ppl"], True) == ["piqa", *[n for n in standard if n != "piqa"],
                                                                        "humaneval", "val_ppl"]
    with pytest.raises(EvalError):
        expand_benchmarks([], False)


def test_reference_scores_are_well_formed():
    scores, sources = load_references()
    assert {"Pythia-1.4B", "Mamba-1.4B", "Mamba2-1.3B", "OPT-1.3B", "TinyLlama-1.1B"} <= set(scores)
    known = set(STANDARD_SUITE.values())
    for model, table in scores.items():
        assert sources[model]  # every model cites its source
        for (task, metric), value in table.items():
            assert task in known and metric in {"acc", "acc_norm", "perplexity"}, (model, task, metric)
            assert 1.0 < value < 100.0 if metric == "perplexity" else 0.2 < value < 1.0, (model, task, value)


def test_rows_table_and_reference_columns():
    results = {
        "results": {
            "arc_easy": {"alias": "arc_easy", "acc,none": 0.61, "acc_stderr,none": 0.01, "acc_norm,none": 0.55,
                         "acc_norm_stderr,none": 0.01},
            "local_gen": {"alias": "local_gen", "exact_match,strict": 0.25, "exact_match_stderr,strict": "N/A"},
        },
        "n-shot": {"arc_easy": 0, "local_gen": 3},
    }
    rows = lm_eval_rows(results)
    assert [(r.task, r.metric, r.value, r.stderr, r.fewshot) for r in rows] == [
        ("arc_easy", "acc", 0.61, 0.01, 0), ("arc_easy", "acc_norm", 0.55, 0.01, 0),
        ("local_gen", "exact_match [strict]", 0.25, None, 3),
    ]
    rows += val_ppl_rows({"ppl": 12.5, "bits_per_token": 3.64, "sources": {"web": {"ppl": 11.0, "bits_per_token": 3.46}}})
    scores, _ = load_references()
    shown = attach_references(rows, scores)
    assert rows[0].references["Mamba2-1.3B"] == pytest.approx(0.643)  # published 64.3 (%)
    assert rows[1].references == {"TinyLlama-1.1B": pytest.approx(0.5525)}  # its ARC-e is acc_norm, Mamba's acc
    assert set(shown) == {"Pythia-1.4B", "Mamba-1.4B", "Mamba2-1.3B", "OPT-1.3B", "TinyLlama-1.1B"}
    lines = format_table(rows, shown).splitlines()
    assert len(lines) == 2 + len(rows) and len({len(line) for line in lines}) == 1  # aligned
    assert lines[0].split("|")[5].strip() == shown[0]


def test_table_without_references():
    text = format_table([Row("val_ppl", "ppl", 12.3456789, None, None)])
    assert text.splitlines()[2].split("|")[2].strip() == "12.3457"
