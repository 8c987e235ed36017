"""Small building blocks shared by the blocks: RMSNorm, gated RMSNorm, SwiGLU, rotary embeddings.

Shape legend: b batch, l sequence, d model width, h heads, k head dim.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.kernels import mamba_ops
from model.wgrad import Linear, is_plain_linear, linear

if TYPE_CHECKING:
    from model.config import ModelConfig, RopeScalingConfig


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, statistics in float32 (float64 stays float64). x: (..., dim)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(work)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(work)).to(x.dtype)


class ResidualRMSNorm(RMSNorm):
    """The pre-norm step of a residual block: residual' = x + residual (x when residual is None),
    returns (norm(residual'), residual'). x, residual: (..., dim), same dtype.

    A module (not a function reading `.weight`) so that ZeRO-3 gathers the weight when it is called.
    fused: mamba_ssm's Triton kernel does the add and the RMSNorm in one pass (float32 statistics, the
    sum rounded to x's dtype as the unfused add does), forward and backward; otherwise plain PyTorch,
    which costs a dozen or more float32 elementwise launches per norm on a GPU.
    """

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, residual: torch.Tensor | None, fused: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if fused:
            return mamba_ops().add_rms_norm(x, self.weight, None, residual=residual, eps=self.eps, prenorm=True)
        residual = x if residual is None else x + residual
        return super().forward(residual), residual


def rmsnorm_gated_ref(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, n_groups: int
) -> torch.Tensor:
    """Mamba2's gated norm with norm_before_gate=False: RMSNorm(y * silu(z)) per group.

    y, z: (..., d_inner); statistics over each of the n_groups contiguous slices, in float32
    (float64 stays float64).
    """
    work = torch.promote_types(y.dtype, torch.float32)
    g = (y.to(work) * F.silu(z.to(work))).unflatten(-1, (n_groups, -1))
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return (g.flatten(-2) * weight.to(work)).to(y.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); no biases. x: (b, l, d) -> (b, l, d).

    impl "kernels": gate and up run as one GEMM over the concatenated weights (2 * hidden, d) and
    mamba_ssm's Triton SwiGLU applies silu(gate) * up in one pass forward and one backward (the eager
    form launches 2 kernels forward and 3 backward over (b, l, hidden) tensors, and keeps silu(gate)
    for the backward). The weights stay two Linear modules: the checkpoint and export layout is the
    same on both paths; quantized gate/up run unfused; swapped Linears over plain weights (float8 training)
    run as one layer where their class joins layers (`swapped_gate_up_output`), else as two, and the fused
    activation takes their concatenated outputs. It reads the weights outside their modules' forward, so
    ZeRO-3 treats it as one leaf module (train.trainer.prepare_zero3).
    """

    name = "swiglu"  # model.mlp (model/mlps.py: the registry of MLP kinds)
    description = "down(silu(gate(x)) * up(x)): the Llama / Bamba MLP, fused gate+up GEMM on the kernel path"
    hf_export = True

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = Linear(d_model, hidden, bias=False)
        self.up_proj = Linear(d_model, hidden, bias=False)
        self.down_proj = Linear(hidden, d_model, bias=False)
        self.impl = "reference"

    @classmethod
    def param_count(cls, cfg: "ModelConfig") -> int:
        return 3 * cfg.d_model * cfg.ffn_hidden

    def reset(self, std: float, out_std: float) -> None:
        init_linear(self.gate_proj, std)
        init_linear(self.up_proj, std)
        init_linear(self.down_proj, out_std)

    def fused_gate_up(self) -> bool:
        """Whether the kernel path's concatenated GEMM applies: gate and up are plain Linears holding
        plain tensors (quantization swaps in other modules or tensor subclasses: those run unfused;
        train.graph_step's stand-in leaves are plain tensors: fused, as in eager training)."""
        return self.impl == "kernels" and all(is_plain_linear(lin) for lin in (self.gate_proj, self.up_proj))

    def swapped_gate_up(self) -> bool:
        """Whether gate and up are Linears of another class over plain weights (float8 training swaps in
        its own, train/fp8.py): on the kernel path they run their own GEMMs and keep the fused activation."""
        return self.impl == "kernels" and all(
            type(lin) is not Linear and type(lin.weight) in (nn.Parameter, torch.Tensor)
            for lin in (self.gate_proj, self.up_proj)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gate_up():
            gate_up = linear(x, self.gate_proj.weight, self.up_proj.weight)  # (b, l, 2 * hidden): gate first
            return self.down_proj(mamba_ops().swiglu(gate_up))
        if self.swapped_gate_up():
            return self.down_proj(mamba_ops().swiglu(self.swapped_gate_up_output(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def swapped_gate_up_output(self, x: torch.Tensor) -> torch.Tensor:
        """(b, l, 2 * hidden), gate first, from swapped gate/up Linears: one call of their class's `joined(x,
        *layers)` (one GEMM over both weights, train/fp8_linear.py) where both are of one class that has it,
        else their own forwards' outputs concatenated."""
        joined = getattr(type(self.gate_proj), "joined", None)
        if joined is not None and type(self.up_proj) is type(self.gate_proj):
            return joined(x, self.gate_proj, self.up_proj)
        return torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE at arbitrary integer positions (restart per document when packed).

    The inverse frequencies are computed in float32 on every call rather than kept as a buffer: a
    buffer would be rounded by `model.to(torch.bfloat16)` (and left on the meta device by meta-device
    loading), which puts RoPE angles visibly off at long positions. They are head_dim / 2 numbers.
    `scaling` (model.attention.rope_scaling) changes them, and for yarn scales cos and sin, as
    transformers' modeling_rope_utils does (linear, dynamic NTK at a fixed scale, yarn).
    """

    def __init__(self, head_dim: int, theta: float, scaling: "RopeScalingConfig | None" = None) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling

    def _base_inv_freq(self, theta: float, device: torch.device) -> torch.Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (theta ** exponent)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """(head_dim / 2,) float32 inverse frequencies theta^(-2i / head_dim), scaled."""
        s, k = self.scaling, self.head_dim
        if s is None:
            return self._base_inv_freq(self.theta, device)
        if s.type == "linear":
            return self._base_inv_freq(self.theta, device) / s.factor
        if s.type == "ntk":
            return self._base_inv_freq(self.theta * s.factor ** (k / (k - 2)), device)
        # yarn: dimensions turning fewer than beta_slow times over the original length interpolate
        # (frequency / factor), more than beta_fast times keep theirs, a linear ramp between
        def dim_of(rotations: float) -> float:
            return k * math.log(s.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(self.theta))

        low, high = max(math.floor(dim_of(s.beta_fast)), 0), min(math.ceil(dim_of(s.beta_slow)), k - 1)
        high = high + 0.001 if low == high else high
        ramp = ((torch.arange(k // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1 - ramp
        base = self._base_inv_freq(self.theta, device)
        return base / s.factor * (1 - extrapolate) + base * extrapolate

    def attention_factor(self) -> float:
        """Multiplier of cos and sin: yarn's 0.1 ln(factor) + 1, else 1."""
        s = self.scaling
        return 0.1 * math.log(s.factor) + 1.0 if s is not None and s.type == "yarn" and s.factor > 1 else 1.0

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: (b, l) int -> cos, sin: (b, l, k) in `dtype` (angles in float32)."""
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq(position_ids.device)  # (b, l, k/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        scale = self.attention_factor()
        if scale == 1.0:
            return emb.cos().to(dtype), emb.sin().to(dtype)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Llama/HF convention). x: (b, h, l, k); cos, sin: (b, l, k)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def init_linear(layer: nn.Linear, std: float) -> None:
    """Normal(0, std) weights (truncated at 3 std), zero bias."""
    nn.init.trunc_normal_(layer.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def residual_std(base_std: float, n_layers: int) -> float:
    """Scaled init of projections that write into the residual stream: std / sqrt(2 n_layers)
    (GPT-2/Megatron; each block adds two residual branches, mixer and MLP)."""
    return base_std / math.sqrt(2 * n_layers)
