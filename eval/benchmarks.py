"""Benchmark names -> built lm-eval tasks, with every dataset loaded BEFORE any model work.

Building an lm-eval task loads its dataset (ConfigurableTask.__init__ -> datasets.load_dataset), so
building all requested tasks up front is the data-availability check: with HF offline, a hub task
whose data is not in the HF datasets cache, or a local task whose data file is missing, fails here
and the run stops with one line naming the task and the dataset.

Local tasks (--tasks-dir) are lm-eval task YAMLs, typically `dataset_path: json` with
`dataset_kwargs.data_files`. lm-eval hands data_files to `datasets` as they are, i.e. relative to the
working directory; `build_task_manager` resolves relative ones against the YAML's folder instead, so
a task folder works from anywhere.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from eval.errors import EvalError

log = logging.getLogger(__name__)

SUITE = "standard"
VAL_PPL = "val_ppl"
PASSKEY, POSITION_PPL = "passkey", "position_ppl"  # eval/long_context.py
OWN_TASKS = (VAL_PPL, PASSKEY, POSITION_PPL)  # run by this project, not by lm-eval
# The design's standard suite -> lm-eval 0.4.13 task/group names.
STANDARD_SUITE = {
    "MMLU": "mmlu",
    "HellaSwag": "hellaswag",
    "ARC-Easy": "arc_easy",
    "ARC-Challenge": "arc_challenge",
    "TruthfulQA (mc2)": "truthfulqa_mc2",
    "WinoGrande": "winogrande",
    "PIQA": "piqa",
    "BoolQ": "boolq",
    "OpenBookQA": "openbookqa",
    "LAMBADA": "lambada_openai",
}
# Benchmarks that execute model-written code: part of the suite only with --allow-code-execution.
CODE_SUITE = {"HumanEval": "humaneval"}


def expand_benchmarks(names: list[str], allow_code_execution: bool) -> list[str]:
    """Expand 'standard' into lm-eval names; keep order, drop duplicates."""
    out: list[str] = []
    for name in names:
        if name == SUITE:
            expanded = list(STANDARD_SUITE.values())
            if allow_code_execution:
                expanded += list(CODE_SUITE.values())
        else:
            expanded = [name]
        out += [n for n in expanded if n not in out]
    if not out:
        raise EvalError("no benchmarks given (e.g. --benchmarks standard or --benchmarks arc_easy,val_ppl)")
    return out


def enable_code_execution() -> None:
    """What lm-eval's code tasks need: HF `evaluate`'s code_eval refuses to run without this."""
    os.environ["HF_ALLOW_CODE_EVAL"] = "1"


def build_task_manager(names: list[str], tasks_dir: str | Path | None) -> Any:
    """A TaskManager that knows every name in `names` (lm-eval's built-in index is scanned only
    when a name is not a local task: building it takes seconds)."""
    from lm_eval.tasks import TaskManager

    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        raise EvalError(f"tasks dir {tasks_dir} does not exist (pass a folder of lm-eval task YAMLs)")
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False) if tasks_dir else None
    if manager is None or any(n not in manager.task_index for n in names):
        manager = TaskManager(include_path=str(tasks_dir) if tasks_dir else None)
    unknown = [n for n in names if n not in manager.task_index and not Path(n).is_file()]
    if unknown:
        where = f" or of {tasks_dir}" if tasks_dir else ""
        hints = sorted({m for n in unknown for m in difflib.get_close_matches(n, manager.all_tasks, n=3, cutoff=0.75)})
        hint = f"; close names: {', '.join(hints)}" if hints else ""
        raise EvalError(
            f"unknown benchmark {', '.join(unknown)}: not an lm-eval task/group/tag{where}, '{SUITE}' or "
            f"{', '.join(repr(n) for n in OWN_TASKS)} (list them with `python -m eval.lm_eval_cli ls tasks`){hint}"
        )
    if tasks_dir is not None:
        _resolve_local_data_files(manager, Path(tasks_dir))
    return manager


def _resolve_local_data_files(manager: Any, tasks_dir: Path) -> None:
    """Rewrite relative `dataset_kwargs.data_files` of tasks under `tasks_dir` to absolute paths.

    The index entry is replaced by one carrying the loaded config and no `yaml_path`, the form
    lm-eval gives inline task configs (TaskIndex.entry_from_config); TaskFactory builds from it.
    """
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    root = tasks_dir.resolve()
    index = manager.task_index
    for name, entry in list(index.items()):
        if entry.kind != Kind.TASK or entry.yaml_path is None or root not in Path(entry.yaml_path).resolve().parents:
            continue
        files = (entry.cfg or {}).get("dataset_kwargs", {}).get("data_files")
        if files is None:
            continue
        cfg = load_yaml(entry.yaml_path, resolve_func=True)
        cfg["dataset_kwargs"]["data_files"] = _absolute(files, Path(entry.yaml_path).parent)
        index[name] = replace(entry, yaml_path=None, cfg=cfg)


def resolve_include_paths(manager: Any) -> None:
    """`_resolve_local_data_files` for every folder of the manager's `include_path` (a path or a list)."""
    paths = manager.include_path
    for path in paths if isinstance(paths, (list, tuple)) else [paths] if paths else []:
        _resolve_local_data_files(manager, Path(path))


def _absolute(files: Any, base: Path) -> Any:
    """data_files (str | list | {split: str | list}) with relative local paths made absolute."""
    if isinstance(files, dict):
        return {k: _absolute(v, base) for k, v in files.items()}
    if isinstance(files, list):
        return [_absolute(v, base) for v in files]
    if "://" in files or Path(files).is_absolute():
        return files
    return str(base / files)


def load_tasks(manager: Any, names: list[str], allow_code_execution: bool) -> list[Any]:
    """Build every requested task/group (loading its data); one EvalError lists all that failed."""
    objects: list[Any] = []
    failures: list[str] = []
    for name in names:
        if _is_unsafe(manager, name) and not allow_code_execution:
            raise EvalError(f"benchmark {name} executes model-written code: pass --allow-code-execution to run it")
        try:
            loaded = manager.load([name])
        except Exception as exc:  # noqa: BLE001  (task building is lm-eval + datasets code: report, don't trace)
            log.debug("building %s failed", name, exc_info=True)
            failures.append(f"{name}{_dataset_of(manager, name)}: {_one_line(exc)}")
            continue
        if name in loaded["groups"]:
            objects.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            objects.append(loaded["tasks"][name])
        else:  # a tag or a YAML path: its tasks
            objects += list(loaded["tasks"].values())
    if failures:
        raise EvalError(
            f"cannot load the data of {len(failures)} benchmark(s): {'; '.join(failures)} -- "
            "offline, a hub dataset must already be in the HF datasets cache (HF_DATASETS_CACHE; "
            "set HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0 where the hub is reachable to fetch it) "
            "and a local task's data_files must exist"
        )
    return objects


def _is_unsafe(manager: Any, name: str) -> bool:
    entry = manager.task_index.get(name)
    return bool(entry is not None and (entry.cfg or {}).get("unsafe_code"))


def _dataset_of(manager: Any, name: str) -> str:
    """' (dataset PATH[/NAME])' for a task entry, '' for groups/tags."""
    entry = manager.task_index.get(name)
    cfg = (entry.cfg or {}) if entry is not None else {}
    path = cfg.get("dataset_path")
    if path is None:
        return ""
    files = cfg.get("dataset_kwargs", {}).get("data_files")
    what = f"{path} {files}" if files else f"{path}{'/' + cfg['dataset_name'] if cfg.get('dataset_name') else ''}"
    return f" (dataset {what})"


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:limit]}"
