"""Perplexity on the validation split of a curation manifest (docs/data_contract.md).

Each validation shard (a flat array of token ids, documents EOS-terminated, cumulative document
ends in `.ds.index`) is cut into non-overlapping windows of `seq_len` targets: window k reads inputs
t[kL : kL+L] and predicts t[kL+1 : kL+L+1], so every token but a shard's first is a target once
and no context crosses a window. The last window of a shard may be shorter (datatrove's reader would
drop that tail; a validation number should not). With `packing="document"` (as in training) the
Mamba2 state/conv, attention and RoPE restart at document boundaries inside a window and targets
that start a new document are not scored; with "continuous" the window is one plain sequence.

The NLL is the training objective (HybridLM.loss), summed over scored targets:
    nll = sum / tokens,   ppl = exp(nll),   bits_per_token = nll / ln 2.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

from eval.errors import EvalError
from model.hybrid import HybridLM

Packing = Literal["document", "continuous"]


@dataclass(frozen=True)
class Shard:
    source: str
    path: Path
    index: Path
    tokens: int
    sha256: str | None


@dataclass(frozen=True)
class ValidationData:
    manifest: Path
    shards: tuple[Shard, ...]
    token_dtype: np.dtype
    tokenizer_json: Path | None
    vocab_size: int | None


def read_validation_split(manifest: str | Path) -> ValidationData:
    """The validation shards of a manifest.json. (A small reader of the manifest format: pipeline/
    has no manifest loader to share yet.)"""
    path = Path(manifest)
    if not path.is_file():
        raise EvalError(f"manifest {path} does not exist (pass --manifest or set data.manifest; run pipeline/curate.py)")
    try:
        doc = json.loads(path.read_text())
        dtype = np.dtype(doc["token_dtype"]).newbyteorder("<")
        if dtype.itemsize != int(doc["token_size"]):
            raise ValueError(f"token_dtype {doc['token_dtype']} does not match token_size {doc['token_size']}")
        root = path.parent
        shards = tuple(
            Shard(source=src["name"], path=root / s["path"], index=root / s["index"], tokens=int(s["tokens"]),
                  sha256=s.get("sha256"))
            for src in doc["splits"]["validation"]["sources"] for s in src["shards"]
        )
        tok = doc.get("tokenizer", {})
    except (ValueError, KeyError, TypeError) as exc:
        raise EvalError(f"manifest {path} is not a curation manifest ({type(exc).__name__}: {exc}); re-run curation") from None
    if not shards:
        raise EvalError(f"manifest {path} has no validation shards (curate with a validation share > 0)")
    return ValidationData(manifest=path, shards=shards, token_dtype=dtype,
                          tokenizer_json=root / tok["json"] if tok.get("json") else None,
                          vocab_size=tok.get("vocab_size"))


def verify(data: ValidationData, model_vocab: int, tokenizer_json: Path | None) -> None:
    """Sizes, index ends and sha256 of every shard; the checkpoint's tokenizer against the manifest's."""
    if data.vocab_size is not None and data.vocab_size > model_vocab:
        raise EvalError(f"manifest {data.manifest} has vocab {data.vocab_size} > the model's {model_vocab}: "
                        "this checkpoint was not trained on this data")
    if data.tokenizer_json is not None and data.tokenizer_json.is_file() and tokenizer_json is not None:
        if _sha256(data.tokenizer_json) != _sha256(tokenizer_json):
            raise EvalError(f"checkpoint tokenizer {tokenizer_json} differs from the manifest's "
                            f"{data.tokenizer_json}: val_ppl would read other token ids")
    for shard in data.shards:
        redo = "re-run curation (pipeline/curate.py)"
        if not shard.path.is_file() or not shard.index.is_file():
            raise EvalError(f"missing shard {shard.path} or its index: {redo}")
        if shard.path.stat().st_size != shard.tokens * data.token_dtype.itemsize:
            raise EvalError(f"corrupt shard {shard.path}: {shard.path.stat().st_size} bytes, manifest says "
                            f"{shard.tokens} tokens of {data.token_dtype.itemsize} bytes; {redo}")
        ends = np.fromfile(shard.index, dtype="<u8")
        if len(ends) == 0 or int(ends[-1]) != shard.tokens or np.any(np.diff(ends.astype(np.int64)) <= 0):
            raise EvalError(f"corrupt shard index {shard.index}: document ends do not cover {shard.tokens} tokens; {redo}")
        if shard.sha256 and _sha256(shard.path) != shard.sha256:
            raise EvalError(f"corrupt shard {shard.path}: sha256 differs from the manifest; {redo}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def windows(n_tokens: int, seq_len: int) -> Iterator[tuple[int, int]]:
    """(start, length) of each window: inputs [start, start+length), targets shifted by one."""
    for start in range(0, n_tokens - 1, seq_len):
        yield start, min(seq_len, n_tokens - 1 - start)


@dataclass
class _Sums:
    nll: float = 0.0
    tokens: int = 0
    windows: int = 0

    def report(self) -> dict:
        nll = self.nll / max(self.tokens, 1)
        return {"nll": nll, "ppl": math.exp(nll), "bits_per_token": nll / math.log(2),
                "tokens": self.tokens, "windows": self.windows}


@torch.inference_mode()
def validation_perplexity(model: HybridLM, data: ValidationData, seq_len: int, batch_size: int,
                          packing: Packing = "document", limit: int | None = None) -> dict:
    """Token-weighted NLL/perplexity over all validation shards (and per source); `limit` caps windows."""
    device = model.embed.weight.device
    total, per_source = _Sums(), {}
    for shard in data.shards:
        tokens = np.memmap(shard.path, dtype=data.token_dtype, mode="r")
        ends = np.fromfile(shard.index, dtype="<u8").astype(np.int64)
        spans = list(windows(len(tokens), seq_len))
        if limit is not None:
            spans = spans[: max(limit - total.windows, 0)]
        for i in range(0, len(spans), batch_size):
            ids, labels, seq_idx = _batch(tokens, ends, spans[i: i + batch_size], packing, device)
            n = int((labels != -100).sum())
            if n:
                mean = model.loss(ids, labels, seq_idx=seq_idx)
                for sums in (total, per_source.setdefault(shard.source, _Sums())):
                    sums.nll += float(mean) * n
                    sums.tokens += n
            for sums in (total, per_source.setdefault(shard.source, _Sums())):
                sums.windows += len(spans[i: i + batch_size])
    if total.tokens == 0:
        raise EvalError(f"validation split of {data.manifest} has no token to score at seq_len {seq_len}")
    return {**total.report(), "seq_len": seq_len, "packing": packing, "manifest": str(data.manifest),
            "sources": {name: s.report() for name, s in per_source.items()}}


def _batch(tokens: np.ndarray, ends: np.ndarray, spans: list[tuple[int, int]], packing: Packing,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-padded inputs (b, l), labels (b, l) (-100 = not scored) and seq_idx (b, l) or None."""
    width = max(length for _, length in spans)
    ids = np.zeros((len(spans), width), dtype=np.int64)
    labels = np.full((len(spans), width), -100, dtype=np.int64)
    seq_idx = np.zeros((len(spans), width), dtype=np.int64)
    for row, (start, length) in enumerate(spans):
        window = np.asarray(tokens[start: start + length + 1], dtype=np.int64)
        ids[row, :length] = window[:-1]
        labels[row, :length] = window[1:]
        if packing == "document":
            doc = np.searchsorted(ends, np.arange(start, start + length + 1), side="right")  # document of each token
            seq_idx[row, :length] = doc[:-1] - doc[0]
            seq_idx[row, length:] = seq_idx[row, length - 1]  # right padding: same document, never scored
            labels[row, :length][doc[1:] != doc[:-1]] = -100  # a target that starts the next document
    as_t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return as_t(ids), as_t(labels), as_t(seq_idx) if packing == "document" else None
