"""Numbers an export reports: validation tokens, perplexity, decode tokens/s, file sizes.

Validation tokens come from the curated manifest's validation split (docs/data_contract.md: flat
little-endian token arrays, documents concatenated with EOS) or from a plain text file tokenized
with the checkpoint's tokenizer. Perplexity is exp(mean next-token loss) over non-overlapping
windows (`model.scoring`, shared with the evaluation stage), the loss the trainer optimises.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export import ExportError
from model.hybrid import HybridLM
from model.scoring import stream_nll


def manifest_validation_tokens(manifest: str | Path, limit: int) -> torch.Tensor:
    """The first `limit` tokens of the manifest's validation split, (n,) long.

    The shards are read directly as the flat arrays the contract defines (their .ds.index document
    offsets are not needed: windows run across documents as in continuous packing).
    """
    path = Path(manifest)
    if not path.is_file():
        raise ExportError(f"manifest {path} does not exist (pass the manifest.json written by pipeline/curate.py)")
    info = json.loads(path.read_text())
    try:
        dtype = np.dtype(info["token_dtype"]).newbyteorder("<")
        sources = info["splits"]["validation"]["sources"]
    except KeyError as exc:
        raise ExportError(f"manifest {path} has no {exc.args[0]!r} entry: re-run curation") from None
    chunks, total = [], 0
    for source in sources:
        for shard in source["shards"]:
            shard_path = path.parent / shard["path"]
            if not shard_path.is_file():
                raise ExportError(f"validation shard {shard_path} is missing: re-run curation")
            arr = np.fromfile(shard_path, dtype=dtype, count=limit - total)
            chunks.append(torch.from_numpy(arr.astype(np.int64)))
            total += arr.size
            if total >= limit:
                return torch.cat(chunks)
    if total < 2:
        raise ExportError(f"manifest {path} has no validation tokens")
    return torch.cat(chunks)


def text_tokens(text_file: str | Path, tokenizer: Any, limit: int) -> torch.Tensor:
    """BOS + the file's tokens, at most `limit`, (n,) long."""
    path = Path(text_file)
    if not path.is_file():
        raise ExportError(f"evaluation text {path} does not exist (export.eval_text / --eval-text)")
    ids = [tokenizer.bos_token_id, *tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]]
    if len(ids) < 2:
        raise ExportError(f"evaluation text {path} is empty")
    return torch.tensor(ids[:limit], dtype=torch.long)


@torch.inference_mode()
def perplexity(model: HybridLM, tokens: torch.Tensor, seq_len: int, batch_size: int = 8) -> dict[str, float]:
    """exp(mean loss) over non-overlapping windows of `seq_len` targets (the tail window shorter),
    windows running across documents (`model.scoring.stream_nll`). tokens: (n,) long."""
    nll, scored, _ = stream_nll(model, tokens, seq_len, batch_size)
    if scored == 0:
        raise ExportError(f"no token to score in {tokens.numel()} evaluation tokens")
    mean = nll / scored
    return {"loss": mean, "ppl": math.exp(mean), "tokens": scored}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode_tokens_per_s(model: HybridLM, prompt_len: int, new_tokens: int, batch: int = 1, seed: int = 0) -> float:
    """Greedy decode rate (generated tokens/s over all rows) after a random prompt; prefill not timed."""
    device = model.embed.weight.device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.cfg.vocab_size, (batch, prompt_len), generator=gen).to(device)
    logits, cache = model.prefill(ids)
    tok = logits.argmax(-1)
    model.step(tok, cache)  # first step outside the timing (lazy init, allocator warm-up)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        tok = model.step(tok, cache).argmax(-1)
    _sync(device)
    return batch * new_tokens / (time.perf_counter() - t0)


def file_bytes(folder: str | Path, pattern: str = "*") -> int:
    """Total size of the files matching `pattern` directly in `folder`."""
    return sum(p.stat().st_size for p in Path(folder).glob(pattern) if p.is_file())
