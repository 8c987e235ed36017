"""Model configuration: the typed `model` section of the run config.

`ModelConfig` holds every architectural number of a hybrid Mamba2/attention language model. It is a
strict pydantic model: unknown keys, wrong types and inconsistent shapes are rejected with the key's
dotted name. A config may name a `preset` (see `model/presets.py`); the preset's values are the
defaults and any key given beside it overrides them.

The layer layout is one letter per layer, each a registered block type (model/mixers: `M` Mamba2,
`A` attention, `R` routed, `G` gated memory, `H` hierarchical), either given explicitly as `pattern` or derived from
`n_layers` and `attn_ratio` by the strategic-placement rule (`strategic_pattern`, M and A only).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from config.base import StrictModel, deep_merge

MAMBA, ATTENTION = "M", "A"
VOCAB_MULTIPLE = 128


class MambaConfig(StrictModel):
    """Mamba2 mixer hyper-parameters (names follow `mamba_ssm.modules.mamba2.Mamba2`)."""

    d_state: int = Field(128, ge=1, description="SSM state size N per group.")
    headdim: int = Field(64, ge=1, description="Channels P per SSM head.")
    expand: int = Field(2, ge=1, description="d_inner = expand * d_model.")
    n_groups: int = Field(1, ge=1, description="Groups sharing B and C (like GQA for SSMs).")
    d_conv: int = Field(4, ge=2, description="Depthwise causal conv kernel width.")
    chunk_size: int = Field(256, ge=1, description="SSD chunk length Q (tokens).")
    dt_min: float = Field(0.001, gt=0, description="Lower end of the dt init range.")
    dt_max: float = Field(0.1, gt=0, description="Upper end of the dt init range.")
    dt_init_floor: float = Field(1e-4, gt=0, description="Floor applied to sampled init dt.")
    dt_limit: tuple[float, float] = Field((0.0, math.inf), description="Clamp of softplus(dt).")
    a_init_range: tuple[float, float] = Field((1.0, 16.0), description="A ~ U(range); A_log = log A.")
    conv_bias: bool = Field(True, description="Bias of the depthwise conv (mamba_ssm default).")
    recompute_in_backward: bool = Field(
        False,
        description="Kernel path, training: recompute the conv output and chunk states in the backward "
        "(mamba_ssm's fused function) instead of keeping them from the forward (model/ssd_saved.py, "
        "which gives the kept tensors' sizes per layer and token; keeping them runs five fewer kernels per layer).",
    )
    state_compression: int = Field(
        1, ge=1,
        description="Factor f by which every Mamba2 recurrent state (heads x headdim x d_state) is kept "
        "compressed: a learned per-group basis maps d_state to d_state / f, and each token's write into "
        "the compressed slots is scaled by a learned importance gate (model/state_compression.py). 1 = off; "
        "must divide d_state.",
    )

    @property
    def state_dim(self) -> int:
        """Width of the recurrent state the scan keeps: d_state / state_compression."""
        return self.d_state // self.state_compression

    @model_validator(mode="after")
    def _check(self) -> "MambaConfig":
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min ({self.dt_min}) must be <= dt_max ({self.dt_max})")
        lo, hi = self.a_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"a_init_range must satisfy 0 < low <= high, got {self.a_init_range}")
        if not 0 <= self.dt_limit[0] < self.dt_limit[1]:
            raise ValueError(f"dt_limit must satisfy 0 <= low < high, got {self.dt_limit}")
        if self.d_state % self.state_compression:
            raise ValueError(f"state_compression ({self.state_compression}) must divide d_state ({self.d_state})")
        return self


class RopeScalingConfig(StrictModel):
    """RoPE scaling for a context longer than the one trained at (transformers' modeling_rope_utils formulas)."""

    type: Literal["linear", "ntk", "yarn"] = Field(
        ..., description="linear: positions divided by factor (position interpolation); ntk: the base raised to "
        "theta * factor^(k / (k - 2)) (NTK-aware, static); yarn: per-frequency blend of interpolation and "
        "extrapolation between beta_fast and beta_slow rotations, cos/sin scaled by 0.1 ln(factor) + 1.",
    )
    factor: float = Field(..., ge=1.0, description="Context extension ratio (new length / original_max_seq_len).")
    original_max_seq_len: int = Field(..., ge=2, description="Length the model was pretrained at (tokens).")
    beta_fast: float = Field(32.0, gt=0, description="yarn: rotations below which dimensions extrapolate.")
    beta_slow: float = Field(1.0, gt=0, description="yarn: rotations above which dimensions interpolate.")

    @model_validator(mode="after")
    def _check(self) -> "RopeScalingConfig":
        if self.beta_slow >= self.beta_fast:
            raise ValueError(f"beta_slow ({self.beta_slow}) must be < beta_fast ({self.beta_fast})")
        return self


class AttentionConfig(StrictModel):
    """Grouped-query attention with rotary position embeddings."""

    n_heads: int = Field(..., ge=1, description="Query heads.")
    n_kv_heads: int = Field(..., ge=1, description="Key/value heads; must divide n_heads.")
    head_dim: int | None = Field(None, ge=1, description="Per-head width; default d_model // n_heads.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base.")
    rope_scaling: RopeScalingConfig | None = Field(
        None, description="RoPE scaling (context extension); None: plain RoPE. Changes no tensor: a checkpoint "
        "trained without it loads with it (train.init_from).",
    )
    qk_norm: bool = Field(False, description="RMSNorm on per-head queries and keys.")
    rope: bool = Field(True, description="Rotary position embedding on queries and keys; false: none (NoPE, "
                       "as Granite 4.0-H's position_embedding_type 'nope'), order comes from the Mamba2 layers.")


class ScalesConfig(StrictModel):
    """Constant multipliers of the forward (muP-style; Granite 4.0-H's). The defaults are the plain math."""

    embedding: float = Field(1.0, gt=0, description="Token embeddings are multiplied by this.")
    residual: float = Field(1.0, gt=0, description="Every mixer and MLP output is multiplied by this before "
                            "it is added to the residual stream.")
    attention: float | None = Field(None, gt=0, description="Softmax scale of attention (q.k multiplier); "
                                    "None: 1 / sqrt(head_dim).")
    logits_divisor: float = Field(1.0, gt=0, description="Logits are divided by this (Granite's logits_scaling).")

    @property
    def is_default(self) -> bool:
        return self == ScalesConfig()


class RoutedConfig(StrictModel):
    """The routed hybrid's router (pattern letter `R`, model/mixers/routed.py)."""

    capacity: float = Field(0.15, gt=0.0, le=1.0, description="Most tokens (fraction of each document's "
                            "prefix) that also pass through attention.")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Router score above which a token asks for attention.")


class GatedConfig(StrictModel):
    """The gated memory hybrid (pattern letter `G`, model/mixers/gated.py)."""

    slots: int = Field(0, ge=0, description="Learned memory slots read by every token (0 = no memory bank).")


class HierarchicalConfig(StrictModel):
    """The hierarchical-state block (pattern letter `H`, model/mixers/hierarchical.py)."""

    span: int | None = Field(None, ge=1, description="Tokens per span: the slow state takes one pooled summary "
                             "per completed span (default: mamba.chunk_size).")
    width: int | None = Field(None, ge=1, description="Channels of the slow state (default: d_model).")


class ModelConfig(StrictModel):
    """Architecture of a strategic-placement hybrid. Shapes: d_model channels, vocab tokens."""

    preset: str | None = Field(None, description="Preset the values came from (informational).")
    vocab_size: int = Field(32000, ge=2, description="Tokenizer vocabulary; padded to 128 for the embedding.")
    d_model: int = Field(..., ge=8)
    n_layers: int = Field(..., ge=1)
    pattern: str | None = Field(None, description="One letter per layer, a block type each (`python -m model list`).")
    attn_ratio: float = Field(0.125, ge=0.0, le=1.0, description="Attention share when pattern is unset.")
    ffn_hidden: int = Field(..., ge=1, description="MLP hidden width.")
    mlp: str = Field("swiglu", description="MLP kind of every block (`python -m model list`: swiglu, gelu).")
    attention: AttentionConfig
    mamba: MambaConfig = MambaConfig()
    routed: RoutedConfig = RoutedConfig()
    gated: GatedConfig = GatedConfig()
    hierarchical: HierarchicalConfig = HierarchicalConfig()
    bridges: bool = Field(False, description="Gated bridges between the pathways (model/bridges.py): each attention "
                          "block's input receives a projection of the nearest preceding Mamba2 block's output, and "
                          "each Mamba2 block right after an attention block one of that block's output; the gates "
                          "start closed.")
    scales: ScalesConfig = ScalesConfig()
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = False
    max_seq_len: int = Field(8192, ge=1, description="Longest sequence the model is trained/served at.")
    init_std: float | None = Field(None, gt=0, description="Weight init std; default sqrt(2 / (5 d_model)).")
    impl: Literal["auto", "reference", "kernels"] = Field(
        "auto", description="Execution path: auto = kernels on CUDA when installed, else reference."
    )
    attn_backend: Literal["auto", "sdpa", "flash", "flex"] = Field(
        "auto", description="Attention kernel on the kernel path (auto: SDPA, flash-attn varlen for packed docs; "
        "flex: FlexAttention with a document mask for packed docs)."
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            from model.presets import (
                preset_values,  # late import: presets import this module
            )

            data = deep_merge(preset_values(data["preset"]), data)
        return data

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        att = self.attention
        if self.d_model % att.n_heads and att.head_dim is None:
            raise ValueError(
                f"attention.n_heads ({att.n_heads}) must divide d_model ({self.d_model}) "
                "or attention.head_dim must be set"
            )
        if att.n_heads % att.n_kv_heads:
            raise ValueError(
                f"attention.n_kv_heads ({att.n_kv_heads}) must divide attention.n_heads ({att.n_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"attention.head_dim ({self.head_dim}) must be even for RoPE "
                "(set attention.head_dim or change attention.n_heads)"
            )
        m = self.mamba
        if self.d_inner % m.headdim:
            raise ValueError(
                f"mamba.headdim ({m.headdim}) must divide mamba.expand * d_model ({self.d_inner})"
            )
        if self.n_ssm_heads % m.n_groups:
            raise ValueError(
                f"mamba.n_groups ({m.n_groups}) must divide the number of SSM heads ({self.n_ssm_heads})"
            )
        from model.mlps import mlp_type  # late: the registries' modules import this one

        try:
            mlp_type(self.mlp)
        except ValueError as exc:
            raise ValueError(f"mlp is an {exc}") from None
        if self.pattern is not None:
            from model.mixers import block_type

            for letter in sorted(set(self.pattern)):
                try:
                    block_type(letter)
                except ValueError as exc:
                    raise ValueError(f"pattern has {exc}") from None
            if len(self.pattern) != self.n_layers:
                raise ValueError(
                    f"pattern length ({len(self.pattern)}) must equal n_layers ({self.n_layers})"
                )
        return self

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def layer_pattern(self) -> str:
        """Resolved layout, one char per layer (explicit pattern or the placement rule)."""
        return self.pattern if self.pattern is not None else strategic_pattern(self.n_layers, self.attn_ratio)

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def head_dim(self) -> int:
        return self.attention.head_dim or self.d_model // self.attention.n_heads

    @property
    def d_inner(self) -> int:
        return self.mamba.expand * self.d_model

    @property
    def n_ssm_heads(self) -> int:
        return self.d_inner // self.mamba.headdim

    @property
    def conv_dim(self) -> int:
        """Channels through the depthwise conv: x, B and C."""
        return self.d_inner + 2 * self.mamba.n_groups * self.mamba.d_state

    @property
    def d_in_proj(self) -> int:
        """in_proj output width, ordered [z, x, B, C, dt] as in mamba_ssm."""
        return 2 * self.d_inner + 2 * self.mamba.n_groups * self.mamba.d_state + self.n_ssm_heads

    @property
    def span(self) -> int:
        """Tokens per span of the hierarchical block's slow state."""
        return self.hierarchical.span or self.mamba.chunk_size

    @property
    def slow_width(self) -> int:
        """Channels of the hierarchical block's slow state."""
        return self.hierarchical.width or self.d_model

    def extensions(self) -> list[str]:
        """The options set here that no export format expresses (`--set` form), in config order."""
        on = {"model.bridges=true": self.bridges,
              f"model.mamba.state_compression={self.mamba.state_compression}": self.mamba.state_compression > 1}
        return [k for k, v in on.items() if v]

    @property
    def resolved_init_std(self) -> float:
        return self.init_std if self.init_std is not None else math.sqrt(2.0 / (5.0 * self.d_model))


def strategic_pattern(n_layers: int, attn_ratio: float) -> str:
    """Strategic placement: where attention goes in a stack of `n_layers` blocks.

    n_attn = round(attn_ratio * n_layers) attention blocks are split into three groups:
      - early: 1 block (2 once n_attn >= 5) at layers 1(, 2). Layer 0 stays Mamba2 so every token
        has local, ordered context (conv + scan) before the first global mixing;
      - top: 1 block (2 once n_attn >= 4, 3 once n_attn >= 7) ending at layer n_layers - 2: the
        last layer stays Mamba2, mirroring the bottom;
      - middle: the rest, evenly spaced strictly between the early and top groups
        (position = round(lo + (hi - lo) * (i + 1) / (n_mid + 1))).
    Everything else is Mamba2. Degenerate cases: n_attn == 0 gives all `M`; n_attn >= n_layers - 1
    leaves no room for the Mamba2 ends and gives n_attn attention blocks from the top down.
    Deterministic: the same (n_layers, attn_ratio) always gives the same string.
    """
    n_attn = int(round(attn_ratio * n_layers + 1e-9))
    n_attn = max(0, min(n_attn, n_layers))
    layers = [MAMBA] * n_layers
    if n_attn == 0:
        return "".join(layers)
    if n_attn >= n_layers - 1:
        for i in range(n_attn):
            layers[n_layers - 1 - i] = ATTENTION
        return "".join(layers)
    n_early = 2 if n_attn >= 5 else 1
    n_top = 0 if n_attn == 1 else (1 if n_attn <= 3 else (2 if n_attn <= 6 else 3))
    n_mid = n_attn - n_early - n_top
    early = list(range(1, 1 + n_early))
    top = list(range(n_layers - 1 - n_top, n_layers - 1))
    lo, hi = early[-1], (top[0] if top else n_layers - 1)
    mid = [int(round(lo + (hi - lo) * (i + 1) / (n_mid + 1))) for i in range(n_mid)]
    # hi - lo >= n_mid + 1 because n_attn <= n_layers - 2, so the middle spacing is >= 1: the rounded
    # positions are distinct and strictly between the early and top groups.
    chosen = set(early) | set(top) | set(mid)
    for i in chosen:
        layers[i] = ATTENTION
    return "".join(layers)
