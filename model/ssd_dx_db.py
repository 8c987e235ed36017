"""The SSD backward's gradients of x, dt, D and B, with the decay gradient through the chunk states, in one kernel.

Per chunk and head, with a the chunk's cumulative dA = dt A, the states' gradient dS (p x n, after the
passing across chunks) and scale_s = exp(a_last - a_s) (0 for a position in an earlier document than the
chunk's end):
- the state part of the x gradient, S_s = scale_s B_s . dS (p),
- the intra-chunk part, I_s = sum_{t >= s} CB[t, s] exp(a_t - a_s) dout_t,
- dx_s = (S_s + I_s) dt_s + D dout_s, ddt_s = (S_s + I_s) . x_s, dD = sum_s dout_s . x_s,
- dB_s = sum_h scale_s dt_s x_s dS (n), summed over the heads of B's group,
- the decay gradient through the state, d_s = dt_s S_s . x_s, which enters dA's gradient as the
  exclusive prefix sum sum_{i < s} d_i (what `_chunk_state_bwd_db` computes as sum_n dB_s B_s per head).

mamba_ssm (2.3) runs two kernels that both read x and dS: `_chunk_scan_chunk_state_bwd_dx` (a program per
head and row block) and `_chunk_state_bwd_db` (a program per row block and dstate block, looping over a
share of the group's heads). This kernel is the first with the second's head loop: a program takes a row
block of a chunk and loops over `HEADS` heads of one group, loading B's rows once, forming S with one GEMM
per head, and adding the head's x^T dS product to the program's dB rows; the decay gradient through the
state is a row sum of S x there, no second GEMM with B. Every output element has one writer: no atomic adds,
no zeroed workspaces (mamba_ssm's dx kernel adds ddt and dD with atomics outside its deterministic mode).
Document boundaries follow mamba_ssm's kernels (scale and C.B are zero across them).

Imports Triton at load: import it only where the kernels are (model.ssd_saved).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# One config, no autotuning: row blocks of BLOCK_M positions, the intra-chunk sum in steps of BLOCK_K positions,
# HEADS heads per program, WARPS warps, STAGES pipeline stages. A fixed config also fixes the workspaces'
# shapes. bench/ssd_dx_db.py --tiles times others.
BLOCK_M, BLOCK_K, HEADS = 64, 32, 8
WARPS, STAGES = 4, 2


@triton.jit
def _dx_db_kernel(
    x_ptr, cb_ptr, dout_ptr, dt_ptr, dA_cumsum_ptr, seq_idx_ptr, D_ptr, b_ptr, dstates_ptr,
    dx_ptr, ddt_ptr, dD_ptr, db_ptr, ddA_ptr,
    chunk_size, hdim, dstate,
    batch, seqlen, nheads, nheads_per_program, ngroups,
    stride_x_batch, stride_x_seqlen, stride_x_head, stride_x_hdim,
    stride_cb_batch, stride_cb_chunk, stride_cb_group, stride_cb_csize_t, stride_cb_csize_s,
    stride_dout_batch, stride_dout_seqlen, stride_dout_head, stride_dout_hdim,
    stride_dt_batch, stride_dt_chunk, stride_dt_head, stride_dt_csize,
    stride_seq_idx_batch, stride_seq_idx_seqlen,
    stride_D_head,
    stride_b_batch, stride_b_seqlen, stride_b_group, stride_b_dstate,
    stride_dstates_batch, stride_dstates_chunk, stride_dstates_head, stride_dstates_hdim, stride_dstates_dstate,
    stride_dx_batch, stride_dx_seqlen, stride_dx_head, stride_dx_hdim,
    stride_dD_block, stride_dD_batch, stride_dD_chunk, stride_dD_head,
    stride_db_batch, stride_db_seqlen, stride_db_split, stride_db_group, stride_db_dstate,
    HAS_SEQ_IDX: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    BLOCK_SIZE_P: tl.constexpr, BLOCK_SIZE_DSTATE: tl.constexpr,
):
    pid_m = tl.program_id(axis=0)
    pid_bc = tl.program_id(axis=1)
    pid_c = pid_bc // batch
    pid_b = pid_bc - pid_c * batch
    pid_sg = tl.program_id(axis=2)
    pid_s = pid_sg // ngroups
    pid_g = pid_sg - pid_s * ngroups
    head0 = pid_g * (nheads // ngroups) + pid_s * nheads_per_program
    seq0 = pid_c * chunk_size

    # ddt, dA_cumsum and the ddA workspace share dt's layout (b, h, c, chunk) and strides
    head_offset = pid_b * stride_dt_batch + pid_c * stride_dt_chunk + head0 * stride_dt_head
    dt_ptr += head_offset
    dA_cumsum_ptr += head_offset
    ddt_ptr += head_offset
    ddA_ptr += head_offset
    x_ptr += pid_b * stride_x_batch + seq0 * stride_x_seqlen + head0 * stride_x_head
    dout_ptr += pid_b * stride_dout_batch + seq0 * stride_dout_seqlen + head0 * stride_dout_head
    dx_ptr += pid_b * stride_dx_batch + seq0 * stride_dx_seqlen + head0 * stride_dx_head
    dstates_ptr += pid_b * stride_dstates_batch + pid_c * stride_dstates_chunk + head0 * stride_dstates_head
    dD_ptr += pid_m * stride_dD_block + pid_b * stride_dD_batch + pid_c * stride_dD_chunk + head0 * stride_dD_head
    D_ptr += head0 * stride_D_head
    cb_ptr += pid_b * stride_cb_batch + pid_c * stride_cb_chunk + pid_g * stride_cb_group
    b_ptr += pid_b * stride_b_batch + seq0 * stride_b_seqlen + pid_g * stride_b_group
    db_ptr += pid_b * stride_db_batch + seq0 * stride_db_seqlen + pid_s * stride_db_split + pid_g * stride_db_group

    chunk_size_limit = min(chunk_size, seqlen - seq0)
    offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    offs_p = tl.arange(0, BLOCK_SIZE_P)
    offs_n = tl.arange(0, BLOCK_SIZE_DSTATE)
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    rows = offs_m < chunk_size_limit
    tile_mask = rows[:, None] & (offs_p[None, :] < hdim)
    x_offs = offs_m[:, None] * stride_x_seqlen + offs_p[None, :] * stride_x_hdim
    dout_offs = offs_m[:, None] * stride_dout_seqlen + offs_p[None, :] * stride_dout_hdim
    dx_offs = offs_m[:, None] * stride_dx_seqlen + offs_p[None, :] * stride_dx_hdim
    dstates_offs = offs_n[:, None] * stride_dstates_dstate + offs_p[None, :] * stride_dstates_hdim  # (n, p)
    dstates_mask = (offs_n[:, None] < dstate) & (offs_p[None, :] < hdim)

    b = tl.load(b_ptr + offs_m[:, None] * stride_b_seqlen + offs_n[None, :] * stride_b_dstate,
                mask=rows[:, None] & (offs_n[None, :] < dstate), other=0.0)
    if HAS_SEQ_IDX:
        seq_idx_ptr += pid_b * stride_seq_idx_batch + seq0 * stride_seq_idx_seqlen
        seq_idx_m = tl.load(seq_idx_ptr + offs_m * stride_seq_idx_seqlen, mask=rows, other=-1)
        seq_idx_last = tl.load(seq_idx_ptr + (chunk_size_limit - 1) * stride_seq_idx_seqlen)
    acc_db = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_DSTATE), dtype=tl.float32)
    nheads_iter = min(nheads_per_program, nheads // ngroups - pid_s * nheads_per_program)
    for h in range(nheads_iter):
        dA_cs_m = tl.load(dA_cumsum_ptr + offs_m * stride_dt_csize, mask=rows, other=0.0)
        dA_cs_last = tl.load(dA_cumsum_ptr + (chunk_size - 1) * stride_dt_csize)
        scale = tl.exp(tl.minimum(dA_cs_last - dA_cs_m, 0.0))
        if HAS_SEQ_IDX:
            scale = tl.where(seq_idx_m == seq_idx_last, scale, 0.0)
        dt_m = tl.load(dt_ptr + offs_m * stride_dt_csize, mask=rows, other=0.0)
        dstates = tl.load(dstates_ptr + dstates_offs, mask=dstates_mask, other=0.0).to(b_ptr.dtype.element_ty)
        x = tl.load(x_ptr + x_offs, mask=tile_mask, other=0.0)
        x_f = x.to(tl.float32)

        # through the chunk's final state: S (rows x p), the decay gradient's row sums, dB's share of this head
        acc = tl.dot(b, dstates) * scale[:, None]
        state_ddA = tl.sum(acc * x_f, axis=1) * dt_m  # enters position s + 1's exclusive prefix sum
        tl.store(ddA_ptr + (offs_m + 1) * stride_dt_csize, state_ddA, mask=offs_m < chunk_size - 1)
        if pid_m == 0:
            tl.store(ddA_ptr, 0.0)
        acc_db += tl.dot(x, tl.trans(dstates)) * (scale * dt_m)[:, None]

        # within the chunk: I_s = sum_{t >= s} CB[t, s] exp(a_t - a_s) dout_t (mamba_ssm's dx kernel loop)
        for k in range(pid_m * BLOCK_SIZE_M, chunk_size_limit, BLOCK_SIZE_K):
            k = tl.multiple_of(k, BLOCK_SIZE_K)
            offs_t = k + offs_k
            cb = tl.load(cb_ptr + offs_m[:, None] * stride_cb_csize_s + offs_t[None, :] * stride_cb_csize_t,
                         mask=(offs_m[:, None] < chunk_size) & (offs_t[None, :] < chunk_size_limit), other=0.0)
            dout_t = tl.load(dout_ptr + offs_t[:, None] * stride_dout_seqlen + offs_p[None, :] * stride_dout_hdim,
                             mask=(offs_t[:, None] < chunk_size_limit) & (offs_p[None, :] < hdim), other=0.0)
            dA_cs_t = tl.load(dA_cumsum_ptr + offs_t * stride_dt_csize, mask=offs_t < chunk_size_limit, other=0.0)
            cb *= tl.exp(tl.minimum(dA_cs_t[None, :] - dA_cs_m[:, None], 0.0))
            # masked to 0 before the cast: outside the range exp may overflow where C.B is 0 (NaN in the dot)
            cb = tl.where((offs_t[None, :] >= offs_m[:, None]) & (offs_t[None, :] < chunk_size_limit), cb, 0.0)
            acc += tl.dot(cb.to(dout_ptr.dtype.element_ty), dout_t)

        dout_m = tl.load(dout_ptr + dout_offs, mask=tile_mask, other=0.0).to(tl.float32)
        D = tl.load(D_ptr).to(tl.float32)
        tl.store(dx_ptr + dx_offs, acc * dt_m[:, None] + dout_m * D, mask=tile_mask)
        tl.store(ddt_ptr + offs_m * stride_dt_csize, tl.sum(acc * x_f, axis=1), mask=offs_m < chunk_size)
        tl.store(dD_ptr, tl.sum(dout_m * x_f))

        dt_ptr += stride_dt_head
        dA_cumsum_ptr += stride_dt_head
        ddt_ptr += stride_dt_head
        ddA_ptr += stride_dt_head
        x_ptr += stride_x_head
        dout_ptr += stride_dout_head
        dx_ptr += stride_dx_head
        dstates_ptr += stride_dstates_head
        dD_ptr += stride_dD_head
        D_ptr += stride_D_head
    tl.store(db_ptr + offs_m[:, None] * stride_db_seqlen + offs_n[None, :] * stride_db_dstate, acc_db,
             mask=rows[:, None] & (offs_n[None, :] < dstate))


def x_and_b_grads(x: torch.Tensor, dt: torch.Tensor, dA_cumsum: torch.Tensor, B: torch.Tensor, CB: torch.Tensor,
                  dout: torch.Tensor, dstates: torch.Tensor, D: torch.Tensor, seq_idx: torch.Tensor | None = None,
                  dx: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """x, dout (b, l, h, p); dt, dA_cumsum (b, h, c, chunk) float32; B (b, l, g, n); CB (b, c, g, chunk,
    chunk) float32; dstates (b, c, h, p, n), the states' gradients after the passing; D (h,); dx: an output
    buffer like x, or None -> (dx like x, ddt (b, h, c, chunk) float32, dD like D, dB (b, l, g, n) float32,
    ddA (b, h, c, chunk) float32): what `_chunk_scan_chunk_state_bwd_dx(x, dt, dA_cumsum, B, CB, dout,
    dstates, D, seq_idx, dx)` and `_chunk_state_bwd_db(x, dt, dA_cumsum, dstates, seq_idx, B, g)` return."""
    batch, seqlen, nheads, headdim = x.shape
    _, _, nchunks, chunk_size = dt.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    assert nheads % ngroups == 0 and dt.shape == dA_cumsum.shape == (batch, nheads, nchunks, chunk_size)
    assert dt.stride() == dA_cumsum.stride(), "dt and dA_cumsum come from one _chunk_cumsum_fwd"
    assert B.shape == (batch, seqlen, ngroups, dstate) and dout.shape == x.shape
    assert CB.shape == (batch, nchunks, ngroups, chunk_size, chunk_size)
    assert dstates.shape == (batch, nchunks, nheads, headdim, dstate) and D.shape == (nheads,)
    if seq_idx is not None:
        assert seq_idx.shape == (batch, seqlen)
    if dx is None:
        dx = torch.empty_like(x)
    assert dx.shape == x.shape
    heads_per_group = nheads // ngroups
    heads = min(HEADS, heads_per_group)
    nsplits = triton.cdiv(heads_per_group, heads)
    mblocks = triton.cdiv(chunk_size, BLOCK_M)
    ddt = torch.empty_like(dt)
    ddA = torch.empty_like(dt)
    dD = torch.empty(mblocks, batch, nchunks, nheads, device=x.device, dtype=torch.float32)
    dB = torch.empty(batch, seqlen, nsplits, ngroups, dstate, device=x.device, dtype=torch.float32)
    grid = (mblocks, batch * nchunks, nsplits * ngroups)
    with torch.cuda.device(x.device.index):
        _dx_db_kernel[grid](
            x, CB, dout, dt, dA_cumsum, seq_idx, D, B, dstates, dx, ddt, dD, dB, ddA,
            chunk_size, headdim, dstate, batch, seqlen, nheads, heads, ngroups,
            *x.stride(), *CB.stride(), *dout.stride(),
            dt.stride(0), dt.stride(2), dt.stride(1), dt.stride(3),
            *((seq_idx.stride(0), seq_idx.stride(1)) if seq_idx is not None else (0, 0)),
            D.stride(0), *B.stride(), *dstates.stride(), *dx.stride(), *dD.stride(), *dB.stride(),
            HAS_SEQ_IDX=seq_idx is not None,
            BLOCK_SIZE_M=BLOCK_M, BLOCK_SIZE_K=BLOCK_K,
            BLOCK_SIZE_P=max(triton.next_power_of_2(headdim), 16),
            BLOCK_SIZE_DSTATE=max(triton.next_power_of_2(dstate), 16),
            num_warps=WARPS, num_stages=STAGES,
        )
    return dx, ddt, dD.sum(dim=(0, 1, 2)).to(D.dtype), dB.sum(2), ddA.cumsum(-1)
