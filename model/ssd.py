"""Pure-PyTorch state-space duality (SSD) scan: the reference path of the Mamba2 mixer.

Shape legend: b batch, l sequence, c chunks, q/s positions inside a chunk, h SSM heads, p head
channels, g groups of B/C, n state size.

The discretised recurrence per head (dt > 0, A < 0):
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T        h: (p, n)
    y_t = h_t C_t + D x_t
`ssd_chunked` evaluates it in chunks of Q tokens (parallel inside a chunk, states passed between
chunks) exactly as the Mamba2 paper's `ssd_minimal_discrete`, extended with
  - `seq_idx` (b, l): packed documents; the state never crosses a change of seq_idx,
  - `initial_state` / returned final state for incremental decoding,
  - grouped B/C (n_groups divides n_heads).
No Python loop runs over tokens; the loop-free form is what torch.onnx exports. `ssd_naive` is the
token-by-token recurrence used as the float64 reference in the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segsum(x: torch.Tensor) -> torch.Tensor:
    """Stable segment sums: out[..., i, j] = sum(x[..., j+1 : i+1]) for i >= j, -inf above.

    x: (..., T) -> (..., T, T). Built by masked cumsum (no differences of large cumsums).
    """
    t = x.size(-1)
    x = x.unsqueeze(-1).expand(*x.shape, t)  # (..., T, T): x[..., i, j] = x[i]
    strict = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~strict, 0.0)
    out = torch.cumsum(x, dim=-2)
    keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=0)
    return out.masked_fill(~keep, float("-inf"))


def discretize_dt(
    dt: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float] = (0.0, float("inf"))
) -> torch.Tensor:
    """softplus(dt + dt_bias), clamped to dt_limit, computed in float32 or wider. dt: (b, l, h)."""
    dtype = torch.promote_types(dt.dtype, torch.float32)
    dt = F.softplus(dt.to(dtype) + dt_bias.to(dtype))
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _expand_groups(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(b, l, g, n) -> (b, l, h, n): each group serves n_heads // g consecutive heads."""
    return t.repeat_interleave(n_heads // t.size(2), dim=2)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan.

    Args:
        x: (b, l, h, p) inputs; dt: (b, l, h) discretised step (already softplus'ed);
        A: (h,) negative decay rates; B, C: (b, l, g, n); D: (h,) skip;
        initial_state: (b, h, p, n) state before position 0 (belongs to seq_idx[:, 0]);
        seq_idx: (b, l) int, non-decreasing per row: document index of each token.
    Returns:
        y: (b, l, h, p) in x's dtype, final_state: (b, h, p, n) float32 (or float64) state after
        the last token (of the last document when seq_idx is given).
    """
    b, l, h, p = x.shape
    out_dtype = x.dtype
    work = torch.promote_types(x.dtype, torch.float32)
    x, dt, A = x.to(work), dt.to(work), A.to(work)
    B, C = _expand_groups(B.to(work), h), _expand_groups(C.to(work), h)
    pad = (-l) % chunk_size
    if pad:  # zero dt and x: padded positions neither decay nor feed the state
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
        if seq_idx is not None:  # padded positions join the last document
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
    nc = (l + pad) // chunk_size
    q = chunk_size

    X = (x * dt.unsqueeze(-1)).view(b, nc, q, h, p)  # (b, c, q, h, p)
    A_dt = (dt * A).view(b, nc, q, h).permute(0, 3, 1, 2)  # (b, h, c, q)
    Bc, Cc = B.view(b, nc, q, h, -1), C.view(b, nc, q, h, -1)  # (b, c, q, h, n)
    A_cum = torch.cumsum(A_dt, dim=-1)  # (b, h, c, q)

    same_doc = chunk_doc = None
    if seq_idx is not None:
        sid = seq_idx.view(b, nc, q)
        same_doc = sid.unsqueeze(-1) == sid.unsqueeze(-2)  # (b, c, q, s)
        chunk_doc = sid

    # 1. Intra-chunk (diagonal blocks): y_q = sum_{s<=q} C_q . B_s exp(A_cum_q - A_cum_s) X_s
    L = torch.exp(segsum(A_dt))  # (b, h, c, q, s)
    if same_doc is not None:
        L = L * same_doc.unsqueeze(1)
    Y_diag = torch.einsum("bcqhn,bcshn,bhcqs,bcshp->bcqhp", Cc, Bc, L, X)

    # 2. State at the end of every chunk from that chunk's own inputs.
    decay_to_end = torch.exp(A_cum[..., -1:] - A_cum)  # (b, h, c, q)
    if chunk_doc is not None:
        decay_to_end = decay_to_end * (chunk_doc == chunk_doc[..., -1:]).unsqueeze(1)
    states = torch.einsum("bcqhn,bhcq,bcqhp->bchpn", Bc, decay_to_end, X)  # (b, c, h, p, n)

    # 3. Pass states between chunks: new_states[z] = state entering chunk z (z = nc: final).
    if initial_state is None:
        initial_state = torch.zeros(b, h, p, states.size(-1), dtype=work, device=x.device)
    states = torch.cat([initial_state.to(work).unsqueeze(1), states], dim=1)  # (b, c+1, h, p, n)
    decay_chunk = torch.exp(segsum(F.pad(A_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    if chunk_doc is not None:
        src_doc = torch.cat([chunk_doc[:, :1, 0], chunk_doc[..., -1]], dim=1)  # (b, c+1) doc of each state
        dst_doc = torch.cat([chunk_doc[..., 0], chunk_doc[:, -1:, -1]], dim=1)  # (b, c+1) doc it enters
        decay_chunk = decay_chunk * (dst_doc.unsqueeze(-1) == src_doc.unsqueeze(-2)).unsqueeze(1)
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]  # (b, c, h, p, n), (b, h, p, n)

    # 4. Contribution of the entering state to every position of the chunk.
    state_decay = torch.exp(A_cum)  # (b, h, c, q)
    if chunk_doc is not None:
        state_decay = state_decay * (chunk_doc == chunk_doc[..., :1]).unsqueeze(1)
    Y_off = torch.einsum("bcqhn,bchpn,bhcq->bcqhp", Cc, states, state_decay)

    y = (Y_diag + Y_off).reshape(b, nc * q, h, p)[:, :l]
    if D is not None:
        y = y + x[:, :l] * D.to(work).view(1, 1, h, 1)
    return y.to(out_dtype), final_state


def ssd_naive(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence (test reference). Same arguments and returns as `ssd_chunked`."""
    b, l, h, p = x.shape
    Bh, Ch = _expand_groups(B, h), _expand_groups(C, h)
    state = (
        initial_state.clone()
        if initial_state is not None
        else torch.zeros(b, h, p, B.size(-1), dtype=x.dtype, device=x.device)
    )
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            reset = (seq_idx[:, t] != seq_idx[:, t - 1]).view(b, 1, 1, 1)
            state = torch.where(reset, torch.zeros_like(state), state)
        dA = torch.exp(dt[:, t] * A)  # (b, h)
        dBx = torch.einsum("bh,bhn,bhp->bhpn", dt[:, t], Bh[:, t], x[:, t])
        state = state * dA[..., None, None] + dBx
        y = torch.einsum("bhpn,bhn->bhp", state, Ch[:, t])
        if D is not None:
            y = y + D.view(1, h, 1) * x[:, t]
        ys.append(y)
    return torch.stack(ys, dim=1), state


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step, O(1) in context length.

    state: (b, h, p, n); x: (b, h, p); dt: (b, h) discretised; B, C: (b, g, n).
    Returns y: (b, h, p) in x's dtype and the new state (state's dtype).
    """
    h = x.size(1)
    work = state.dtype
    Bh = B.to(work).repeat_interleave(h // B.size(1), dim=1)  # (b, h, n)
    Ch = C.to(work).repeat_interleave(h // C.size(1), dim=1)
    dt, xw = dt.to(work), x.to(work)
    dA = torch.exp(dt * A.to(work))  # (b, h)
    state = state * dA[..., None, None] + torch.einsum("bh,bhn,bhp->bhpn", dt, Bh, xw)
    y = torch.einsum("bhpn,bhn->bhp", state, Ch)
    if D is not None:
        y = y + D.to(work).view(1, h, 1) * xw
    return y.to(x.dtype), state
