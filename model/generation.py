"""Cached autoregressive generation: one prefill, then O(1)-per-token steps for the Mamba2 layers.

Shared by evaluation (`generate_until`) and the generation CLI. Prompts of different lengths are
left-padded and run as one batch (the model treats padding as a separate document).

Shape legend: b batch rows, v vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch

from model.decode_graph import GraphedDecodeStep, decode_graph_enabled
from model.hybrid import HybridLM


@dataclass
class SamplingParams:
    """How the next token is chosen. temperature 0 means greedy (argmax)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1.0: no nucleus cut
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the row (CTRL-style)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of tokens present in `history` (b, t) by `penalty`."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = torch.gather(logits, 1, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, history, seen)


def choose_next(
    logits: torch.Tensor,
    params: SamplingParams,
    history: torch.Tensor,
    generator: torch.Generator | Sequence[torch.Generator] | None,
) -> torch.Tensor:
    """Next token per row. logits: (b, v) -> (b,) long. `generator`: one for the batch, or one per row
    (a row's draws then do not depend on the other rows of its batch)."""
    logits = apply_repetition_penalty(logits.float(), history, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) > params.top_p  # keep the token that crosses top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, -1)
    if isinstance(generator, Sequence):
        return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids -> (ids (b, l), attention_mask (b, l)) left-padded to the longest row."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (add BOS)")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=device)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.inference_mode()
def generate(
    model: HybridLM,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    eos_id: int | None = None,
    pad_id: int = 0,
    on_token: Callable[[int, int], None] | None = None,
    should_stop: Callable[[int, list[int]], bool] | None = None,
    cuda_graph: bool | str = "auto",
    row_seeds: Sequence[int] | None = None,
) -> list[list[int]]:
    """Generate continuations for a batch of prompts; returns the new tokens of each row.

    A row stops at `eos_id` (not included), after `max_new_tokens`, or when `should_stop(row, tokens)`
    says so (e.g. a stop string appeared). `on_token(row, token)` streams tokens as they are chosen.
    cuda_graph: decode through a static cache replayed as a CUDA graph (model/decode_graph.py): auto (on
    for CUDA devices), true (CUDA only) or false.
    row_seeds: one seed per prompt, each row sampled from its own generator (instead of params.seed for
    the batch), so a row's sample does not depend on which prompts share its batch.
    """
    device = model.embed.weight.device
    graphed = decode_graph_enabled(cuda_graph, device)
    generator: torch.Generator | list[torch.Generator] | None = None
    if row_seeds is not None:
        if len(row_seeds) != len(prompts):
            raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {len(prompts)} prompts")
        generator = [torch.Generator(device=device).manual_seed(s) for s in row_seeds]
    elif params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    ids, mask = left_pad(prompts, pad_id, device)
    out: list[list[int]] = [[] for _ in prompts]
    if params.max_new_tokens == 0:
        return out
    logits, cache = model.prefill(ids, mask)
    if graphed:
        cache.make_static(ids.size(1) + params.max_new_tokens)
        step: Callable[[torch.Tensor], torch.Tensor] = GraphedDecodeStep(model, cache)
    else:
        step = partial(model.step, cache=cache)
    # the penalty's history: padding repeats the row's last prompt token, so it only ever sees the row's
    # own tokens (a pad id would be penalised in padded rows only, and rows would differ from alone)
    history = torch.where(mask.bool(), ids, ids[:, -1:])
    done = [False] * len(prompts)
    for i in range(params.max_new_tokens):
        nxt = choose_next(logits, params, history, generator)
        for row, tok in enumerate(nxt.tolist()):  # one device-to-host copy per step
            if done[row]:
                continue
            if eos_id is not None and tok == eos_id:
                done[row] = True
                continue
            out[row].append(tok)
            if on_token is not None:
                on_token(row, tok)
            if should_stop is not None and should_stop(row, out[row]):
                done[row] = True
        if all(done) or i == params.max_new_tokens - 1:
            break
        if params.repetition_penalty != 1.0:  # the history only feeds the penalty: no per-token copy otherwise
            history = torch.cat([history, nxt.unsqueeze(1)], dim=1)
        logits = step(nxt)
    return out
