"""Perplexity on the validation split of a curation manifest (docs/data_contract.md).

Each validation shard (a flat array of token ids, documents EOS-terminated, cumulative document
ends in `.ds.index`) is scored in non-overlapping windows of `seq_len` targets by
`model.scoring.stream_nll`: every token but a shard's first is a target once, no context crosses a
window, and the last window of a shard may be shorter (datatrove's reader would drop that tail; a
validation number should not). With `packing="document"` (as in training) the Mamba2 state/conv,
attention and RoPE restart at document boundaries inside a window and targets that start a new
document are not scored; with "continuous" the window is one plain sequence.

The NLL is the training objective (HybridLM.loss), summed over scored targets:
    nll = sum / tokens,   ppl = exp(nll),   bits_per_token = nll / ln 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from config.manifest import Manifest, ManifestError, load_manifest, sha256_of
from eval.errors import EvalError
from model.hybrid import HybridLM
from model.scoring import stream_nll

Packing = Literal["document", "continuous"]
REDO = "re-run curation (pipeline/curate.py)"


def read_manifest(path: str | Path) -> Manifest:
    """The parsed manifest (config/manifest.py), with at least one validation shard."""
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
    """Token-weighted NLL/perplexity over all validation shards (and per source); `limit` caps windows.
    A progress bar on stderr counts the windows scored."""
    from tqdm import tqdm

    dtype = np.dtype(manifest.token_dtype).newbyteorder("<")
    shards = [(src.name, shard) for src in manifest.splits["validation"].sources for shard in src.shards]
    # windows per shard from its token count (bytes / itemsize), as model.scoring.windows cuts it
    n_windows = sum(math.ceil(max(shard.bytes // dtype.itemsize - 1, 0) / seq_len) for _, shard in shards)
    bar = tqdm(total=n_windows if limit is None else min(limit, n_windows), desc="val_ppl", unit="window")
    total, per_source = _Sums(), {}
    with bar:
        for name, shard in shards:
            left = None if limit is None else max(limit - total.windows, 0)
            tokens = np.memmap(manifest.resolve(shard.path), dtype=dtype, mode="r")
            ends = np.fromfile(manifest.resolve(shard.index), dtype="<u8").astype(np.int64)
            scored = stream_nll(model, tokens, seq_len, batch_size, ends if packing == "document" else None, left,
                                on_batch=bar.update)
            for sums in (total, per_source.setdefault(name, _Sums())):
                sums.add(*scored)
    if total.tokens == 0:
        raise EvalError(f"the validation split of {manifest.root / 'manifest.json'} has no token to score")
    return {**total.report(), "seq_len": seq_len, "packing": packing, "manifest": str(manifest.root / "manifest.json"),
            "sources": {name: s.report() for name, s in per_source.items()}}
