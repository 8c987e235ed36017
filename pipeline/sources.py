"""Readers for recipe sources, and the fail-fast checks that run before any processing.

Every source becomes one datatrove reader: `JsonlReader`, `ParquetReader`, `HuggingFaceDatasetReader`
(streaming), or one of two readers defined here for text that has no reader in datatrove: one
document per file (`TextFileReader`, used for `folder` and `stdlib_source`) and the pydoc
documentation of the standard library (`PydocReader`). Documents carry `metadata["source"]`.

Hub sources with `--data-root DIR` read a local mirror `DIR/<hub_id>/`: a snapshot of the dataset
repository as `huggingface-cli download --repo-type dataset <hub_id> --local-dir DIR/<hub_id>` writes
it (data files plus the README.md whose `configs:` block maps config/split to files). datasets loads
it exactly like the hub repository.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
from fnmatch import fnmatch
from functools import partial
from pathlib import Path
from textwrap import shorten
from types import MethodType
from typing import Any, Iterator

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.readers import HuggingFaceDatasetReader, JsonlReader, ParquetReader
from datatrove.pipeline.readers.base import BaseDiskReader, BaseReader
from datatrove.utils.logging import logger

from config.recipe import SourceConfig
from pipeline.errors import CurationError

DEFAULT_GLOBS = {"jsonl": "**/*.jsonl*", "parquet": "**/*.parquet", "folder": "**/*.txt", "stdlib_source": "**/*.py",
                 "python_packages": "**/*.py"}
# Modules whose import opens a browser/GUI, prints, or is platform-specific: never rendered by pydoc.
PYDOC_SKIP = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "ensurepip",
                        "msilib", "msvcrt", "nt", "winreg", "winsound"})


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_root(source: SourceConfig, base_dir: Path) -> Path:
    """The folder a file-per-document source reads: the interpreter's own for `stdlib_source` and
    `python_packages` (purelib: where pip puts pure-Python packages; a platlib that differs, as on some
    distributions' lib64, holds compiled extensions and little Python source, and is not read), else `path`."""
    if source.type == "stdlib_source":
        return stdlib_dir()
    if source.type == "python_packages":
        return Path(sysconfig.get_paths()["purelib"])
    return local_path(source, base_dir)


def _adapt(reader: BaseReader, data: dict, path: str, id_in_file: int | str, mapping: dict[str, str]) -> dict:
    """Input row -> Document fields, keeping only the recipe's metadata mapping (output key <- input field).

    A row whose text is empty (an empty file, "text": "") is counted as `empty_documents` in the reader's
    stats (the curation report shows them); datatrove then skips it. A row without the text key at all
    gets one warning per reader naming the key and the row's keys (a recipe error, not empty data).
    """
    if reader.text_key not in data:
        if not getattr(reader, "warned_missing_text_key", False):
            reader.warned_missing_text_key = True
            logger.warning(f"source {reader.default_metadata.get('source')}: a row has no {reader.text_key!r} "
                           f"field (its keys: {sorted(data)}); set the source's text_key in the recipe")
    elif not data[reader.text_key]:
        reader.stat_update("empty_documents")
    return {
        "text": data.get(reader.text_key),
        "id": str(data.get(reader.id_key, f"{path}/{id_in_file}")),
        "metadata": {key: data[field] for key, field in mapping.items() if field in data},
    }


def _matches(rel_path: str, pattern: str) -> bool:
    """fnmatch on the relative path; a leading `**/` also matches files at the top level."""
    return fnmatch(rel_path, pattern) or (pattern.startswith("**/") and fnmatch(rel_path, pattern[3:]))


class TextFileReader(BaseDiskReader):
    """One document per text file under `data_folder` (id: the relative path); files whose relative
    path contains a part in `exclude` are skipped, whole folders pruned."""

    name = "📄 Text files"

    def __init__(self, data_folder: str, glob_pattern: str, exclude: list[str] = (), **kwargs: Any):
        super().__init__(data_folder, glob_pattern=glob_pattern, add_file_path=False, **kwargs)
        self.exclude = set(exclude)

    def list_files(self) -> list[str]:
        root = Path(self.data_folder.path)
        found = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in self.exclude and not d.startswith("."))
            rel = Path(folder).relative_to(root)
            found += [str(rel / f) for f in files
                      if f not in self.exclude and _matches(str(rel / f), self.glob_pattern)]
        return sorted(found)

    def read_file(self, filepath: str) -> DocumentsPipeline:
        with self.data_folder.open(filepath, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        doc = self.get_document_from_dict({"text": text, "id": filepath}, filepath, 0)
        if doc:
            yield doc

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        for doc in self.read_files_shard(self.list_files()[rank::world_size]):
            self.update_doc_stats(doc)
            yield doc


# PydocReader renders in a fresh interpreter with a fixed hash seed: set/dict reprs in the DATA sections
# then come out the same on every run, and module imports cannot touch the task process.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+|(?<=, handle )[0-9a-f]{6,}")
_RENDER = ("import json, sys\nfrom pipeline.sources import render_pydoc\n"
           "for name in sys.argv[1:]:\n    print(json.dumps([name, render_pydoc(name)]), flush=True)")


def render_pydoc(name: str) -> str | None:
    """pydoc plain text of one module (None if it cannot be imported here), memory addresses removed."""
    import importlib
    import pydoc

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return _ADDRESS.sub("", pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext))
    except (Exception, SystemExit):  # platform-specific or broken module: not part of this machine's docs
        return None


def render_env() -> dict[str, str]:
    """The renderer's environment: only what imports need. pydoc prints module data such as `os.environ`,
    so the caller's variables (tokens, hostnames, session paths) would otherwise enter the corpus, and the
    same recipe would curate differently from one shell to the next."""
    keep = {k: os.environ[k] for k in ("PYTHONPATH", "VIRTUAL_ENV") if k in os.environ}
    return {**keep, "PATH": os.defpath, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}


class PydocReader(BaseReader):
    """pydoc plain-text documentation of the standard-library modules and their public submodules,
    one document per module (id: pydoc/<module>)."""

    name = "📚 pydoc"

    def __init__(self, exclude: list[str] = (), **kwargs: Any):
        super().__init__(**kwargs)
        self.exclude = PYDOC_SKIP | set(exclude)

    def module_names(self) -> list[str]:
        """Public stdlib modules and public submodules of stdlib packages (found on disk, not imported)."""
        names = set()
        for top in sys.stdlib_module_names:
            if top.startswith("_") or top in self.exclude:
                continue
            names.add(top)
            package = stdlib_dir() / top
            if (package / "__init__.py").is_file():
                for path in package.rglob("*.py"):
                    parts = [top, *path.relative_to(package).with_suffix("").parts]
                    if parts[-1] == "__init__":
                        parts.pop()
                    if not any(p.startswith("_") or p in self.exclude or "test" in p for p in parts[1:]):
                        names.add(".".join(parts))
        return sorted(names)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        names = self.module_names()[rank::world_size]
        if self.limit != -1:
            names = names[: self.limit]
        proc = subprocess.run([sys.executable, "-c", _RENDER, *names], env=render_env(), capture_output=True,
                              text=True, check=True, cwd=stdlib_dir())
        for line in proc.stdout.splitlines():
            name, text = json.loads(line)
            if text is None:
                self.stat_update("unimportable")
                continue
            doc = self.get_document_from_dict({"text": text, "id": f"pydoc/{name}"}, "pydoc", name)
            if doc:
                self.update_doc_stats(doc)
                yield doc


def hub_location(source: SourceConfig, data_root: str | None) -> str:
    """What datasets.load_dataset reads: the local mirror DIR/<hub_id> or the hub id."""
    return str(Path(data_root) / source.hub_id) if data_root else source.hub_id


def local_path(source: SourceConfig, base_dir: Path) -> Path:
    p = Path(source.path).expanduser()
    return p if p.is_absolute() else base_dir / p


def build_reader(source: SourceConfig, base_dir: Path, tasks: int, data_root: str | None) -> BaseReader:
    """The datatrove reader of one source. datatrove's `limit` is per task: the recipe's total `limit`
    is split over the tasks that get input (file sources: at most one task per file)."""
    common: dict[str, Any] = {"text_key": source.text_key, "id_key": source.id_key,
                              "default_metadata": {"source": source.name}}
    adapter = partial(_adapt, mapping=source.metadata)
    # _adapt counts empty texts and warns on a missing text key itself: datatrove's once-per-reader flag
    # (readers/base.py) is set so that its warning, which asks whether text_key is right, never fires
    # for a key that exists and an empty value
    if source.type in ("jsonl", "parquet"):
        path = local_path(source, base_dir)
        folder, glob = (path.parent, path.name) if path.is_file() else (path, source.glob or DEFAULT_GLOBS[source.type])
        cls = JsonlReader if source.type == "jsonl" else ParquetReader
        reader = cls(str(folder), glob_pattern=glob, adapter=adapter, **common)
        reader.add_file_path = False  # ids already name the file; absolute paths would bloat work/
        files = len(reader.data_folder.list_files(glob_pattern=glob))
    elif source.type == "hf":
        options = {"split": source.split}
        if source.hub_config:
            options["name"] = source.hub_config
        if source.hub_data_dir:
            options["data_dir"] = source.hub_data_dir
        if source.revision and not data_root:
            options["revision"] = source.revision
        reader = HuggingFaceDatasetReader(hub_location(source, data_root), dataset_options=options, streaming=True,
                                          adapter=adapter, **common)
        files = tasks
    elif source.type == "pydoc":
        reader = PydocReader(exclude=source.exclude, **common)
        files = tasks
    else:
        root = source_root(source, base_dir)
        reader = TextFileReader(str(root), source.glob or DEFAULT_GLOBS[source.type], source.exclude, **common)
        reader.adapter = MethodType(adapter, reader)
        files = len(reader.list_files())
    if source.type != "pydoc":  # the readers whose rows go through _adapt
        reader._empty_warning = True
    if source.limit:
        reader.limit = -(-source.limit // max(1, min(tasks, files)))
    return reader


# ---------------------------------------------------------------- fail-fast checks (before any processing)


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Make huggingface_hub and datasets use only the local cache inside the block."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def check_hub_reachable(source: SourceConfig, timeout: float = 10.0) -> None:
    from huggingface_hub import HfApi

    try:
        HfApi().dataset_info(source.hub_id, revision=source.revision, timeout=timeout)
    except Exception as exc:  # offline mode, DNS, timeout, 401/404: all mean "cannot read it from here"
        reason = shorten(str(exc).splitlines()[0], 110, placeholder="...") if str(exc) else type(exc).__name__
        raise CurationError(
            f"source {source.name}: cannot reach hub dataset {source.hub_id} ({type(exc).__name__}: {reason}); "
            f"run where the hub is reachable or pass --data-root DIR holding a mirror at DIR/{source.hub_id}"
        ) from None


class _SampleTaken(Exception):
    """Raised from inside a reader to stop it once enough raw records were seen."""


def check_text_key(source: SourceConfig, base_dir: Path, data_root: str | None, sample: int = 100) -> None:
    """CurationError unless one of the source's first `sample` records has a non-empty `text_key` field
    (else every stage would run on nothing and only tokenizer training would fail, minutes later)."""
    reader = build_reader(source, base_dir, 1, data_root)
    adapt, fields, seen = reader.adapter, set(), 0

    def spy(data: dict, path: str, id_in_file: int | str) -> dict:
        nonlocal seen
        seen += 1
        if seen > sample:
            raise _SampleTaken
        fields.update(data)
        return adapt(data, path, id_in_file)

    reader.adapter = spy
    logger.disable("datatrove")  # the reader's per-file INFO lines: pre-run checks print nothing but errors
    try:
        if next(iter(reader.run(rank=0, world_size=1)), None) is not None:
            return
    except _SampleTaken:
        pass
    finally:
        logger.enable("datatrove")
    if not seen:
        raise CurationError(f"source {source.name}: its input holds no records")
    raise CurationError(f"source {source.name}: none of its first {min(seen, sample)} records has a non-empty "
                        f"{source.text_key!r} field (fields: {', '.join(sorted(fields)[:12])}); set the source's "
                        f"text_key in the recipe")


def check_source(source: SourceConfig, base_dir: Path, data_root: str | None) -> None:
    """Raise CurationError (one line, naming the source) when its input cannot be read, or its records
    have no text under `text_key` (local files and local hub mirrors; a remote hub source is not read here)."""
    if source.type == "hf":
        if data_root is None:
            check_hub_reachable(source)
            return
        if not (Path(data_root) / source.hub_id).is_dir():
            raise CurationError(
                f"source {source.name}: no local mirror of {source.hub_id} at {Path(data_root) / source.hub_id} "
                f"(expected layout: DIR/<hub_id>/ as `huggingface-cli download --local-dir` writes it)"
            )
        check_text_key(source, base_dir, data_root)
        return
    if source.type == "pydoc":
        return
    path = source_root(source, base_dir)
    if not path.exists():
        raise CurationError(f"source {source.name}: input path {path} does not exist (check its `path` in the recipe)")
    if path.is_dir() and source.type in ("jsonl", "parquet", "folder"):
        glob = source.glob or DEFAULT_GLOBS[source.type]
        if next(iter(path.glob(glob)), None) is None:
            raise CurationError(f"source {source.name}: no files matching {glob} under {path}")
    if source.type in ("jsonl", "parquet"):
        check_text_key(source, base_dir, data_root)
