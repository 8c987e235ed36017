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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MambaState:
    conv: torch.Tensor
    ssm: torch.Tensor
    filled: bool = False  # False until a prefill wrote it


@dataclass
class KVState:
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    length: int = 0

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (b, kv, l, k) keys/values; return views of everything cached so far."""
        l_new = k_new.size(2)
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


@dataclass
class HybridCache:
    layers: list[MambaState | KVState]
    next_pos: torch.Tensor
    key_valid: torch.Tensor | None = None
    seen: int = 0  # tokens consumed per row (padding included)

    def memory_bytes(self) -> int:
        """Bytes held by all layer states (KV counted at its filled length)."""
        total = 0
        for st in self.layers:
            if isinstance(st, MambaState):
                total += st.conv.numel() * st.conv.element_size() + st.ssm.numel() * st.ssm.element_size()
            elif st.k is not None:
                per_pos = st.k.size(0) * st.k.size(1) * st.k.size(3) * st.k.element_size()
                total += 2 * per_pos * st.length
        return total
