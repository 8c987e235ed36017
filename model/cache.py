"""Decoding state of a hybrid model.

- Mamba2 layers keep a fixed-size state, independent of context length:
    conv: (b, conv_dim, d_conv)  the last d_conv inputs of the depthwise conv (x, B, C channels)
    ssm:  (b, n_heads, headdim, d_state)  the SSM state, float32
- Attention layers keep a KV cache that grows with the context:
    k, v: (b, n_kv_heads, capacity, head_dim), of which the first `length` positions are filled.
    Capacity doubles when full, so appending is amortised O(1) and no step copies the whole cache.
- `key_valid` (b, length) marks real (non left-padding) positions; None when no row is padded.
- `next_pos` (b,) is the RoPE position of each row's next token (rows may have different prompt
  lengths under left padding).

Static form (`HybridCache.make_static(capacity)`, after a prefill): every KV buffer is allocated to a
fixed capacity, the number of filled columns lives in a device tensor (`filled`) and `key_valid`
covers all capacity columns, so a decode step has fixed shapes and no host-side state: it can be
captured once in a CUDA graph and replayed per token (model/decode_graph.py). Each step writes its
keys at column `filled` and attends over all columns with the mask `key_valid & (column <= filled)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from model.mixers.base import LayerState


@dataclass
class MambaState:
    conv: torch.Tensor
    ssm: torch.Tensor
    filled: bool = False  # False until a prefill wrote it

    def tensors(self) -> list[torch.Tensor]:
        return [self.conv, self.ssm]

    def make_static(self, capacity: int, filled: torch.Tensor) -> None:
        """Already fixed-size."""

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


@dataclass
class KVState:
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    length: int = 0
    filled: torch.Tensor | None = None  # static form: the cache's shared filled-column count (0-d long)

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (b, kv, l, k) keys/values; return views of everything cached so far (static form:
        the whole fixed-capacity buffers, written at columns filled .. filled + l - 1)."""
        l_new = k_new.size(2)
        if self.filled is not None:
            cols = self.filled + torch.arange(l_new, device=k_new.device)
            self.k.index_copy_(2, cols, k_new)
            self.v.index_copy_(2, cols, v_new)
            return self.k, self.v
        need = self.length + l_new
        if self.k is None or need > self.k.size(2):
            cap = max(need, 2 * (self.k.size(2) if self.k is not None else 0), 16)
            shape = (*k_new.shape[:2], cap, k_new.size(3))
            k_buf = k_new.new_empty(shape)
            v_buf = v_new.new_empty(shape)
            if self.k is not None:
                k_buf[:, :, : self.length] = self.k[:, :, : self.length]
                v_buf[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = k_buf, v_buf
        self.k[:, :, self.length : need] = k_new
        self.v[:, :, self.length : need] = v_new
        self.length = need
        return self.k[:, :, :need], self.v[:, :, :need]

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v]

    def make_static(self, capacity: int, filled: torch.Tensor) -> None:
        """Grow the buffers to `capacity` columns (the first `length` kept) sharing the cache's `filled`."""
        length = self.length
        if capacity < length:
            raise ValueError(f"capacity {capacity} is below the {length} positions already cached")
        shape = (*self.k.shape[:2], capacity, self.k.size(3))
        k, v = self.k.new_zeros(shape), self.v.new_zeros(shape)
        k[:, :, :length], v[:, :, :length] = self.k[:, :, :length], self.v[:, :, :length]
        self.k, self.v, self.length, self.filled = k, v, capacity, filled

    def nbytes(self) -> int:
        if self.k is None:
            return 0
        per_pos = self.k.size(0) * self.k.size(1) * self.k.size(3) * self.k.element_size()
        return 2 * per_pos * self.length


@dataclass
class HybridCache:
    layers: list["LayerState"]
    next_pos: torch.Tensor
    key_valid: torch.Tensor | None = None
    seen: int = 0  # tokens consumed per row (padding included)
    filled: torch.Tensor | None = None  # static form only: filled KV columns, 0-d long on the device

    def make_static(self, capacity: int) -> None:
        """Turn a prefilled cache into its static form with room for `capacity` positions in all."""
        if capacity < self.seen:
            raise ValueError(f"capacity {capacity} is below the {self.seen} positions already cached")
        device = self.next_pos.device
        self.filled = torch.tensor(self.seen, device=device)
        valid = torch.ones(self.next_pos.size(0), capacity, dtype=torch.bool, device=device)
        if self.key_valid is not None:
            valid[:, : self.seen] = self.key_valid
        self.key_valid = valid
        for st in self.layers:
            st.make_static(capacity, self.filled)

    def attention_keys(self, l_new: int) -> torch.Tensor | None:
        """(b, t) mask of the keys that l_new new tokens may see (their own included): key_valid,
        and in the static form only the columns filled after this step."""
        if self.filled is None or self.key_valid is None:
            return self.key_valid
        if l_new != 1:
            raise ValueError("a static cache decodes one token per step; prefill with the dynamic cache")
        cols = torch.arange(self.key_valid.size(1), device=self.key_valid.device)
        return self.key_valid & (cols < self.filled + l_new)

    def memory_bytes(self) -> int:
        """Bytes held by all layer states (KV counted at its filled length)."""
        return sum(st.nbytes() for st in self.layers)

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a decode step writes in place."""
        out = [self.next_pos] + ([self.filled] if self.filled is not None else [])
        for st in self.layers:
            out += st.tensors()
        return out
