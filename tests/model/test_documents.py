"""DocumentLayout: the per-batch document boundaries every layer shares."""

from __future__ import annotations

import pytest
import torch

from model import DocumentLayout, positions_from_seq_idx
from model.layers import RMSNorm, ResidualRMSNorm


def test_boundaries_of_a_packed_batch() -> None:
    # row 0: documents of 3, 1 and 4 tokens; row 1: one document of 8 tokens
    seq_idx = torch.tensor([[0, 0, 0, 1, 2, 2, 2, 2], [0] * 8])
    docs = DocumentLayout.build(seq_idx, torch.device("cpu"), boundaries=True)
    assert docs is not None
    assert docs.cu_seqlens.tolist() == [0, 3, 4, 8, 16]
    assert docs.cu_seqlens.dtype == torch.int32 and docs.seq_idx.dtype == torch.int32
    assert docs.max_seqlen == 8
    assert docs.seq_idx.is_contiguous() and torch.equal(docs.seq_idx.long(), seq_idx)


def test_single_document_rows_need_no_boundaries() -> None:
    seq_idx = torch.zeros(3, 16, dtype=torch.long)
    assert DocumentLayout.build(seq_idx, torch.device("cpu"), boundaries=True) is None
    # the reference path keeps seq_idx as given and does no host work
    plain = DocumentLayout.build(seq_idx, torch.device("cpu"), boundaries=False)
    assert plain is not None and plain.cu_seqlens is None and plain.seq_idx is seq_idx


def test_positions_restart_per_document() -> None:
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 2]])
    assert positions_from_seq_idx(seq_idx).tolist() == [[0, 1, 0, 1, 2, 0]]


def test_residual_norm_is_residual_add_then_norm() -> None:
    torch.manual_seed(0)
    norm = ResidualRMSNorm(16).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, r = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    out, res = norm(x, r)
    assert torch.equal(res, x + r)
    ref = (x + r) / torch.sqrt(((x + r) ** 2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    first, res0 = norm(x, None)  # first block: the stream is x itself
    assert res0 is x
    torch.testing.assert_close(first, RMSNorm.forward(norm, x), rtol=0, atol=0)


@torch.no_grad()  # FlexAttention has no CPU backward; the forward checks the document mask itself
@pytest.mark.slow
def test_flex_document_mask_matches_the_reference_mask() -> None:
    """attn_backend=flex (kernel path) against the reference boolean mask, float32, same weights."""
    from model import ModelConfig
    from model.attention import Attention
    from model.layers import RotaryEmbedding

    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", attn_backend="flex")
    attn = Attention(cfg, 0)
    x = torch.randn(2, 64, cfg.d_model)
    seq_idx = torch.tensor([[0] * 20 + [1] * 30 + [2] * 14, [0] * 63 + [1]])  # incl. a 1-token document
    rope = RotaryEmbedding(cfg.head_dim, cfg.attention.rope_theta)(positions_from_seq_idx(seq_idx), x.dtype)
    ref = attn.attend(x, rope, docs=DocumentLayout.build(seq_idx, x.device, boundaries=False))
    attn.impl = "kernels"
    flex = attn.attend(x, rope, docs=DocumentLayout.build(seq_idx, x.device, boundaries=True))
    torch.testing.assert_close(flex, ref, rtol=1e-5, atol=1e-5)
