"""manifest.json: the typed contract between curation and its readers (pretraining, val_ppl eval).

    m = load_manifest("outputs/embedded/manifest.json")   # parse + validate (ManifestError, one line)
    m.verify()                                             # files exist, sizes and sha256 match
    folders = m.source_folders("train")                    # for DatatroveFolderDataset(folder, ...)

Layout and field meaning: docs/data_contract.md. Paths inside the manifest are relative to its
folder. This module imports no datatrove/torch so any reader can use it cheaply.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator, Literal

from pydantic import Field, PrivateAttr, ValidationError, model_validator

from config.base import StrictModel, format_validation_error

FORMAT_VERSION = 1
Split = Literal["train", "validation"]
_DTYPES = {"uint16": 2, "uint32": 4}


class ManifestError(ValueError):
    """A manifest or shard that cannot be used; one line that says what to do."""


class ShardEntry(StrictModel):
    """One .ds file: `tokens` little-endian ids of `token_dtype` (EOS after each document) and its
    .ds.index of `documents` uint64 cumulative document end offsets (in tokens)."""

    path: str
    index: str
    bytes: int = Field(..., ge=0)
    tokens: int = Field(..., ge=0)
    documents: int = Field(..., ge=0)
    sha256: str
    index_sha256: str


class SourceEntry(StrictModel):
    name: str
    weight: float = Field(..., ge=0, le=1, description="Share of the training token stream (sums to 1).")
    folder: str
    documents: int = Field(..., ge=0)
    tokens: int = Field(..., ge=0)
    shards: list[ShardEntry]

    @model_validator(mode="after")
    def _totals(self) -> "SourceEntry":
        if sum(s.tokens for s in self.shards) != self.tokens or sum(s.documents for s in self.shards) != self.documents:
            raise ValueError(f"source {self.name}: tokens/documents differ from the sum over its shards")
        return self


class SplitEntry(StrictModel):
    documents: int = Field(..., ge=0)
    tokens: int = Field(..., ge=0)
    sources: list[SourceEntry]

    @model_validator(mode="after")
    def _totals(self) -> "SplitEntry":
        sources = self.sources
        if sum(s.tokens for s in sources) != self.tokens or sum(s.documents for s in sources) != self.documents:
            raise ValueError("split tokens/documents differ from the sum over its sources")
        return self


class TokenizerEntry(StrictModel):
    model: str = Field(..., description="sentencepiece model, relative path.")
    json_path: str = Field(..., alias="json", description="HF tokenizers file with identical ids.")
    sha256: str = Field(..., description="sha256 of the sentencepiece model file.")
    json_sha256: str
    vocab_size: int = Field(..., ge=1)
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int


class RecipeEntry(StrictModel):
    name: str
    sha256: str


class Manifest(StrictModel):
    format_version: Literal[1]
    created: str = Field(..., description="UTC time, ISO 8601.")
    recipe: RecipeEntry
    tokenizer: TokenizerEntry
    token_dtype: Literal["uint16", "uint32"]
    token_size: Literal[2, 4]
    splits: dict[Split, SplitEntry]
    _root: Path = PrivateAttr(default=Path("."))

    @model_validator(mode="after")
    def _check(self) -> "Manifest":
        if _DTYPES[self.token_dtype] != self.token_size:
            raise ValueError(f"token_size {self.token_size} does not match token_dtype {self.token_dtype}")
        if self.tokenizer.vocab_size > 256 ** self.token_size:
            raise ValueError(f"vocab_size {self.tokenizer.vocab_size} does not fit {self.token_dtype}")
        if "train" not in self.splits:
            raise ValueError("splits must contain train")
        for split, entry in self.splits.items():
            for shard in (s for src in entry.sources for s in src.shards):
                if shard.bytes != shard.tokens * self.token_size:
                    raise ValueError(f"{split} shard {shard.path}: bytes != tokens * token_size")
        weights = sum(s.weight for s in self.splits["train"].sources)
        if abs(weights - 1) > 1e-6:
            raise ValueError(f"train source weights sum to {weights}, not 1")
        return self

    @property
    def root(self) -> Path:
        """The folder holding manifest.json; every path in the manifest is relative to it."""
        return self._root

    def resolve(self, rel: str) -> Path:
        return self._root / rel

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    def source_folders(self, split: Split) -> dict[str, Path]:
        """Source name -> folder of its .ds shards (readable by datatrove's DatatroveFolderDataset)."""
        return {s.name: self.resolve(s.folder) for s in self.splits[split].sources}

    def shards(self) -> Iterator[ShardEntry]:
        for entry in self.splits.values():
            for source in entry.sources:
                yield from source.shards

    def verify(self, checksums: bool = True) -> None:
        """ManifestError unless every listed file exists with the listed size (and sha256 if `checksums`)."""
        rerun = "re-run pipeline/curate.py to regenerate it"
        tok = self.tokenizer
        files = [(tok.model, None, tok.sha256), (tok.json_path, None, tok.json_sha256)]
        for shard in self.shards():
            files += [(shard.path, shard.bytes, shard.sha256), (shard.index, 8 * shard.documents, shard.index_sha256)]
        for rel, size, digest in files:
            path = self.resolve(rel)
            if not path.is_file():
                raise ManifestError(f"{path} is listed in {self._root / 'manifest.json'} but missing; {rerun}")
            if size is not None and path.stat().st_size != size:
                raise ManifestError(f"corrupt file {path}: {path.stat().st_size} bytes, manifest says {size}; {rerun}")
            if checksums and sha256_of(path) != digest:
                raise ManifestError(f"corrupt file {path}: sha256 differs from the manifest; {rerun}")


def dtype_for_vocab(vocab_size: int) -> tuple[str, int]:
    """Token dtype and bytes per token of the shards (datatrove's DocumentTokenizer rule)."""
    return ("uint16", 2) if vocab_size <= 2**16 else ("uint32", 4)


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_sha256(path: str | Path) -> str:
    """sha256 of a manifest.json without its creation time: it lists every shard's and the tokenizer's
    hash, so two curations of the same recipe on the same inputs (another machine of one image) agree."""
    data = json.loads(Path(path).read_text())
    data.pop("created", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def load_manifest(path: str | Path) -> Manifest:
    """Parse and validate manifest.json (a folder holding one is accepted too)."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise ManifestError(
            f"manifest {path} not found: run `python pipeline/curate.py --recipe NAME --output DIR` first")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(
            f"manifest {path} is not valid JSON (line {exc.lineno}: {exc.msg}); re-run curation") from None
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(f"manifest {path} is invalid: {format_validation_error(exc)}") from None
    manifest._root = path.resolve().parent
    return manifest


__all__ = ["Manifest", "ManifestError", "ShardEntry", "SourceEntry", "SplitEntry", "TokenizerEntry",
           "dtype_for_vocab", "load_manifest", "sha256_of", "FORMAT_VERSION"]
