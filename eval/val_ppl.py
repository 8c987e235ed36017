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

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

from eval.errors import EvalError
from model.hybrid import HybridLM
from pipeline.manifest import Manifest, ManifestError, load_manifest, sha256_of

Packing = Literal["document", "continuous"]
REDO = "re-run curation (pipeline/curate.py)"


def read_manifest(path: str | Path) -> Manifest:
    """The parsed manifest (pipeline/manifest.py), with at least one validation shard."""
    try:
        manifest = load_manifest(path)
    except ManifestError as exc:
        raise EvalError(str(exc)) from None
    split = manifest.splits.get("validation")
    if split is None or not any(src.shards for src in split.sources):
        raise EvalError(f"manifest {path} has no validation shards (curate with a validation share > 0)")
    return manifest


def verify(manifest: Manifest, model_vocab: int, tokenizer_json: Path) -> None:
    """The checkpoint's tokenizer against the manifest's; size and sha256 of the validation shards
    and their indexes (only these: Manifest.verify would hash the whole training set too)."""
    if manifest.tokenizer.vocab_size > model_vocab:
        raise EvalError(f"manifest vocab {manifest.tokenizer.vocab_size} > the model's {model_vocab}: "
                        "this checkpoint was not trained on this data")
    if sha256_of(tokenizer_json) != manifest.tokenizer.json_sha256:
        raise EvalError(f"checkpoint tokenizer {tokenizer_json} differs from the manifest's "
                        f"{manifest.resolve(manifest.tokenizer.json_path)}: val_ppl would read other token ids")
    for src in manifest.splits["validation"].sources:
        for shard in src.shards:
            for rel, size, digest in ((shard.path, shard.bytes, shard.sha256),
                                      (shard.index, 8 * shard.documents, shard.index_sha256)):
                path = manifest.resolve(rel)
                if not path.is_file():
                    raise EvalError(f"missing shard file {path}; {REDO}")
                if path.stat().st_size != size:
                    raise EvalError(f"corrupt shard file {path}: {path.stat().st_size} bytes, manifest says {size}; {REDO}")
                if sha256_of(path) != digest:
                    raise EvalError(f"corrupt shard file {path}: sha256 differs from the manifest; {REDO}")


def windows(n_tokens: int, seq_len: int) -> Iterator[tuple[int, int]]:
    """(start, length) of each window: inputs [start, start+length), targets shifted by one."""
    for start in range(0, n_tokens - 1, seq_len):
        yield start, min(seq_len, n_tokens - 1 - start)


@dataclass
class _Sums:
    nll: float = 0.0
    tokens: int = 0
    windows: int = 0

    def add(self, nll: float, tokens: int, windows: int) -> None:
        self.nll += nll
        self.tokens += tokens
        self.windows += windows

    def report(self) -> dict:
        nll = self.nll / max(self.tokens, 1)
        return {"nll": nll, "ppl": math.exp(nll), "bits_per_token": nll / math.log(2),
                "tokens": self.tokens, "windows": self.windows}


@torch.inference_mode()
def validation_perplexity(model: HybridLM, manifest: Manifest, seq_len: int, batch_size: int,
                          packing: Packing = "document", limit: int | None = None) -> dict:
    """Token-weighted NLL/perplexity over all validation shards (and per source); `limit` caps windows."""
    device = model.embed.weight.device
    dtype = np.dtype(manifest.token_dtype).newbyteorder("<")
    total, per_source = _Sums(), {}
    for src in manifest.splits["validation"].sources:
        for shard in src.shards:
            tokens = np.memmap(manifest.resolve(shard.path), dtype=dtype, mode="r")
            ends = np.fromfile(manifest.resolve(shard.index), dtype="<u8").astype(np.int64)
            spans = list(windows(len(tokens), seq_len))
            if limit is not None:
                spans = spans[: max(limit - total.windows, 0)]
            for i in range(0, len(spans), batch_size):
                ids, labels, seq_idx = _batch(tokens, ends, spans[i: i + batch_size], packing, device)
                n = int((labels != -100).sum())
                nll = float(model.loss(ids, labels, seq_idx=seq_idx)) * n if n else 0.0
                for sums in (total, per_source.setdefault(src.name, _Sums())):
                    sums.add(nll, n, len(spans[i: i + batch_size]))
    if total.tokens == 0:
        raise EvalError(f"the validation split of {manifest.root / 'manifest.json'} has no token to score")
    return {**total.report(), "seq_len": seq_len, "packing": packing, "manifest": str(manifest.root / "manifest.json"),
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
