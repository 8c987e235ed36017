"""The fused Mamba2 training step (split + conv + SSD scan + gated RMSNorm + out_proj) with the
forward's intermediates kept for the backward.

mamba_ssm's `mamba_split_conv1d_scan_combined` saves only its input and recomputes, in the backward,
the conv output, the chunked dt/decay sums, the chunk states, their passing across chunks and the C.B
products: five kernels per layer per micro-step. This function runs the same mamba_ssm
kernels in the same order on the same inputs, but keeps those five results (per token the conv
output in the activations' dtype, per chunk the float32 states and C.B, per head and token the float32
dt and decay sums). One step of its backward differs: model/ssd_cb_grad.py forms the C.B gradient and
the intra-chunk decay gradient in one kernel where mamba_ssm runs two. So
its output equals mamba_ssm's bitwise and its gradients to float32 rounding (those through dt: dt's bias,
A, in_proj, the input; tests/model/test_kernels_interpreted.py). The memory cost, per layer and token:
conv_dim values of conv output in the activations' dtype, n_heads * headdim * d_state / chunk_size
float32 of states, n_groups * chunk_size float32 of C.B and 2 * n_heads float32 of dt sums
(`model.mamba.recompute_in_backward` turns it off; activation checkpointing makes it moot).
mamba_ssm's backward also runs its state passing in float32; its forward hands the scan bf16 states,
which the scan kernel rounds to the same values. Its time against mamba_ssm's: see docs/performance.md.

It mirrors `MambaSplitConv1dScanCombinedFn` (mamba_ssm 2.3) for the configuration the model uses:
no extra SwiGLU channels (d_nonssm = 0), the gated norm applied after the gate (norm_before_gate
False), an out_proj without bias, no initial or final states (training). Decoding and prefill, which
need the states or run without gradients, keep mamba_ssm's own function.

Imports mamba_ssm (Triton) at load: import this module only where the kernels are available
(model.kernels.mamba_ops).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from mamba_ssm.ops.triton import ssd_combined as sc
from mamba_ssm.ops.triton.layernorm_gated import _layer_norm_bwd, _layer_norm_fwd

from model.ssd_cb_grad import cb_and_decay_grads
from model.wgrad import weight_grad


def _conv_fwd(xbc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              seq_idx: torch.Tensor | None) -> torch.Tensor:
    """causal_conv1d's silu conv on (b, l, c) channels-last input -> (b, l, c). Read from mamba_ssm's
    module at call time, so that a stand-in placed there (CPU tests) serves both functions."""
    xt = rearrange(sc.ensure_stride(xbc), "b s d -> b d s")
    return rearrange(sc.causal_conv1d_fwd_function(xt, weight, bias, seq_idx, None, None, True), "b d s -> b s d")


def _heads(xbc: torch.Tensor, dim: int, nheads: int, ngroups: int,
           dstate: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The conv channels (b, l, dim + 2 * g * n) as views: x (b, l, h, p), B and C (b, l, g, n)."""
    x, B, C = torch.split(xbc, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    return (rearrange(x, "b l (h p) -> b l h p", h=nheads), rearrange(B, "b l (g n) -> b l g n", g=ngroups),
            rearrange(C, "b l (g n) -> b l g n", g=ngroups))


class SplitConvScanSavedFn(torch.autograd.Function):
    """zxbcdt (b, l, e + c + h) -> out_proj(gated_rmsnorm(ssd(conv(xBC)), z)) (b, l, d_out); without an
    out_proj weight, gated_rmsnorm(...) (b, l, e), for a caller that applies its own out_proj module."""

    @staticmethod
    def forward(ctx, zxbcdt: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                dt_bias: torch.Tensor, A: torch.Tensor, D: torch.Tensor, chunk_size: int,
                seq_idx: torch.Tensor | None, dt_limit: tuple[float, float], norm_weight: torch.Tensor,
                norm_eps: float, outproj_weight: torch.Tensor | None, headdim: int, ngroups: int) -> torch.Tensor:
        nheads = D.shape[0]
        dim = nheads * headdim
        dstate = (conv_weight.shape[0] - dim) // ngroups // 2
        assert zxbcdt.shape[-1] == 2 * dim + 2 * ngroups * dstate + nheads, "extra SwiGLU channels unsupported"
        batch = zxbcdt.shape[0]
        z, xbc, dt = torch.split(zxbcdt, [dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
        seq_idx = seq_idx.contiguous() if seq_idx is not None else None
        xbc_conv = _conv_fwd(xbc, conv_weight, conv_bias, seq_idx)
        x, B, C = _heads(xbc_conv, dim, nheads, ngroups, dstate)
        # _mamba_chunk_scan_combined_fwd's body, keeping what its backward would recompute
        dA_cumsum, dt_out = sc._chunk_cumsum_fwd(dt, A, chunk_size, dt_bias=dt_bias, dt_softplus=True,
                                                 dt_limit=dt_limit)
        states = sc._chunk_state_fwd(B, x, dt_out, dA_cumsum, seq_idx=seq_idx, states_in_fp32=True)
        states, _ = sc._state_passing_fwd(rearrange(states, "... p n -> ... (p n)"), dA_cumsum[:, :, :, -1],
                                          seq_idx=seq_idx, chunk_size=chunk_size)  # float32, as the backward's
        states = rearrange(states, "... (p n) -> ... p n", n=dstate)
        CB = sc._bmm_chunk_fwd(C, B, chunk_size, seq_idx=seq_idx, output_dtype=torch.float32)
        y, _ = sc._chunk_scan_fwd(CB, x, dt_out, dA_cumsum, C, states, D=D, z=None, seq_idx=seq_idx)
        normed, _, rstd = _layer_norm_fwd(
            rearrange(y, "b s h p -> (b s) (h p)"), norm_weight.contiguous(), None, norm_eps,
            rearrange(z, "b s d -> (b s) d"), group_size=dim // ngroups, norm_before_gate=False, is_rms_norm=True,
        )
        out = rearrange(normed, "(b s) d -> b s d", b=batch)
        if outproj_weight is not None:
            out = F.linear(out, outproj_weight)
        ctx.save_for_backward(zxbcdt, conv_weight, conv_bias, xbc_conv, y, dt_out, dA_cumsum, states, CB,
                              A, D, dt_bias, seq_idx, norm_weight, rstd, outproj_weight)
        ctx.cfg = (chunk_size, dt_limit, norm_eps, headdim, ngroups, dstate)
        return out

    @staticmethod
    def backward(ctx, dout_og: torch.Tensor):
        (zxbcdt, conv_weight, conv_bias, xbc_conv, y, dt_out, dA_cumsum, states, CB,
         A, D, dt_bias, seq_idx, norm_weight, rstd, outproj_weight) = ctx.saved_tensors
        chunk_size, dt_limit, norm_eps, headdim, ngroups, dstate = ctx.cfg
        nheads = D.shape[0]
        dim = nheads * headdim
        batch = zxbcdt.shape[0]
        split = [dim, dim + 2 * ngroups * dstate, nheads]
        z, xbc, dt = torch.split(zxbcdt, split, dim=-1)
        x, B, C = _heads(xbc_conv, dim, nheads, ngroups, dstate)
        dzxbcdt = torch.empty_like(zxbcdt)
        dz, dxbc_given, ddt_given = torch.split(dzxbcdt, split, dim=-1)
        dxbc = torch.empty_like(xbc)
        dx, dB_given, dC_given = _heads(dxbc, dim, nheads, ngroups, dstate)

        # out_proj and the gated norm (the norm's output recomputed for out_proj's weight gradient)
        fused_out = outproj_weight is not None
        dnormed = F.linear(dout_og, outproj_weight.t()) if fused_out else dout_og
        normed = torch.empty(*y.shape[:2], dim, device=y.device, dtype=y.dtype) if fused_out else None
        dy, dnorm_weight, _, dz, *_ = _layer_norm_bwd(
            rearrange(dnormed, "b s d -> (b s) d"), rearrange(y, "b s h p -> (b s) (h p)"), norm_weight, None,
            norm_eps, None, rstd, rearrange(z, "b s d -> (b s) d"), group_size=dim // ngroups,
            norm_before_gate=False, is_rms_norm=True, recompute_output=fused_out,
            dz=rearrange(dz, "b l d -> (b l) d"), out=rearrange(normed, "b s d -> (b s) d") if fused_out else None,
        )
        doutproj_weight = None  # also None when weight_grad added it into the weight's main_grad
        if fused_out:
            doutproj_weight = weight_grad(outproj_weight, rearrange(dout_og, "b s o -> (b s) o"),
                                          rearrange(normed, "b s d -> (b s) d"))
        dout = rearrange(dy, "(b s) (h p) -> b s h p", b=batch, p=headdim)
        if dout.stride(-1) != 1:
            dout = dout.contiguous()

        # _mamba_chunk_scan_combined_bwd's body after its recomputation (z None: D's gradient from dx)
        dstates = sc._chunk_scan_bwd_dstates(C, dA_cumsum, dout, seq_idx=seq_idx, dtype=states.dtype)
        dstates, ddA_chunk_cumsum, _, states = sc._state_passing_bwd(
            rearrange(states, "... p n -> ... (p n)"), dA_cumsum[:, :, :, -1],
            rearrange(dstates, "... p n -> ... (p n)"), seq_idx=seq_idx, has_initial_states=False,
            dstates_dtype=x.dtype, states_dtype=x.dtype, chunk_size=chunk_size,
        )
        states = rearrange(states, "... (p n) -> ... p n", n=dstate)
        dstates = rearrange(dstates, "... (p n) -> ... p n", n=dstate)
        dx, ddt, dD = sc._chunk_scan_chunk_state_bwd_dx(x, dt_out, dA_cumsum, B, CB, dout, dstates, D=D,
                                                        seq_idx=seq_idx, dx=dx)
        dB, ddA_next = sc._chunk_state_bwd_db(x, dt_out, dA_cumsum, dstates, seq_idx=seq_idx, B=B, ngroups=ngroups)
        dC, ddA_cumsum_prev = sc._chunk_scan_bwd_dC(states.to(x.dtype), dA_cumsum, dout, seq_idx=seq_idx, C=C,
                                                    ngroups=ngroups)
        dCB, ddA = cb_and_decay_grads(x, dt_out, dA_cumsum, dout, CB, seq_idx=seq_idx, ngroups=ngroups)
        sc._bmm_chunk_bwd(C, dCB, residual=dB, out=dB_given)
        sc._bmm_chunk_bwd(B, rearrange(dCB, "... l s -> ... s l"), residual=dC, out=dC_given)
        ddA_cumsum_prev[..., -1] += ddA_chunk_cumsum
        ddA_prev = ddA_cumsum_prev.flip([-1]).cumsum(dim=-1).flip([-1])
        ddA += ddA_next + ddA_prev
        # mamba_ssm hands this kernel a copy of dt (a Triton context workaround): the same here
        _, dA, ddt_bias = sc._chunk_cumsum_bwd(ddA, ddt, dt.clone(), A, dt_bias=dt_bias, dt_softplus=True,
                                               dt_limit=dt_limit, ddt=ddt_given)

        dxbc_update, dconv_weight, dconv_bias, *_ = sc.causal_conv1d_bwd_function(
            rearrange(sc.ensure_stride(xbc), "b s d -> b d s"), conv_weight, conv_bias,
            rearrange(sc.ensure_stride(dxbc), "b s d -> b d s"), seq_idx, None, None,
            rearrange(sc.ensure_stride(dxbc_given), "b s d -> b d s"), False, True,
        )
        dxbc_update = rearrange(dxbc_update, "b d s -> b s d")
        if dxbc_given.stride() != dxbc_update.stride():
            dxbc_given.copy_(dxbc_update)
        return (dzxbcdt, dconv_weight, dconv_bias, ddt_bias, dA, dD, None, None, None, dnorm_weight, None,
                doutproj_weight, None, None)


def split_conv1d_scan_saved(zxbcdt: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                            dt_bias: torch.Tensor, A: torch.Tensor, D: torch.Tensor, *, chunk_size: int,
                            seq_idx: torch.Tensor | None, dt_limit: tuple[float, float], rmsnorm_weight: torch.Tensor,
                            rmsnorm_eps: float, outproj_weight: torch.Tensor | None, headdim: int,
                            ngroups: int) -> torch.Tensor:
    """`mamba_split_conv1d_scan_combined(..., activation="silu", norm_before_gate=False)` for training:
    zxbcdt (b, l, e + c + h), seq_idx (b, l) int32 or None -> (b, l, d_out), or (b, l, e) without
    outproj_weight."""
    return SplitConvScanSavedFn.apply(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, chunk_size, seq_idx,
                                      tuple(dt_limit), rmsnorm_weight, rmsnorm_eps, outproj_weight, headdim, ngroups)
