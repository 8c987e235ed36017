"""Next-token NLL of a long token stream, scored in non-overlapping windows (for perplexity).

Window k of a stream t reads inputs t[kL : kL+L] and predicts t[kL+1 : kL+L+1] (L = seq_len), so
every token but the first is a target exactly once and no context crosses a window; the last window
may be shorter. With the stream's document ends given, Mamba2 state/conv, attention and RoPE restart
at every document inside a window (as in document-packed training) and a target that starts a new
document is not scored; without them a window is one plain sequence. The loss is the training
objective (`HybridLM.loss`). Used by the evaluation stage (validation perplexity of a manifest) and
the export stage (perplexity before and after quantisation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

if TYPE_CHECKING:
    from model.hybrid import HybridLM


def windows(n_tokens: int, seq_len: int) -> Iterator[tuple[int, int]]:
    """(start, length) of each window: inputs [start, start+length), targets shifted by one."""
    for start in range(0, n_tokens - 1, seq_len):
        yield start, min(seq_len, n_tokens - 1 - start)


def window_batch(
    tokens: np.ndarray, spans: list[tuple[int, int]], doc_ends: np.ndarray | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-padded inputs (b, l), labels (b, l) (-100 = not scored) and seq_idx (b, l) or None.

    tokens: the stream (n,); doc_ends: cumulative document ends in the stream (datatrove's .ds.index).
    """
    width = max(length for _, length in spans)
    ids = np.zeros((len(spans), width), dtype=np.int64)
    labels = np.full((len(spans), width), -100, dtype=np.int64)
    seq_idx = np.zeros((len(spans), width), dtype=np.int64)
    for row, (start, length) in enumerate(spans):
        window = np.asarray(tokens[start: start + length + 1], dtype=np.int64)
        ids[row, :length] = window[:-1]
        labels[row, :length] = window[1:]
        if doc_ends is not None:
            doc = np.searchsorted(doc_ends, np.arange(start, start + length + 1), side="right")  # document of each token
            seq_idx[row, :length] = doc[:-1] - doc[0]
            seq_idx[row, length:] = seq_idx[row, length - 1]  # right padding: same document, never scored
            labels[row, :length][doc[1:] != doc[:-1]] = -100  # a target that starts the next document
    as_t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return as_t(ids), as_t(labels), as_t(seq_idx) if doc_ends is not None else None


@torch.inference_mode()
def stream_nll(
    model: "HybridLM",
    tokens: np.ndarray | torch.Tensor,
    seq_len: int,
    batch_size: int,
    doc_ends: np.ndarray | None = None,
    max_windows: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[float, int, int]:
    """(summed NLL in nats, scored targets, windows) of `tokens` (n,) in windows of `seq_len`,
    `batch_size` windows per forward, at most `max_windows` windows; `on_batch(windows)` after each
    forward (progress)."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.cpu().numpy()
    device = model.embed.weight.device
    spans = list(windows(len(tokens), seq_len))[:max_windows]
    nll, scored = 0.0, 0
    for i in range(0, len(spans), batch_size):
        ids, labels, seq_idx = window_batch(tokens, spans[i: i + batch_size], doc_ends, device)
        n = int((labels != -100).sum())
        if n:
            nll += float(model.loss(ids, labels, seq_idx=seq_idx)) * n
            scored += n
        if on_batch is not None:
            on_batch(len(spans[i: i + batch_size]))
    return nll, scored, len(spans)
