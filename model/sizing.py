"""Closed-form parameter and FLOP counts for a `ModelConfig`.

Parameter counts are exact (tests compare them with an instantiated model for every preset).
FLOP counts are model FLOPs (what the math needs, not what a kernel re-computes), used for MFU:

  forward FLOPs per token =
      2 * (matmul weights touched per token: every Linear in every block + the LM head)
    + each mixer's own non-GEMM terms (`Mixer.core_flops`), e.g.
      attention layers:  2 * 2 * n_heads * head_dim * s_eff    (QK^T and PV; causal, so s_eff = (s+1)/2)
      Mamba2 layers (SSD, chunk Q, heads H, headdim P, state N, groups G):
          2 * Q_eff * (G * N + H * P)   intra-chunk C B^T and its product with X (causal, Q_eff=(Q+1)/2)
        + 2 * 2 * H * P * N             chunk states B^T X and the state read-out C h
        + 2 * d_conv * conv_dim         depthwise conv
  training FLOPs per token = 3 * forward (backward costs two forwards).
Every block type's terms come from its mixer class (model/mixers), the bridges' from model/bridges.py:
this module only sums them.
Embedding lookups, norms, activations and the softmax are not counted (standard practice: they are
memory-bound and < 1% of the total for the presets here).
"""

from __future__ import annotations

from model.bridges import Bridges
from model.config import ModelConfig
from model.mixers import block_type
from model.mlps import mlp_type


def mixer_params(cfg: ModelConfig, kind: str) -> int:
    """Parameters of one mixer of block type `kind` (a pattern letter)."""
    return block_type(kind).param_count(cfg)


def mlp_params(cfg: ModelConfig) -> int:
    """One MLP of the config's kind (all matmul weights; SwiGLU: gate, up d_model -> ffn, down ffn -> d_model)."""
    return mlp_type(cfg.mlp).param_count(cfg)


def block_params(cfg: ModelConfig, kind: str) -> int:
    """One block: mixer norm + mixer + MLP norm + MLP."""
    return 2 * cfg.d_model + mixer_params(cfg, kind) + mlp_params(cfg)


def embedding_params(cfg: ModelConfig) -> int:
    """Input embedding plus the LM head when untied (both padded-vocab x d_model)."""
    emb = cfg.padded_vocab_size * cfg.d_model
    return emb if cfg.tie_embeddings else 2 * emb


def count_params(cfg: ModelConfig, include_embedding: bool = True) -> int:
    """Total parameters; `include_embedding=False` drops the embedding and untied head."""
    blocks = sum(block_params(cfg, kind) for kind in cfg.layer_pattern)
    body = blocks + Bridges.param_count(cfg) + cfg.d_model  # final norm
    return body + (embedding_params(cfg) if include_embedding else 0)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token at sequence length `seq_len`, split by where they are spent
    ("matmul", and each mixer's own kinds: "attention", "ssd", ...)."""
    head = cfg.padded_vocab_size * cfg.d_model
    matmul = sum(block_type(k).matmul_params(cfg) + mlp_params(cfg) for k in cfg.layer_pattern)
    matmul += Bridges.matmul_params(cfg)
    out = {"matmul": 2.0 * (matmul + head), "attention": 0.0, "ssd": 0.0}
    for kind in cfg.layer_pattern:
        for name, flops in block_type(kind).core_flops(cfg, seq_len).items():
            out[name] = out.get(name, 0.0) + flops
    return out


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward = 3 x forward)."""
    return 3.0 * sum(forward_flops_per_token(cfg, seq_len).values())
