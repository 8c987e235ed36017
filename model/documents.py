"""Document boundaries of a packed batch, computed once per forward and shared by every layer.

A packed row holds several documents; `seq_idx` (b, l) numbers them (non-decreasing per row). Every
layer needs the same facts in a different form: Mamba2 kernels take `seq_idx` as contiguous int32,
flash-attn's varlen kernel takes `cu_seqlens` (flattened starts) and the longest document, and
FlexAttention takes a block mask. Working them out per layer costs a host sync per attention layer
(`nonzero`, `max`) that stalls the launch queue (its cost: see docs/performance.md), so
`DocumentLayout.build(..., boundaries=True)` (the kernel path) does it once, with one device-to-host
copy of the boundary flags (none when `seq_idx` is already on the CPU).
There, rows that hold a single document need no boundaries at all: when every row is one document
`build` returns None and the model runs its plain causal path (SDPA, no seq_idx in the kernels).
The reference path (`boundaries=False`) only wraps `seq_idx`: no host work, so it traces for ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def document_starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, l) bool on seq_idx's device: True at each row's first token and where a document begins."""
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


def one_document_per_row(starts: torch.Tensor) -> bool:
    """Whether every row of `document_starts`' (b, l) flags holds one document, or a piece of one (each row's
    first token counts as a start): then no row has a boundary inside, and the plain causal path (SDPA, no
    seq_idx) computes what the document path would. The eager forward and the training graphs both ask this."""
    return int(starts.sum()) == starts.size(0)


def cu_seqlens_of(flat_starts: torch.Tensor) -> torch.Tensor:
    """flash-attn's cu_seqlens from the flattened start flags (b * l,) bool on the host: the start of
    every document in the flattened tokens, then b * l. (n_docs + 1,) int32 on the host."""
    total = torch.tensor([flat_starts.numel()])
    return torch.cat([flat_starts.nonzero().flatten(), total]).to(torch.int32)


def positions_from_seq_idx(seq_idx: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document. seq_idx: (b, l) -> (b, l) long."""
    b, l = seq_idx.shape
    idx = torch.arange(l, device=seq_idx.device).expand(b, l)
    starts = document_starts(seq_idx)
    start_pos = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return idx - start_pos


@dataclass
class DocumentLayout:
    """Boundaries of the documents in a (b, l) batch.

    seq_idx     (b, l) on the model's device (int32 and contiguous with boundaries: Mamba2 kernels)
    cu_seqlens  (n_docs + 1,) int32 on the device: start of every document in the flattened b * l
                tokens, then b * l (flash-attn varlen); None without boundaries
    max_seqlen  longest document, tokens (0 without boundaries)
    block_mask  FlexAttention BlockMask, built on first use by `flex_block_mask` and kept
    """

    seq_idx: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    block_mask: Any = None

    @classmethod
    def build(cls, seq_idx: torch.Tensor, device: torch.device, boundaries: bool) -> "DocumentLayout | None":
        """Layout of `seq_idx` (b, l) on `device`. With `boundaries`: cu_seqlens and max_seqlen too,
        and None when every row is one document."""
        if not boundaries:
            return cls(seq_idx=seq_idx.to(device))
        starts = document_starts(seq_idx).cpu()  # the one host sync of a packed forward
        if one_document_per_row(starts):
            return None
        flat_starts = starts.flatten()
        cu = cu_seqlens_of(flat_starts)
        max_seqlen = int(torch.diff(cu).max())
        return cls(
            seq_idx=seq_idx.to(device=device, dtype=torch.int32).contiguous(),
            cu_seqlens=cu.to(device, non_blocking=True),
            max_seqlen=max_seqlen,
        )

    def flex_block_mask(self, create_block_mask: Any) -> Any:
        """Document-causal BlockMask for FlexAttention (built once per layout, shared by layers)."""
        if self.block_mask is None:
            doc = self.seq_idx
            b, l = doc.shape

            def document_causal(bi: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
                return (q >= kv) & (doc[bi, q] == doc[bi, kv])

            self.block_mask = create_block_mask(document_causal, B=b, H=None, Q_LEN=l, KV_LEN=l, device=doc.device)
        return self.block_mask
