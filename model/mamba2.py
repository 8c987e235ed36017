"""Mamba2 mixer with mamba_ssm's parameter layout and two execution paths on the same weights.

Parameters (state_dict keys as in `mamba_ssm.modules.mamba2.Mamba2`, so weights move without
reshuffling): in_proj (d_model -> [z, x, B, C, dt]), conv1d (depthwise over x, B, C), dt_bias,
A_log, D, norm.weight (gated RMSNorm), out_proj.

Shape legend: b batch, l sequence, d d_model, e d_inner, c conv_dim, h SSM heads, p headdim,
g groups, n d_state, w conv width.

Paths:
  reference  pure PyTorch (CPU, tests, ONNX): conv via F.conv1d (or a masked unfold when documents
             are packed), chunked SSD from `model.ssd`, gated RMSNorm in float32.
  kernels    mamba_ssm's fused `mamba_split_conv1d_scan_combined` when causal_conv1d is installed
             (conv + scan + gated norm + out_proj in one autograd function; when training, its form
             in `model.ssd_saved` that keeps the forward's intermediates instead of recomputing
             them, unless `model.mamba.recompute_in_backward`), otherwise causal conv
             + `mamba_chunk_scan_combined` + the Triton gated norm; decoding uses
             `selective_state_update` and `causal_conv1d_update`.

With `model.mamba.state_compression` f > 1 the scan reads B and C through a learned basis and importance gate
(model/state_compression.py): the recurrent state is (heads, headdim, d_state / f) on both paths; the kernel
path then takes the unfused kernels (the fused one computes B and C inside itself).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.cache import MambaState
from model.config import ModelConfig
from model.kernels import conv_ops, deterministic, mamba_ops
from model.layers import init_linear, residual_std, rmsnorm_gated_ref
from model.mixers.base import FP32, Mixer, MixerContext
from model.ssd import discretize_dt, ssd_chunked, ssd_step
from model.state_compression import StateCompression
from model.wgrad import Linear, is_plain_linear

if TYPE_CHECKING:
    from model.context_parallel import ContextSlice


class GatedRMSNorm(nn.Module):
    """Holds the gated-norm weight under the key `norm.weight` (mamba_ssm's RMSNormGated)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    prefix: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Depthwise causal conv (pre-activation).

    x: (b, l, c); weight: (c, w); prefix: (b, c, w-1) inputs before position 0 (zeros if None);
    seq_idx: (b, l) documents: taps never reach into another document. Returns (b, l, c).
    """
    b, l, c = x.shape
    w = weight.size(-1)
    xt = x.transpose(1, 2)  # (b, c, l)
    left = prefix if prefix is not None else xt.new_zeros(b, c, w - 1)
    xp = torch.cat([left.to(xt.dtype), xt], dim=-1)  # (b, c, l + w - 1)
    if seq_idx is None:
        y = F.conv1d(xp, weight.unsqueeze(1), bias, groups=c)  # (b, c, l)
        return y.transpose(1, 2)
    windows = xp.unfold(-1, w, 1)  # (b, c, l, w): windows[..., t, j] = input at t - (w-1) + j
    sid = torch.cat([seq_idx[:, :1].expand(b, w - 1), seq_idx], dim=1).unfold(-1, w, 1)  # (b, l, w)
    same = (sid == seq_idx.unsqueeze(-1)).to(x.dtype)  # (b, l, w)
    y = torch.einsum("bclw,blw,cw->blc", windows, same, weight)
    return y + bias if bias is not None else y


class Mamba2Mixer(Mixer):
    """Mamba2 mixer. forward: (b, l, d) -> (b, l, d)."""

    letter = "M"
    name = "mamba2"
    description = "Mamba2 (SSD) mixer: causal conv + selective state space scan, fixed-size decoding state"
    design = "Mamba2 (Dao & Gu 2024); the SSM layers of every hybrid design"
    hf_layer_type = "mamba"
    pathway = "ssm"
    onnx = True
    context_parallel = True
    adapter_targets = {"mamba_in": ("in_proj",), "mamba_out": ("out_proj",)}

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        m = cfg.mamba
        self.d_inner, self.n_heads, self.headdim = cfg.d_inner, cfg.n_ssm_heads, m.headdim
        self.n_groups, self.d_state, self.d_conv = m.n_groups, m.d_state, m.d_conv
        self.chunk_size, self.dt_limit = m.chunk_size, tuple(m.dt_limit)
        self.state_dim = m.state_dim  # d_state / state_compression: the recurrent state's last axis
        self.conv_dim = cfg.conv_dim
        self.in_proj = Linear(cfg.d_model, cfg.d_in_proj, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, kernel_size=m.d_conv, groups=self.conv_dim,
            padding=m.d_conv - 1, bias=m.conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # read by the optimizer's parameter grouping
        self.norm = GatedRMSNorm(self.d_inner, cfg.norm_eps)
        self.out_proj = Linear(self.d_inner, cfg.d_model, bias=False)
        self.compress = StateCompression(cfg) if m.state_compression > 1 else None
        self.impl = "reference"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mamba_ssm's init for dt/A/D/conv; normal init for the projections, out_proj scaled."""
        m, std = self.cfg.mamba, self.cfg.resolved_init_std
        init_linear(self.in_proj, std)
        init_linear(self.out_proj, residual_std(std, self.cfg.n_layers))
        self.conv1d.reset_parameters()
        with torch.no_grad():
            # dt ~ logU(dt_min, dt_max), floored; dt_bias = softplus^-1(dt)
            u = torch.rand(self.n_heads, device=self.dt_bias.device)
            dt = torch.exp(u * (math.log(m.dt_max) - math.log(m.dt_min)) + math.log(m.dt_min))
            dt = dt.clamp(min=m.dt_init_floor)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            A = torch.empty(self.n_heads, device=self.A_log.device).uniform_(*m.a_init_range)
            self.A_log.copy_(torch.log(A))
            self.D.fill_(1.0)
            self.norm.weight.fill_(1.0)

    # ---- helpers ----------------------------------------------------------------------------------
    def _split(self, zxbcdt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.n_heads], dim=-1)

    def _split_xbc(self, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gn = self.n_groups * self.d_state
        x, B, C = torch.split(xbc, [self.d_inner, gn, gn], dim=-1)
        return x, B, C

    def _scan_bc(self, u: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B, C (..., g * n) -> what the scan reads, (..., g, state_dim): as they are, or compressed from the
        mixer input u (..., d) (model/state_compression.py)."""
        B, C = B.unflatten(-1, (self.n_groups, self.d_state)), C.unflatten(-1, (self.n_groups, self.d_state))
        return (B, C) if self.compress is None else self.compress(u, B, C)

    def _decay_rates(self) -> torch.Tensor:
        """A = -exp(A_log): (h,) in float32 or wider (A_log in bf16 would lose the decay)."""
        return -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))

    @property
    def conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight.squeeze(1)  # (c, w)

    def empty_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> MambaState:
        conv = torch.zeros(batch, self.conv_dim, self.d_conv, device=device, dtype=dtype)
        ssm_dtype = torch.promote_types(dtype, torch.float32)  # the state accumulates: never below fp32
        ssm = torch.zeros(batch, self.n_heads, self.headdim, self.state_dim, device=device, dtype=ssm_dtype)
        return MambaState(conv=conv, ssm=ssm)

    def _store_conv_state(self, state: MambaState, xbc: torch.Tensor, seq_idx: torch.Tensor | None) -> None:
        """Keep the last d_conv conv inputs (zeros where they belong to an earlier document)."""
        w = self.d_conv
        tail = xbc.transpose(1, 2)  # (b, c, l)
        if state.filled:
            tail = torch.cat([state.conv.to(tail.dtype), tail], dim=-1)
        tail = F.pad(tail, (max(w - tail.size(-1), 0), 0))[..., -w:]
        if seq_idx is not None:
            sid = F.pad(seq_idx, (max(w - seq_idx.size(1), 0), 0), value=-1)[:, -w:]
            tail = tail * (sid == seq_idx[:, -1:]).unsqueeze(1).to(tail.dtype)
        state.conv.copy_(tail)

    # ---- sizes ------------------------------------------------------------------------------------
    @classmethod
    def param_count(cls, cfg: ModelConfig) -> int:
        """in_proj + conv1d (+bias) + dt_bias + A_log + D + gated-norm weight + out_proj."""
        m = cfg.mamba
        conv = cfg.conv_dim * m.d_conv + (cfg.conv_dim if m.conv_bias else 0)
        per_head = 3 * cfg.n_ssm_heads  # dt_bias, A_log, D
        compress = StateCompression.param_count(cfg) if m.state_compression > 1 else 0
        return cfg.d_model * cfg.d_in_proj + conv + per_head + cfg.d_inner + cfg.d_inner * cfg.d_model + compress

    @classmethod
    def matmul_params(cls, cfg: ModelConfig) -> int:
        compress = StateCompression.matmul_params(cfg) if cfg.mamba.state_compression > 1 else 0
        return cfg.d_model * cfg.d_in_proj + cfg.d_inner * cfg.d_model + compress

    @classmethod
    def core_flops(cls, cfg: ModelConfig, seq_len: int) -> dict[str, float]:
        """The scan (at the recurrent state's width) and conv (model/sizing.py's docstring has the terms)."""
        m = cfg.mamba
        q_eff = (min(m.chunk_size, seq_len) + 1) / 2
        return {"ssd": 2 * q_eff * (m.n_groups * m.state_dim + cfg.n_ssm_heads * m.headdim)
                + 4 * cfg.n_ssm_heads * m.headdim * m.state_dim
                + 2 * m.d_conv * cfg.conv_dim}

    @classmethod
    def saved_activation_bytes(cls, cfg: ModelConfig, e: int, fp8: bool = False) -> float:
        """Per token, model/ssd_saved.py's saved tensors: zxbcdt (2 di + 2 G N + H), the conv output
        (di + 2 G N), y (di) in e bytes; float32 dt and its cumsum (2 H), chunk states (H P N per chunk of
        Q tokens), C B^T (G Q per token), the gated norm's rstd (G); with mamba.recompute_in_backward only
        zxbcdt and y (mamba_ssm's own fused function, which recomputes the rest). fp8: the float8 out_proj
        also keeps the scan's normed output (di), which the fused scan would recompute (counted for every
        block; the bf16 first and last ones do not keep it)."""
        m = cfg.mamba
        di, gn, heads = cfg.d_inner, m.n_groups * m.d_state, cfg.n_ssm_heads
        saved = (2 * di + 2 * gn + heads + di) * e
        if not m.recompute_in_backward:
            saved += (di + 2 * gn) * e + FP32 * (2 * heads + heads * m.headdim * m.d_state / m.chunk_size
                                                 + m.n_groups * m.chunk_size + m.n_groups)
        if fp8:
            saved += di * e
        return saved

    def zero3_leaves(self) -> list[nn.Module]:
        return [self]  # the kernel path reads conv1d, norm and out_proj weights outside their modules

    # ---- forward ----------------------------------------------------------------------------------
    def forward(
        self, u: torch.Tensor, ctx: MixerContext | None = None, state: MambaState | None = None
    ) -> torch.Tensor:
        """u: (b, l, d); ctx: the batch's documents (ctx.seq_idx (b, l)); state: decoding state, updated
        in place (a one-token forward with a filled state is the decode step)."""
        seq_idx = ctx.seq_idx if ctx is not None else None
        if ctx is not None and ctx.cp is not None:  # one slice of a context-parallel row (model/context_parallel.py)
            path = self._forward_kernels if self.impl == "kernels" else self._forward_reference
            return path(u, ctx.cp.seq_idx, None, ctx.cp)
        if state is not None and state.filled and u.size(1) == 1:
            return self._step(u, state)
        if self.impl == "kernels":
            return self._forward_kernels(u, seq_idx, state)
        return self._forward_reference(u, seq_idx, state)

    def _forward_reference(
        self, u: torch.Tensor, seq_idx: torch.Tensor | None, state: MambaState | None,
        cp: ContextSlice | None = None,
    ) -> torch.Tensor:
        """cp: this rank's slice of a context-parallel row: the conv prefix and the scan's entering state
        come from the previous ranks (no decoding state then)."""
        b, l, _ = u.shape
        z, xbc, dt = self._split(self.in_proj(u))  # (b, l, e), (b, l, c), (b, l, h)
        # A copy: _store_conv_state overwrites state.conv in place before the conv reads the prefix.
        prefix = state.conv[..., 1:].clone() if state is not None and state.filled else None
        if cp is not None:
            prefix = cp.conv_prefix(xbc, self.d_conv)
        if state is not None:
            self._store_conv_state(state, xbc, seq_idx)
        xbc = F.silu(causal_conv1d_ref(xbc, self.conv_weight, self.conv1d.bias, prefix, seq_idx))
        x, B, C = self._split_xbc(xbc)
        B, C = self._scan_bc(u, B, C)
        A = self._decay_rates()
        dt = discretize_dt(dt, self.dt_bias, self.dt_limit)
        y, final = ssd_chunked(
            x.reshape(b, l, self.n_heads, self.headdim),
            dt,
            A,
            B,
            C,
            self.chunk_size,
            D=self.D,
            initial_state=state.ssm if state is not None and state.filled else None,
            seq_idx=seq_idx,
        )
        if cp is not None:
            y, final = cp.add_entering_state(y, final, dt, A, C)
        if state is not None:
            state.ssm.copy_(final)
            state.filled = True
        y = rmsnorm_gated_ref(y.reshape(b, l, self.d_inner), z, self.norm.weight, self.norm.eps, self.n_groups)
        return self.out_proj(y)

    def _forward_kernels(
        self, u: torch.Tensor, seq_idx: torch.Tensor | None, state: MambaState | None,
        cp: ContextSlice | None = None,
    ) -> torch.Tensor:
        """cp: as in `_forward_reference`; then the conv runs in PyTorch (it takes the previous rank's inputs)
        and the chunk scan's zero-state result gets the entering state's part added."""
        ops = mamba_ops()
        # causal_conv1d's backward adds weight gradients with atomics: a reproducible backward runs the conv
        # in PyTorch (F.conv1d under cuDNN's deterministic algorithms) and the unfused SSD scan
        cops = None if deterministic() and torch.is_grad_enabled() else conv_ops()
        b, l, _ = u.shape
        zxbcdt = self.in_proj(u)
        sid = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
        A = self._decay_rates()
        continuing = state is not None and state.filled
        # the fused kernels compute B and C themselves and read the conv from zxbcdt alone
        fused = cops is not None and self.compress is None and cp is None
        # they take out_proj's weight too, unless another module stands in for out_proj (float8 training,
        # a LoRA wrapper): then its own forward runs on their output
        own_out = is_plain_linear(self.out_proj)
        outproj_weight = self.out_proj.weight if own_out else None
        if fused and state is None and torch.is_grad_enabled() and not self.cfg.mamba.recompute_in_backward:
            out = ops.split_conv1d_scan_saved(
                zxbcdt, self.conv_weight, self.conv1d.bias, self.dt_bias, A, self.D, chunk_size=self.chunk_size,
                seq_idx=sid, dt_limit=self.dt_limit, rmsnorm_weight=self.norm.weight, rmsnorm_eps=self.norm.eps,
                outproj_weight=outproj_weight, headdim=self.headdim, ngroups=self.n_groups,
            )
            return out if own_out else self.out_proj(out)
        if fused and not continuing:
            if state is not None:
                self._store_conv_state(state, self._split(zxbcdt)[1], seq_idx)
            out = ops.split_conv1d_scan(
                zxbcdt, self.conv_weight, self.conv1d.bias, self.dt_bias, A, D=self.D,
                chunk_size=self.chunk_size, seq_idx=sid, dt_limit=self.dt_limit,
                return_final_states=state is not None, activation="silu",
                rmsnorm_weight=self.norm.weight, rmsnorm_eps=self.norm.eps,
                outproj_weight=outproj_weight, outproj_bias=None,
                headdim=self.headdim, ngroups=self.n_groups, norm_before_gate=False,
            )
            if state is not None:
                out, final = out
                state.ssm.copy_(final)
                state.filled = True
            return out if own_out else self.out_proj(out)
        z, xbc, dt = self._split(zxbcdt)
        prefix = state.conv[..., 1:].clone() if continuing else None  # copy: overwritten just below
        if cp is not None:
            prefix = cp.conv_prefix(xbc, self.d_conv)
        if state is not None:
            self._store_conv_state(state, xbc, seq_idx)
        if cops is not None and prefix is None:
            xbc = cops.conv(xbc.transpose(1, 2), self.conv_weight, self.conv1d.bias, seq_idx=sid,
                            activation="silu").transpose(1, 2)
        else:
            xbc = F.silu(causal_conv1d_ref(xbc, self.conv_weight, self.conv1d.bias, prefix, seq_idx))
        x, B, C = self._split_xbc(xbc)
        B, C = self._scan_bc(u, B, C)
        y = ops.chunk_scan(
            x.reshape(b, l, self.n_heads, self.headdim), dt, A, B, C,
            chunk_size=self.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True, seq_idx=sid,
            dt_limit=self.dt_limit, initial_states=state.ssm if continuing else None,
            return_final_states=state is not None or cp is not None,
        )
        if cp is not None:
            y, _ = cp.add_entering_state(*y, discretize_dt(dt, self.dt_bias, self.dt_limit), A, C)
        elif state is not None:
            y, final = y
            state.ssm.copy_(final)
            state.filled = True
        y = ops.rmsnorm_gated(
            y.reshape(b, l, self.d_inner), self.norm.weight, None, z=z, eps=self.norm.eps,
            group_size=self.d_inner // self.n_groups, norm_before_gate=False,
        )
        return self.out_proj(y)

    def _step(self, u: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One token: (b, 1, d) -> (b, 1, d); O(1) in context length."""
        z, xbc, dt = self._split(self.in_proj(u.squeeze(1)))  # (b, e), (b, c), (b, h)
        cops, ops = conv_ops(), mamba_ops()
        if self.impl == "kernels" and cops is not None:
            xbc = cops.update(xbc, state.conv, self.conv_weight, self.conv1d.bias, "silu")
        else:
            conv = torch.cat([state.conv[..., 1:], xbc.unsqueeze(-1).to(state.conv.dtype)], dim=-1)
            state.conv.copy_(conv)
            xbc = (conv * self.conv_weight).sum(-1)
            xbc = F.silu(xbc + self.conv1d.bias if self.conv1d.bias is not None else xbc)
        x, B, C = self._split_xbc(xbc)
        b = x.size(0)
        x = x.reshape(b, self.n_heads, self.headdim)
        B, C = self._scan_bc(u.squeeze(1), B, C)  # (b, g, state_dim)
        A = self._decay_rates()
        if self.impl == "kernels":
            p, n = self.headdim, self.state_dim
            if self.dt_limit == (0.0, float("inf")):  # the kernel applies dt_bias and softplus itself
                dt_bias, softplus = self.dt_bias.unsqueeze(-1).expand(-1, p), True
            else:  # it has no clamp: discretise here, as the forward's kernels do with dt_limit, and hand it a
                # zero bias (mamba_ssm 2.3.2 reads dt_bias's strides unconditionally: None raises)
                dt, softplus = discretize_dt(dt, self.dt_bias, self.dt_limit), False
                dt_bias = self.dt_bias.new_zeros(()).expand(self.n_heads, p)
            y = ops.state_update(
                state.ssm, x, dt.unsqueeze(-1).expand(-1, -1, p), A[:, None, None].expand(-1, p, n),
                B, C, D=self.D.unsqueeze(-1).expand(-1, p), dt_bias=dt_bias, dt_softplus=softplus,
            )
        else:
            y, new = ssd_step(state.ssm, x, discretize_dt(dt, self.dt_bias, self.dt_limit), A, B, C, self.D)
            state.ssm.copy_(new)
        y = y.reshape(b, self.d_inner)
        if self.impl == "kernels":
            y = ops.rmsnorm_gated(y, self.norm.weight, None, z=z, eps=self.norm.eps,
                                  group_size=self.d_inner // self.n_groups, norm_before_gate=False)
        else:
            y = rmsnorm_gated_ref(y, z, self.norm.weight, self.norm.eps, self.n_groups)
        return self.out_proj(y).unsqueeze(1)
