"""N-gram decontamination against eval sets: lm-eval tasks (from the local HF cache) and local jsonl files.

The index has datatrove's format (`<task>.index.hashes`: uint64 hashes of space-joined word n-grams of
normalized text) and is read by datatrove's `NGramsDecontFilter` during curation. It is built here
rather than by datatrove's `NGramsDecontIndexer`, which requires lighteval at construction and loads
tasks through lighteval's registry; the hashing is the same (answer n-grams, plus n-grams that overlap
prompt and answer, plus prompt n-grams when `find_query_ngrams`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from textwrap import shorten
from typing import Iterable

import numpy as np
from datatrove.pipeline.decont import NGramsDecontConfig, NGramsDecontFilter
from datatrove.utils.hashing import create_hash_func
from datatrove.utils.text import ngrams, simplify_text

from config.recipe import DecontConfig, EvalSetFile
from pipeline.errors import CurationError
from pipeline.sources import hub_offline
from pipeline.wordtok import WORD_TOKENIZER


@dataclass(frozen=True)
class EvalPassage:
    task: str
    text: str  # the answer / passage whose n-grams must not appear in training data
    query: str | None = None  # the prompt, if any


def ngrams_config(cfg: DecontConfig) -> NGramsDecontConfig:
    return NGramsDecontConfig(n_grams=cfg.n_grams, find_query_ngrams=cfg.find_query_ngrams)


_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _gold_indices(gold: object) -> list[int]:
    """A gold label as choice indices: an int, a digit string, a letter (A = 0) or a list of those."""
    out = []
    for g in gold if isinstance(gold, list) else [gold]:
        if isinstance(g, bool) or not isinstance(g, (int, str)):
            raise TypeError
        out.append(g if isinstance(g, int) else int(g) if g.isdigit() else _LETTERS.index(g.strip().upper()))
    return out


def row_passages(row: dict, spec: EvalSetFile) -> list[EvalPassage]:
    """The passages of one eval-set row: its text, or (multiple choice: a list under `text_key`) the gold
    choice(s) named by `gold_key`. ValueError (one line) for a field that is not text."""
    value, query = row[spec.text_key], row[spec.query_key] if spec.query_key else None
    if query is not None and not isinstance(query, str):
        raise ValueError(f"field {spec.query_key!r} is a {type(query).__name__}, not a string")
    if isinstance(value, str):
        return [EvalPassage(spec.name, value, query)]
    if not isinstance(value, list) or not spec.gold_key:
        hint = " (multiple choice: set gold_key to the field holding the gold choice's index)" \
            if isinstance(value, list) else ""
        raise ValueError(f"field {spec.text_key!r} is a {type(value).__name__}, not a string{hint}")
    try:
        return [EvalPassage(spec.name, str(value[i]), query) for i in _gold_indices(row[spec.gold_key])]
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"gold_key {spec.gold_key!r} = {row[spec.gold_key]!r} is not the index (int, digit or "
                         f"letter) of one of the {len(value)} choices") from None


def local_passages(cfg: DecontConfig, base_dir: Path) -> list[EvalPassage]:
    out = []
    for spec in cfg.files:
        path = Path(spec.path) if Path(spec.path).is_absolute() else base_dir / spec.path
        if not path.is_file():
            raise CurationError(f"eval set {spec.name}: file {path} not found (check decontamination.files)")
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                out += row_passages(json.loads(line), spec)
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CurationError(f"eval set {spec.name}: {path}:{lineno} is not a JSON object with "
                                    f"{spec.text_key!r} ({type(exc).__name__})") from None
            except ValueError as exc:
                raise CurationError(f"eval set {spec.name}: {path}:{lineno}: {exc}") from None
    return out


def _gold_texts(task, doc: dict) -> list[str]:
    """The answer string(s) of one lm-eval doc: the target, or the gold choice(s) of multiple choice."""
    target = task.doc_to_target(doc)
    if task.config.doc_to_choice is not None and not isinstance(target, str):
        choices = task.doc_to_choice(doc)
        idx = target if isinstance(target, list) else [target]
        return [str(choices[i]) for i in idx]
    return [str(t) for t in target] if isinstance(target, list) else [str(target)]


def task_folders(names: list[str]) -> list[Path]:
    """lm-eval's own task folders (lm_eval/tasks/<folder>) whose YAMLs define or list one of `names`:
    a plain text search, so that only those folders are indexed (indexing all of lm-eval's YAMLs is slow)."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    pattern = re.compile(r"^\s*(?:(?:task|group|tag)\s*:|-)\s*['\"]?(" + "|".join(map(re.escape, names))
                         + r")['\"]?\s*$", re.MULTILINE)
    folders = set()
    for path in root.rglob("*.yaml"):
        if pattern.search(path.read_text(encoding="utf-8", errors="replace")):
            folders.add(root / path.relative_to(root).parts[0])
    return sorted(folders)


def lm_eval_passages(names: list[str], include_path: str | None) -> list[EvalPassage]:
    """Eval docs of lm-eval tasks (groups expand to their tasks), loaded offline from the HF cache.
    Indexes `include_path` and only the lm-eval task folders that mention the names (`task_folders`)."""
    from lm_eval.tasks import TaskManager

    out = []
    quiet = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets", "huggingface_hub")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        with hub_offline():
            local = [include_path] if include_path else []
            manager = TaskManager(include_path=local, include_defaults=False) if local else None
            if manager is None or not set(names) <= set(manager.all_tasks):
                manager = TaskManager(include_path=[*task_folders(names), *local], include_defaults=False)
            for name in names:
                if name not in manager.all_tasks:
                    raise CurationError(f"eval set {name}: not an lm-eval task, group or tag "
                                        f"(check decontamination.lm_eval_tasks / lm_eval_include_path)")
                try:
                    tasks = manager.load([name])["tasks"]
                except Exception as exc:
                    reason = shorten((str(exc).splitlines() or [type(exc).__name__])[0], 110, placeholder="...")
                    raise CurationError(
                        f"eval set {name}: lm-eval task data is not in the local cache ({type(exc).__name__}: "
                        f"{reason}); run lm-eval on it once with network access, or list a local file "
                        f"under decontamination.files") from None
                for task_name, task in sorted(tasks.items()):
                    for doc in task.eval_docs:
                        query = str(task.doc_to_text(doc))
                        out += [EvalPassage(task_name, gold, query) for gold in _gold_texts(task, doc)]
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    return out


def passage_hashes(p: EvalPassage, cfg: NGramsDecontConfig) -> list[int]:
    """Hashes of the n-grams NGramsDecontFilter looks for (same normalization and word tokenizer)."""
    n = cfg.n_grams
    words = WORD_TOKENIZER.word_tokenize(simplify_text(p.text, cfg.norm_config))
    grams = [list(g) for g in ngrams(words, n)]
    if p.query is not None:
        q = WORD_TOKENIZER.word_tokenize(simplify_text(p.query, cfg.norm_config))
        if cfg.find_query_ngrams:
            grams += [list(g) for g in ngrams(q, n)]
        if cfg.find_overlap_ngrams:  # windows that end inside the answer and start in the prompt
            grams += [q[len(q) - n + 1 + i:] + words[: i + 1]
                      for i in range(n - 1) if len(q) >= n - 1 - i and len(words) >= i + 1]
    hash_fn = create_hash_func(cfg.hash_config)
    return [hash_fn(" ".join(g)) for g in grams]


def write_index(passages: Iterable[EvalPassage], folder: Path, cfg: NGramsDecontConfig) -> dict[str, int]:
    """Write `<task>.index.hashes` per task; returns task -> number of distinct n-gram hashes."""
    by_task: dict[str, set[int]] = {}
    for p in passages:
        by_task.setdefault(p.task, set()).update(passage_hashes(p, cfg))
    from config.atomic import atomic_write_bytes

    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.index.hashes"):
        stale.unlink()
    for task, hashes in by_task.items():
        arr = np.array(sorted(hashes), dtype=cfg.hash_config.np_descr)
        atomic_write_bytes(folder / f"{task.replace(' ', '_')}.index.hashes", arr.tobytes())
    return {task: len(h) for task, h in by_task.items()}


def eval_passages(cfg: DecontConfig, base_dir: Path) -> list[EvalPassage]:
    """Every eval set the recipe names (CurationError, one line, if one is unavailable)."""
    passages = local_passages(cfg, base_dir)
    if cfg.lm_eval_tasks:
        include = cfg.lm_eval_include_path
        if include and not Path(include).is_absolute():
            include = str(base_dir / include)
        passages += lm_eval_passages(cfg.lm_eval_tasks, include)
    return passages


def build_index(cfg: DecontConfig, base_dir: Path, folder: Path) -> dict[str, int]:
    """Load every eval set the recipe names and index it."""
    return write_index(eval_passages(cfg, base_dir), folder, ngrams_config(cfg))


def decont_filter(cfg: DecontConfig, index_folder: Path) -> NGramsDecontFilter:
    return NGramsDecontFilter(str(index_folder), config=ngrams_config(cfg), language=WORD_TOKENIZER)
