"""Where every file of a curation run lives (OUTPUT/ as docs/data_contract.md describes it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.logging import logger

from pipeline.errors import CurationError


@dataclass(frozen=True)
class Layout:
    out: Path  # absolute

    @property
    def manifest(self) -> Path:
        return self.out / "manifest.json"

    @property
    def report(self) -> Path:
        return self.out / "report.json"

    @property
    def resolved_recipe(self) -> Path:
        return self.out / "recipe.resolved.yaml"

    @property
    def tokenizer_dir(self) -> Path:
        return self.out / "tokenizer"

    def tokens(self, split: str, source: str) -> Path:
        return self.out / "tokens" / split / source

    # ------------------------------------------------ work/: intermediate data, logs, completion markers
    @property
    def work(self) -> Path:
        return self.out / "work"

    def logs(self, stage: str) -> Path:
        return self.work / "logs" / stage

    @property
    def filtered(self) -> Path:
        return self.work / "filtered"

    @property
    def exact_deduped(self) -> Path:
        return self.work / "exact_deduped"

    def dedup(self, kind: str, part: str) -> Path:
        return self.work / kind / part

    @property
    def decont_index(self) -> Path:
        return self.work / "decont_index"

    @property
    def curated(self) -> Path:
        return self.work / "curated"

    @property
    def tokenizer_work(self) -> Path:
        return self.work / "tokenizer"

    def tokenized(self, split: str, source: str) -> Path:
        return self.work / "tokenized" / split / source

    def merged(self, split: str, source: str) -> Path:
        return self.work / "merged" / split / source

    @property
    def recipe_hash(self) -> Path:
        return self.work / "recipe.sha256"


class WorkReader(JsonlReader):
    """JsonlReader over an intermediate folder that may hold no file (all its documents were removed)."""

    name = "🐿 Jsonl (work)"

    def __init__(self, folder: Path, glob_pattern: str = "*.jsonl"):
        super().__init__(str(folder), glob_pattern=glob_pattern, compression=None, add_file_path=False)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if not self.data_folder.list_files(glob_pattern=self.glob_pattern):
            logger.warning(f"{self.data_folder.path} holds no {self.glob_pattern}: nothing to read")
            return
        yield from super().run(data, rank, world_size)


def work_writer(folder: Path, filename: str = "${source}/${rank}.jsonl") -> JsonlWriter:
    """Uncompressed jsonl (fast, byte-reproducible), documents' metadata kept."""
    return JsonlWriter(str(folder), output_filename=filename, compression=None)


def require_documents(curated_train: Path) -> None:
    """CurationError (one line) when no training document survived curation: nothing to train a tokenizer on."""
    if not any(f.stat().st_size for f in curated_train.glob("*/*.jsonl")):
        raise CurationError(f"no training documents are left after filtering, decontamination and dedup "
                            f"({curated_train} is empty): check the sources' text_key and the filter thresholds "
                            f"(per-step counts: {curated_train.parents[1] / 'logs'}/<stage>/stats)")
