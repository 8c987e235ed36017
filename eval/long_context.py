"""Whether a model uses its context: passkey retrieval and perplexity by position, generated locally.

passkey       A random 5-digit key hidden at a depth (fraction of the filler) inside repeated filler
              text of a given length in tokens, then asked for (Mohtashami & Jaggi 2023, as in
              LongLoRA's and YaRN's evaluations). Deterministic: the keys come from `seed`. A sample
              is correct when greedy decoding would emit the key: the answer's tokens are scored
              teacher-forced in one forward and every one must be the argmax (the same tokens greedy
              decoding writes, without a decode loop). Reported per (length, depth) cell: accuracy
              and the answer's mean NLL per token (informative before accuracy leaves 0).
position_ppl  Perplexity of the validation stream of a curation manifest in windows of `seq_len`
              tokens with no document resets (positions count from the window start), per position
              bucket: [0, L/2^(n-1)), ..., [L/4, L/2), [L/2, L). A model that uses its context gets lower
              perplexity in later buckets; one that does not stays flat or rises past its trained length.

Only the positions scored go through the LM head (passkey) or the head runs in chunks
(position_ppl, model/loss.py), so 128K-token rows never hold their whole logits.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any

import numpy as np
import torch

from config.manifest import Manifest
from model.hybrid import HybridLM
from model.wgrad import linear

log = logging.getLogger(__name__)

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
HEAD_CHUNK = 4096  # tokens per LM-head chunk in position_ppl


def passkey_sample(tokenizer: Any, length: int, depth: float, key: int) -> tuple[list[int], list[int]]:
    """(prompt ids of exactly `length` tokens, answer ids) with the needle after `depth` of the filler
    (0: right after the intro, 1: right before the question), at a filler sentence boundary."""
    enc = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    intro, filler, needle, question = enc(INTRO), enc(FILLER), enc(NEEDLE.format(key=key)), enc(QUESTION)
    room = length - len(intro) - len(needle) - len(question)
    if room < 0:
        raise ValueError(f"passkey length {length} is shorter than the prompt's fixed text "
                         f"({length - room} tokens): use longer eval.passkey_lengths")
    hay = (filler * (room // len(filler) + 1))[:room]
    cut = round(depth * (room // len(filler))) * len(filler)  # whole filler repetitions before the needle
    return intro + hay[:cut] + needle + hay[cut:] + question, enc(f" {key}")


@torch.inference_mode()
def answer_score(model: HybridLM, prompt: list[int], answer: list[int]) -> tuple[bool, float]:
    """(every answer token is the argmax after its prefix, mean NLL per answer token) for one row."""
    device = model.embed.weight.device
    ids = torch.tensor([prompt + answer[:-1]], device=device)
    h = model.hidden_states(ids)[0, len(prompt) - 1:]  # (a, d): the positions predicting the answer
    logits = linear(h, model.head_weight)[:, : model.cfg.vocab_size].float()
    target = torch.tensor(answer, device=device)
    nll = torch.nn.functional.cross_entropy(logits, target)
    return bool((logits.argmax(-1) == target).all()), float(nll)


def passkey(model: HybridLM, tokenizer: Any, lengths: list[int], depths: list[float], samples: int,
            seed: int = 0) -> dict:
    """Accuracy and answer NLL per (length, depth) cell, `samples` keys each, and per length."""
    rng = random.Random(seed)
    cells, per_length = [], {}
    for length in lengths:
        hits = 0
        for depth in depths:
            scores = [answer_score(model, *passkey_sample(tokenizer, length, depth, rng.randrange(10_000, 100_000)))
                      for _ in range(samples)]
            correct = sum(ok for ok, _ in scores)
            hits += correct
            cells.append({"length": length, "depth": depth, "accuracy": correct / samples,
                          "answer_nll": sum(n for _, n in scores) / samples, "samples": samples})
            log.info("passkey length %d depth %.2f: %d/%d", length, depth, correct, samples)
        per_length[str(length)] = hits / (samples * len(depths))
    total = sum(c["accuracy"] for c in cells) / len(cells)
    return {"accuracy": total, "per_length": per_length, "cells": cells, "samples_per_cell": samples,
            "seed": seed, "max_seq_len": model.cfg.max_seq_len}


def bucket_edges(seq_len: int, n_buckets: int) -> list[int]:
    """[0, L/2^(n-1), ..., L/2, L]: doubling buckets, the last half of the window the last bucket."""
    inner = sorted({max(1, seq_len >> k) for k in range(1, n_buckets)})
    return [0, *[e for e in inner if e < seq_len], seq_len]


def validation_stream(manifest: Manifest, n_tokens: int) -> np.ndarray:
    """The first `n_tokens` of the validation shards read one after the other (EOS-separated documents)."""
    dtype = np.dtype(manifest.token_dtype).newbyteorder("<")
    parts, have = [], 0
    for src in manifest.splits["validation"].sources:
        for shard in src.shards:
            if have >= n_tokens:
                break
            part = np.memmap(manifest.resolve(shard.path), dtype=dtype, mode="r")[: n_tokens - have]
            parts.append(np.asarray(part, dtype=np.int64))
            have += len(part)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@torch.inference_mode()
def position_perplexity(model: HybridLM, manifest: Manifest, seq_len: int, n_buckets: int, windows: int) -> dict:
    """NLL and perplexity per position bucket over up to `windows` windows of `seq_len` targets."""
    stream = validation_stream(manifest, windows * seq_len + 1)
    n_windows = (len(stream) - 1) // seq_len
    if n_windows == 0:
        raise ValueError(f"the validation split has {len(stream)} tokens, fewer than one window of {seq_len + 1}: "
                         "use a smaller eval.position_ppl_seq_len")
    edges = bucket_edges(seq_len, n_buckets)
    nll_sum = np.zeros(len(edges) - 1)
    device = model.embed.weight.device
    for w in range(n_windows):
        window = torch.from_numpy(stream[w * seq_len: (w + 1) * seq_len + 1]).to(device)
        nll = model(window[None, :-1], labels=window[None, 1:], loss_chunk_tokens=HEAD_CHUNK)[0].double().cpu()
        nll_sum += [float(nll[lo:hi].sum()) for lo, hi in zip(edges, edges[1:])]
    buckets = []
    for (lo, hi), total in zip(zip(edges, edges[1:]), nll_sum):
        mean = total / ((hi - lo) * n_windows)
        buckets.append({"start": lo, "end": hi, "nll": mean, "ppl": math.exp(mean), "tokens": (hi - lo) * n_windows})
    return {"seq_len": seq_len, "windows": n_windows, "buckets": buckets, "max_seq_len": model.cfg.max_seq_len,
            "manifest": str(manifest.root / "manifest.json")}


def plot(passkey_result: dict | None, position_result: dict | None, path: Any) -> Any:
    """PNG: passkey accuracy per (depth, length) as a heat map and per length as a line; perplexity
    per position bucket. Panels only for what was run."""
    from train.plot import new_figure, save_png  # the project's headless, atomic PNG writer

    panels = (2 if passkey_result else 0) + (1 if position_result else 0)
    fig, axes = new_figure(panels, width=5.0)
    if passkey_result:
        lengths = sorted({c["length"] for c in passkey_result["cells"]})
        depths = sorted({c["depth"] for c in passkey_result["cells"]})
        grid = np.zeros((len(depths), len(lengths)))
        for c in passkey_result["cells"]:
            grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["accuracy"]
        heat, line = axes[0], axes[1]
        image = heat.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        heat.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
        heat.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        heat.set_xlabel("prompt length (tokens)")
        heat.set_ylabel("needle depth")
        heat.set_title("passkey accuracy")
        fig.colorbar(image, ax=heat)
        line.plot(lengths, [passkey_result["per_length"][str(n)] for n in lengths], marker="o")
        line.axvline(passkey_result["max_seq_len"], color="grey", linestyle="--", label="model.max_seq_len")
        line.set_xscale("log", base=2)
        line.set_ylim(-0.05, 1.05)
        line.set_xlabel("prompt length (tokens)")
        line.set_ylabel("accuracy (all depths)")
        line.legend(fontsize=8)
        line.grid(alpha=0.3)
    if position_result:
        ax = axes[-1]
        b = position_result["buckets"]
        ax.plot([x["end"] for x in b], [x["ppl"] for x in b], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position bucket end (tokens)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"perplexity by position ({position_result['windows']} windows of {position_result['seq_len']})")
        ax.grid(alpha=0.3)
    return save_png(fig, path)
