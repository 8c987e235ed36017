"""Closed-form parameter and FLOP counts for a `ModelConfig`.

Parameter counts are exact (tests compare them with an instantiated model for every preset).
FLOP counts are model FLOPs (what the math needs, not what a kernel re-computes), used for MFU:

  forward FLOPs per token =
      2 * (matmul weights touched per token: every Linear in every block + the LM head)
    + attention layers:  2 * 2 * n_heads * head_dim * s_eff    (QK^T and PV; causal, so s_eff = (s+1)/2)
    + Mamba2 layers (SSD, chunk Q, heads H, headdim P, state N, groups G):
          2 * Q_eff * (G * N + H * P)   intra-chunk C B^T and its product with X (causal, Q_eff=(Q+1)/2)
        + 2 * 2 * H * P * N             chunk states B^T X and the state read-out C h
        + 2 * d_conv * conv_dim         depthwise conv
  training FLOPs per token = 3 * forward (backward costs two forwards).
Embedding lookups, norms, activations and the softmax are not counted (standard practice: they are
memory-bound and < 1% of the total for the presets here).
"""

from __future__ import annotations

from model.config import ATTENTION, MAMBA, ModelConfig


def mamba_mixer_params(cfg: ModelConfig) -> int:
    """in_proj + conv1d (+bias) + dt_bias + A_log + D + gated-norm weight + out_proj."""
    m = cfg.mamba
    conv = cfg.conv_dim * m.d_conv + (cfg.conv_dim if m.conv_bias else 0)
    per_head = 3 * cfg.n_ssm_heads  # dt_bias, A_log, D
    return cfg.d_model * cfg.d_in_proj + conv + per_head + cfg.d_inner + cfg.d_inner * cfg.d_model


def attention_mixer_params(cfg: ModelConfig) -> int:
    """q, k, v, o projections (no biases) + optional per-head q/k norm weights."""
    a, hd = cfg.attention, cfg.head_dim
    qo = 2 * cfg.d_model * a.n_heads * hd
    kv = 2 * cfg.d_model * a.n_kv_heads * hd
    return qo + kv + (2 * hd if a.qk_norm else 0)


def mlp_params(cfg: ModelConfig) -> int:
    """SwiGLU: gate, up (d_model -> ffn) and down (ffn -> d_model)."""
    return 3 * cfg.d_model * cfg.ffn_hidden


def block_params(cfg: ModelConfig, kind: str) -> int:
    """One block: mixer norm + mixer + MLP norm + MLP."""
    mixer = mamba_mixer_params(cfg) if kind == MAMBA else attention_mixer_params(cfg)
    return 2 * cfg.d_model + mixer + mlp_params(cfg)


def embedding_params(cfg: ModelConfig) -> int:
    """Input embedding plus the LM head when untied (both padded-vocab x d_model)."""
    emb = cfg.padded_vocab_size * cfg.d_model
    return emb if cfg.tie_embeddings else 2 * emb


def count_params(cfg: ModelConfig, include_embedding: bool = True) -> int:
    """Total parameters; `include_embedding=False` drops the embedding and untied head."""
    blocks = sum(block_params(cfg, kind) for kind in cfg.layer_pattern)
    body = blocks + cfg.d_model  # final norm
    return body + (embedding_params(cfg) if include_embedding else 0)


def _matmul_weights(cfg: ModelConfig, kind: str) -> int:
    if kind == ATTENTION:
        return attention_mixer_params(cfg) + mlp_params(cfg)
    return cfg.d_model * cfg.d_in_proj + cfg.d_inner * cfg.d_model + mlp_params(cfg)


def ssd_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one Mamba2 layer's scan and conv (the terms in the module docstring)."""
    m = cfg.mamba
    q_eff = (min(m.chunk_size, seq_len) + 1) / 2
    return (
        2 * q_eff * (m.n_groups * m.d_state + cfg.n_ssm_heads * m.headdim)
        + 4 * cfg.n_ssm_heads * m.headdim * m.d_state
        + 2 * m.d_conv * cfg.conv_dim
    )


def attention_core_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one attention layer's QK^T and PV (causal: s_eff = (s + 1) / 2)."""
    return 4.0 * cfg.attention.n_heads * cfg.head_dim * (seq_len + 1) / 2


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token at sequence length `seq_len`, split by where they are spent."""
    pattern = cfg.layer_pattern
    head = cfg.padded_vocab_size * cfg.d_model
    return {
        "matmul": 2.0 * (sum(_matmul_weights(cfg, k) for k in pattern) + head),
        "attention": pattern.count(ATTENTION) * attention_core_flops_per_token(cfg, seq_len),
        "ssd": pattern.count(MAMBA) * ssd_flops_per_token(cfg, seq_len),
    }


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward = 3 x forward)."""
    return 3.0 * sum(forward_flops_per_token(cfg, seq_len).values())
