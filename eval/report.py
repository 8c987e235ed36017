"""What an evaluation run prints and writes: the results table, reference scores, the results JSON.

The JSON file is lm-eval's results dict (results, configs, versions, n-shot, config, ...) at the top
level, so tools that read lm-eval output read it, plus:
    checkpoint   path, step, meta.json, resolved model config, tokenizer info, run config
    val_ppl      eval/val_ppl.py's report (when asked for)
    table        the printed rows (task, metric, value, stderr, fewshot, references)
    references   the reference models shown and their sources (with --compare)
    eval         the resolved eval section and the command line
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model.bundle import TOKENIZER_JSON, Bundle

REFERENCE_FILE = Path(__file__).with_name("reference_scores.yaml")
RAW_METRICS = {"perplexity"}  # published as-is; every other reference metric is a percentage


@dataclass
class Row:
    task: str
    metric: str
    value: float
    stderr: float | None
    fewshot: int | None
    references: dict[str, float] = field(default_factory=dict)


def lm_eval_rows(results: dict) -> list[Row]:
    """One row per (task or group, metric, filter) of lm-eval's results, in lm-eval's order."""
    rows = []
    n_shot = results.get("n-shot", {})
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not _is_number(value):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append(Row(task=task, metric=metric if filt == "none" else f"{metric} [{filt}]", value=float(value),
                            stderr=float(stderr) if _is_number(stderr) else None, fewshot=n_shot.get(task)))
    return rows


def val_ppl_rows(report: dict) -> list[Row]:
    """ppl and bits/token overall ('val_ppl') and per source ('val_ppl/<source>')."""
    parts = [("val_ppl", report)] + [(f"val_ppl/{name}", r) for name, r in report["sources"].items()]
    return [Row(task=task, metric=m, value=r[m], stderr=None, fewshot=None)
            for task, r in parts for m in ("ppl", "bits_per_token")]


def long_context_rows(passkey: dict | None, position: dict | None) -> list[Row]:
    """passkey accuracy overall and per length ('passkey', 'passkey/<length>'); perplexity per
    position bucket ('position_ppl/<start>-<end>')."""
    rows = []
    if passkey:
        rows.append(Row(task="passkey", metric="acc", value=passkey["accuracy"], stderr=None, fewshot=None))
        rows += [Row(task=f"passkey/{n}", metric="acc", value=a, stderr=None, fewshot=None)
                 for n, a in passkey["per_length"].items()]
    if position:
        rows += [Row(task=f"position_ppl/{b['start']}-{b['end']}", metric="ppl", value=b["ppl"], stderr=None,
                     fewshot=None) for b in position["buckets"]]
    return rows


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ---- reference scores ---------------------------------------------------------------------------
def load_references(path: Path = REFERENCE_FILE) -> tuple[dict[str, dict[tuple[str, str], float]], dict[str, str]]:
    """({model: {(task, metric): value on lm-eval's scale}}, {model: source citation})."""
    doc = yaml.safe_load(Path(path).read_text())
    scores, cited = {}, {}
    for model, entry in doc["models"].items():
        cited[model] = doc["sources"][entry["source"]]
        scores[model] = {(task, metric): float(v) if metric in RAW_METRICS else float(v) / 100.0
                         for task, metrics in entry["scores"].items() for metric, v in metrics.items()}
    return scores, cited


def attach_references(rows: list[Row], scores: dict[str, dict[tuple[str, str], float]]) -> list[str]:
    """Fill each row's references; return the models that have at least one shown number."""
    shown = []
    for model, table in scores.items():
        for row in rows:
            if (row.task, row.metric) in table:
                row.references[model] = table[(row.task, row.metric)]
        if any(model in row.references for row in rows):
            shown.append(model)
    return shown


# ---- console table ------------------------------------------------------------------------------
def format_table(rows: list[Row], reference_models: list[str] = ()) -> str:
    """Aligned plain-text table: task | metric | value | stderr | few-shot | one column per reference."""
    header = ["task", "metric", "value", "stderr", "few-shot", *reference_models]
    body = [[r.task, r.metric, f"{r.value:.4f}", "" if r.stderr is None else f"{r.stderr:.4f}",
             "" if r.fewshot is None else str(r.fewshot),
             *(f"{r.references[m]:.4f}" if m in r.references else "" for m in reference_models)] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    fmt = lambda line: " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))  # noqa: E731
    return "\n".join([fmt(header), "-+-".join("-" * w for w in widths), *map(fmt, body)])


# ---- results JSON -------------------------------------------------------------------------------
def checkpoint_info(bundle: Bundle) -> dict:
    """What identifies the evaluated weights: path, step, meta, model config, tokenizer, run config."""
    tok = bundle.tokenizer
    tok_file = bundle.folder / TOKENIZER_JSON
    run_cfg = bundle.folder / "run_config.yaml"
    return {
        "path": str(bundle.folder),
        "step": bundle.meta.get("step"),
        "meta": bundle.meta,
        "model_config": bundle.model.cfg.model_dump(mode="json"),
        "tokenizer": {
            "file": str(tok_file),
            "sha256": hashlib.sha256(tok_file.read_bytes()).hexdigest(),
            "vocab_size": len(tok),
            "special_ids": {name: getattr(tok, f"{name}_token_id") for name in ("pad", "bos", "eos", "unk")},
        },
        "run_config": yaml.safe_load(run_cfg.read_text()) if run_cfg.is_file() else None,
    }


def results_document(lm_eval_results: dict | None, val_ppl: dict | None, rows: list[Row], checkpoint: dict,
                     eval_section: dict, command: list[str], references: dict[str, str] | None) -> dict:
    """The JSON-ready results (lm-eval's non-JSON values, e.g. functions in task configs, as strings)."""
    from lm_eval.utils import handle_non_serializable

    doc = dict(lm_eval_results or {})
    doc.pop("samples", None)
    doc.update(checkpoint=checkpoint, val_ppl=val_ppl, table=[asdict(r) for r in rows],
               references=references, eval={**eval_section, "command": command})
    return json.loads(json.dumps(doc, default=handle_non_serializable))
