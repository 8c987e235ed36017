"""Adaptive state compression of the Mamba2 recurrent state (`model.mamba.state_compression`, factor f > 1).

The design's DynamicHybridModel compresses SSM hidden states "by learned importance scoring, up to 4x". Here
the state itself is kept small: per group of B/C, a learned basis U (d_state x r, r = d_state / f) maps
what a token writes into the state and what it reads from it, and a learned per-token, per-slot importance
score scales each write:

    B'_t = (B_t U) * s_t,     C'_t = C_t U,     s_t = 2 sigmoid(W_s u_t)          B_t, C_t: (g, n); s_t: (g, r)
    h_t  = exp(dt_t A) h_{t-1} + dt_t x_t B'_t^T,     y_t = h_t C'_t + D x_t       h: (heads, p, r)

(u_t the mixer's input, B_t and C_t the conv outputs of model/mamba2.py). The recurrent state h is
(heads x headdim x d_state / f) at every point: in decoding and where the chunked scan passes state from
one chunk to the next. With s = 1 it is exactly the uncompressed state projected on the learned basis,
h = h_full U, read through the same basis (y_t = h_full U U^T C_t + D x_t); the importance score then
re-weights each token's write per slot. Why this form:
  - exact and causal: B' and C' are per-token functions of token t's own inputs, so the scan is an
    ordinary Mamba2 scan with state width r; decoding token by token equals the full forward, packed
    documents stay separate, and the recurrence is unchanged (no approximation that differs between the
    chunked forward and the step);
  - the kernel path expresses it: mamba_ssm's chunk scan and `selective_state_update` take B, C of any
    state width, so B', C' go in as they are. Only the fused conv + scan + norm kernel, which computes B and
    C inside itself, cannot take them: with compression the kernel path runs the unfused kernels (causal
    conv, chunk scan, gated norm), the route it already takes for a continued prefill;
  - the basis sits after the conv and its SiLU, so it compresses a nonlinear feature of d_state channels (a
    smaller in_proj could not express it), and the conv state keeps its d_state channels: the memory that
    shrinks by f is the recurrent state, the one that is large (float32, d_state columns against the conv's
    d_conv);
  - the importance score decides per token how much of it enters each slot: a learned, input-dependent
    choice of what the few slots keep. It starts at exactly 1 (W_s = 0) and U at N(0, 1/d_state), which
    keeps the scale of B' and C' per slot equal to B's and C's.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from model.config import ModelConfig
from model.wgrad import Linear


class StateCompression(nn.Module):
    """The learned basis and importance gate of one Mamba2 mixer. forward: (u, B, C) -> (B', C')."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        m = cfg.mamba
        self.n_groups, self.width = m.n_groups, m.state_dim
        self.basis = nn.Parameter(torch.empty(m.n_groups, m.d_state, m.state_dim))
        self.importance = Linear(cfg.d_model, m.n_groups * m.state_dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.basis, std=self.basis.size(1) ** -0.5)
        nn.init.zeros_(self.importance.weight)

    @staticmethod
    def param_count(cfg: ModelConfig) -> int:
        """Basis (g, n, r) + importance weights (d_model -> g * r)."""
        m = cfg.mamba
        return m.n_groups * m.state_dim * (m.d_state + cfg.d_model)

    @staticmethod
    def matmul_params(cfg: ModelConfig) -> int:
        """Per token: the importance projection and the basis applied to B and to C."""
        m = cfg.mamba
        return m.n_groups * m.state_dim * (cfg.d_model + 2 * m.d_state)

    def forward(self, u: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u: (..., d_model); B, C: (..., g, n) -> B', C': (..., g, r)."""
        s = 2 * torch.sigmoid(self.importance(u)).unflatten(-1, (self.n_groups, self.width))
        basis = self.basis.to(B.dtype)
        Bc = torch.einsum("...gn,gnr->...gr", B, basis) * s.to(B.dtype)
        Cc = torch.einsum("...gn,gnr->...gr", C, basis)
        return Bc, Cc
