"""RoPE scaling (model.attention.rope_scaling) against transformers' modeling_rope_utils: the cos/sin
tables of each type within 1e-6, and the scaled model's attention layers really use them."""

from __future__ import annotations

import pytest
import torch

from model import ModelConfig
from model.config import RopeScalingConfig
from model.layers import RotaryEmbedding

HEAD_DIM, THETA, ORIGINAL = 64, 10000.0, 1024


def _hf_tables(rope_type: str, params: dict, positions: torch.Tensor, seq_len: int | None = None):
    """cos, sin of transformers' rope init function for `rope_type`, as its rotary embeddings compute them."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, head_dim=HEAD_DIM,
                      max_position_embeddings=ORIGINAL * 4 if rope_type != "dynamic" else ORIGINAL,
                      rope_parameters={"rope_type": rope_type, "rope_theta": THETA, **params})
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"), seq_len=seq_len)
    freqs = positions.float().unsqueeze(-1) * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scale, emb.sin() * scale


@pytest.mark.parametrize("kind, factor", [("linear", 4.0), ("ntk", 4.0), ("yarn", 4.0), ("yarn", 16.0)])
def test_tables_match_transformers(kind: str, factor: float) -> None:
    """linear and yarn against transformers' own types; static ntk against transformers' dynamic NTK
    at the scale it reaches at factor x the original length (its base multiplier (f s / L - (f - 1))
    with f = 1, s = factor L, i.e. factor^(k / (k - 2)))."""
    positions = torch.tensor([[0, 1, 7, 1023, 1024, 4095, 16383, 65535]])
    scaling = RopeScalingConfig(type=kind, factor=factor, original_max_seq_len=ORIGINAL)
    cos, sin = RotaryEmbedding(HEAD_DIM, THETA, scaling)(positions, torch.float32)
    if kind == "ntk":
        want = _hf_tables("dynamic", {"factor": 1.0}, positions, seq_len=int(factor * ORIGINAL))
    elif kind == "linear":
        want = _hf_tables("linear", {"factor": factor}, positions)
    else:
        want = _hf_tables("yarn", {"factor": factor, "original_max_position_embeddings": ORIGINAL,
                                   "beta_fast": 32.0, "beta_slow": 1.0}, positions)
    # float32 angles up to 65,535 radians: 1e-6 relative of the angle is ~4e-3 absolute on cos/sin;
    # same formulas give the same float32 angles, so the tables agree far closer
    torch.testing.assert_close(cos, want[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, want[1], rtol=0, atol=1e-6)
    plain = RotaryEmbedding(HEAD_DIM, THETA)(positions, torch.float32)
    assert not torch.allclose(cos, plain[0], atol=1e-3)  # the scaling changed something


def test_scaled_model_logits_change_only_through_attention(tiny_model) -> None:
    """A model with rope_scaling gives other logits than without (same weights) when it has attention
    layers; an all-Mamba2 model is unaffected."""
    ids = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(0))
    scaling = {"rope_scaling": {"type": "linear", "factor": 2.0, "original_max_seq_len": 8}}
    for pattern, differs in (("MA", True), ("MM", False)):
        plain = tiny_model(pattern=pattern)
        scaled = tiny_model(pattern=pattern, attention=scaling)
        scaled.load_state_dict(plain.state_dict())
        with torch.no_grad():
            assert torch.equal(plain(ids), scaled(ids)) != differs


def test_config_validates() -> None:
    with pytest.raises(ValueError, match="beta_slow"):
        RopeScalingConfig(type="yarn", factor=2, original_max_seq_len=8, beta_fast=1, beta_slow=2)
    cfg = ModelConfig(preset="tiny", attention={"n_heads": 4, "n_kv_heads": 2,
                                                "rope_scaling": {"type": "ntk", "factor": 8, "original_max_seq_len": 1024}})
    assert cfg.attention.rope_scaling.type == "ntk"
