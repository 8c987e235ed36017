"""The SSD backward's C.B gradient with the intra-chunk decay gradient in the same kernel.

Inside a chunk, the scan's output is y_t = sum_{s <= t} CB[t, s] exp(a_t - a_s) dt_s x_s (a: the
chunk's cumulative dA = dt A), and the backward needs two quantities built from the same per-head
products G_h[t, s] = (dout_t . x_s) dt_s exp(a_t - a_s) for s <= t:
- dCB[t, s] = sum_h G_h[t, s] (C.B is shared by the heads of a group), and
- the gradient of each position's dA, ddA_i = sum over pairs t >= i > s of CB[t, s] G_h[t, s].

mamba_ssm (2.3) computes them in two kernels that both form G_h with a GEMM over the head dimension:
`_chunk_scan_bwd_dcb` and `_chunk_scan_bwd_ddAcs_stable`. This kernel is mamba_ssm's
`_chunk_scan_bwd_dcb_kernel` (Apache-2.0; the same tiles over (t, s) and loop over the heads of a program)
with the second quantity added to its head loop, so G_h is formed once. Its tiles are independent, so it
does not carry the pair sums along s as the stable kernel does: each tile writes, per head, the row sums
R_t = sum_{s < t} CB G_h[t, s] and the column sums K_s = sum_{t > s} CB G_h[t, s] of its part, and
ddA_i = sum_{t >= i} (R_t - K_t) (the pairs with both ends >= i cancel). All sums are float32 over the
float32 G_h the stable kernel sums too. (mamba_ssm's own fused variant, `HAS_DDA_CS` in the dcb kernel,
sums along s within one tile only and refuses document boundaries; its third form,
`_chunk_scan_bwd_ddAcs_unstable`, takes dout . y - dt ddt from the bf16 output and is, as its comment
says, not numerically stable.)

Its sums are float32 like mamba_ssm's, so its errors against float64 are of float32's order, far below
what the bf16 inputs leave in the mixer's gradients (tests/model/test_kernels_interpreted.py checks it
against a reference; its time against mamba_ssm's two kernels: see docs/performance.md).

Document boundaries: C.B from `_bmm_chunk_fwd(..., seq_idx)` is zero between documents, so G_h . CB
is too. Deterministic: every tile writes its own slots of the sums workspace, no atomic adds.

Imports Triton at load: import it only where the kernels are (model.ssd_saved).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# One tile config, no autotuning (the fastest of the configs compared, see docs/performance.md): 64 x 64
# tiles, 4 warps, 3 stages. A fixed tile also fixes the workspaces' slot counts, and a run's kernels do not
# depend on an autotuner's timing-based pick.
BLOCK = 64
WARPS, STAGES = 4, 3


@triton.jit
def _cb_grad_kernel(
    x_ptr, dout_ptr, cb_ptr, dt_ptr, dA_cumsum_ptr, seq_idx_ptr,
    dcb_ptr, rows_ptr, cols_ptr,
    chunk_size, hdim,
    batch, seqlen, nheads, nheads_per_program, ngroups,
    stride_x_batch, stride_x_seqlen, stride_x_head, stride_x_hdim,
    stride_dout_batch, stride_dout_seqlen, stride_dout_head, stride_dout_hdim,
    stride_cb_batch, stride_cb_chunk, stride_cb_group, stride_cb_csize_m, stride_cb_csize_n,
    stride_dt_batch, stride_dt_chunk, stride_dt_head, stride_dt_csize,
    stride_dA_cs_batch, stride_dA_cs_chunk, stride_dA_cs_head, stride_dA_cs_csize,
    stride_seq_idx_batch, stride_seq_idx_seqlen,
    stride_dcb_batch, stride_dcb_chunk, stride_dcb_split, stride_dcb_group, stride_dcb_csize_m, stride_dcb_csize_n,
    stride_ws_batch, stride_ws_chunk, stride_ws_head, stride_ws_slot, stride_ws_csize,
    HAS_SEQ_IDX: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
):
    pid_bc = tl.program_id(axis=1)
    pid_c = pid_bc // batch
    pid_b = pid_bc - pid_c * batch
    pid_sg = tl.program_id(axis=2)
    pid_s = pid_sg // ngroups
    pid_g = pid_sg - pid_s * ngroups
    num_pid_n = tl.cdiv(chunk_size, BLOCK_SIZE_N)
    pid_m = tl.program_id(axis=0) // num_pid_n
    pid_n = tl.program_id(axis=0) % num_pid_n
    head0 = pid_g * (nheads // ngroups) + pid_s * nheads_per_program

    x_ptr += pid_b * stride_x_batch + pid_c * chunk_size * stride_x_seqlen + head0 * stride_x_head
    dout_ptr += pid_b * stride_dout_batch + pid_c * chunk_size * stride_dout_seqlen + head0 * stride_dout_head
    dt_ptr += pid_b * stride_dt_batch + pid_c * stride_dt_chunk + head0 * stride_dt_head
    dA_cumsum_ptr += pid_b * stride_dA_cs_batch + pid_c * stride_dA_cs_chunk + head0 * stride_dA_cs_head
    cb_ptr += pid_b * stride_cb_batch + pid_c * stride_cb_chunk + pid_g * stride_cb_group
    ws_offset = pid_b * stride_ws_batch + pid_c * stride_ws_chunk + head0 * stride_ws_head
    rows_ptr += ws_offset + pid_n * stride_ws_slot  # row sums of this tile: slot = its s-block
    cols_ptr += ws_offset + pid_m * stride_ws_slot  # minus its column sums: slot = its t-block
    if HAS_SEQ_IDX:
        seq_idx_ptr += pid_b * stride_seq_idx_batch + pid_c * chunk_size * stride_seq_idx_seqlen

    offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    dout_ptrs = dout_ptr + (offs_m[:, None] * stride_dout_seqlen + offs_k[None, :] * stride_dout_hdim)
    x_ptrs = x_ptr + (offs_n[None, :] * stride_x_seqlen + offs_k[:, None] * stride_x_hdim)
    dt_ptrs = dt_ptr + offs_n * stride_dt_csize
    nheads_iter = min(nheads_per_program, nheads // ngroups - pid_s * nheads_per_program)

    if pid_n * BLOCK_SIZE_N >= (pid_m + 1) * BLOCK_SIZE_M:  # above the diagonal: zeros
        dcb_ptr += (pid_b * stride_dcb_batch + pid_c * stride_dcb_chunk + pid_g * stride_dcb_group
                    + pid_s * stride_dcb_split)
        dcb_ptrs = dcb_ptr + (offs_m[:, None] * stride_dcb_csize_m + offs_n[None, :] * stride_dcb_csize_n)
        tl.store(dcb_ptrs, tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=dcb_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < chunk_size) & (offs_n[None, :] < chunk_size))
        for h in range(nheads_iter):
            tl.store(rows_ptr + h * stride_ws_head + offs_m * stride_ws_csize, tl.zeros((BLOCK_SIZE_M,), tl.float32),
                     mask=offs_m < chunk_size)
            tl.store(cols_ptr + h * stride_ws_head + offs_n * stride_ws_csize, tl.zeros((BLOCK_SIZE_N,), tl.float32),
                     mask=offs_n < chunk_size)
        return

    chunk_size_limit = min(chunk_size, seqlen - pid_c * chunk_size)
    chunk_size_limit_n = min(chunk_size_limit, (pid_m + 1) * BLOCK_SIZE_M)
    cb = tl.load(cb_ptr + (offs_m[:, None] * stride_cb_csize_m + offs_n[None, :] * stride_cb_csize_n),
                 mask=(offs_m[:, None] < chunk_size) & (offs_n[None, :] < chunk_size), other=0.0).to(tl.float32)
    below = offs_m[:, None] > offs_n[None, :]  # pairs s < t (the diagonal would cancel)
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for h in range(nheads_iter):
        dout = tl.load(dout_ptrs, mask=(offs_m[:, None] < chunk_size_limit) & (offs_k[None, :] < hdim), other=0.0)
        x = tl.load(x_ptrs, mask=(offs_k[:, None] < hdim) & (offs_n[None, :] < chunk_size_limit_n), other=0.0)
        dcb = tl.dot(dout, x)
        dt_n = tl.load(dt_ptrs, mask=offs_n < chunk_size, other=0.0).to(tl.float32)
        dcb *= dt_n
        dA_cs_m = tl.load(dA_cumsum_ptr + offs_m * stride_dA_cs_csize, mask=offs_m < chunk_size_limit,
                          other=0.0).to(tl.float32)
        dA_cs_n = tl.load(dA_cumsum_ptr + offs_n * stride_dA_cs_csize, mask=offs_n < chunk_size_limit,
                          other=0.0).to(tl.float32)
        dcb *= tl.exp(tl.minimum((dA_cs_m[:, None] - dA_cs_n[None, :]), 0.0))
        pair = tl.where(below, dcb * cb, 0.0)
        tl.store(rows_ptr + offs_m * stride_ws_csize, tl.sum(pair, axis=1), mask=offs_m < chunk_size)
        tl.store(cols_ptr + offs_n * stride_ws_csize, -tl.sum(pair, axis=0), mask=offs_n < chunk_size)
        acc += dcb
        dout_ptrs += stride_dout_head
        x_ptrs += stride_x_head
        dt_ptrs += stride_dt_head
        dA_cumsum_ptr += stride_dA_cs_head
        rows_ptr += stride_ws_head
        cols_ptr += stride_ws_head
    if HAS_SEQ_IDX:
        seq_idx_m = tl.load(seq_idx_ptr + offs_m * stride_seq_idx_seqlen, mask=offs_m < chunk_size_limit, other=-1)
        seq_idx_n = tl.load(seq_idx_ptr + offs_n * stride_seq_idx_seqlen, mask=offs_n < chunk_size_limit, other=-2)
        acc = tl.where(seq_idx_m[:, None] == seq_idx_n[None, :], acc, 0.0)
    acc = tl.where(offs_m[:, None] >= offs_n[None, :], acc, 0.0)
    dcb_ptr += pid_b * stride_dcb_batch + pid_c * stride_dcb_chunk + pid_g * stride_dcb_group + pid_s * stride_dcb_split
    dcb_ptrs = dcb_ptr + (offs_m[:, None] * stride_dcb_csize_m + offs_n[None, :] * stride_dcb_csize_n)
    tl.store(dcb_ptrs, acc, mask=(offs_m[:, None] < chunk_size) & (offs_n[None, :] < chunk_size))


def cb_and_decay_grads(x: torch.Tensor, dt: torch.Tensor, dA_cumsum: torch.Tensor, dout: torch.Tensor,
                       CB: torch.Tensor, seq_idx: torch.Tensor | None = None,
                       ngroups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x, dout (b, l, h, p); dt, dA_cumsum (b, h, c, chunk) float32; CB (b, c, g, chunk, chunk) from
    `_bmm_chunk_fwd(C, B, chunk, seq_idx)` -> (dCB (b, c, g, chunk, chunk) float32, ddA (b, h, c, chunk)
    float32): what `_chunk_scan_bwd_dcb(..., seq_idx, ngroups=g)` and `_chunk_scan_bwd_ddAcs_stable(x,
    dt, dA_cumsum, dout, CB)` return, in one kernel."""
    batch, seqlen, nheads, headdim = x.shape
    _, _, nchunks, chunk_size = dt.shape
    assert dt.shape == dA_cumsum.shape == (batch, nheads, nchunks, chunk_size)
    assert dout.shape == x.shape and CB.shape == (batch, nchunks, ngroups, chunk_size, chunk_size)
    if seq_idx is not None:
        assert seq_idx.shape == (batch, seqlen)
    heads_per_group = nheads // ngroups
    sm_count = torch.cuda.get_device_properties(x.device).multi_processor_count
    nheads_per_program = max(min(triton.cdiv(batch * nchunks * nheads, sm_count), heads_per_group), 1)
    nsplits = triton.cdiv(heads_per_group, nheads_per_program)
    dcb = torch.empty(batch, nchunks, nsplits, ngroups, chunk_size, chunk_size, device=x.device, dtype=torch.float32)
    slots = triton.cdiv(chunk_size, BLOCK)
    sums = torch.empty(batch, nheads, nchunks, 2 * slots, chunk_size, device=x.device, dtype=torch.float32)
    rows, cols = sums[:, :, :, :slots], sums[:, :, :, slots:]  # R_t and -K_t per tile
    ws_strides = (rows.stride(0), rows.stride(2), rows.stride(1), rows.stride(3), rows.stride(4))
    grid = (slots * slots, batch * nchunks, nsplits * ngroups)
    with torch.cuda.device(x.device.index):
        _cb_grad_kernel[grid](
            x, dout, CB, dt, dA_cumsum, seq_idx, dcb, rows, cols,
            chunk_size, headdim, batch, seqlen, nheads, nheads_per_program, ngroups,
            *x.stride(), *dout.stride(), *CB.stride(),
            dt.stride(0), dt.stride(2), dt.stride(1), dt.stride(3),
            dA_cumsum.stride(0), dA_cumsum.stride(2), dA_cumsum.stride(1), dA_cumsum.stride(3),
            *((seq_idx.stride(0), seq_idx.stride(1)) if seq_idx is not None else (0, 0)),
            *dcb.stride(), *ws_strides,
            HAS_SEQ_IDX=seq_idx is not None,
            BLOCK_SIZE_M=BLOCK, BLOCK_SIZE_N=BLOCK, BLOCK_SIZE_K=max(triton.next_power_of_2(headdim), 16),
            num_warps=WARPS, num_stages=STAGES,
        )
    d = sums.sum(3)  # (b, h, c, chunk): R_t - K_t
    # sum_{t >= i} d_t = -sum_{t < i} d_t: the chunk's d sums to 0 (each pair is in one R and one K), and the
    # prefix form starts from an exact 0 at the chunk's first position (no pair ends before it)
    return dcb.sum(2), d - d.cumsum(-1)
