"""Mamba2 mixer (reference path) on packed documents, and the document-aware causal conv.

Tolerance: float64, relative error < 1e-10 (see tests/model/test_ssd.py for why).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.mamba2 import Mamba2Mixer, causal_conv1d_ref
from model.mixers import MixerContext

TOL = 1e-10
DOC_LENGTHS = [6, 1, 9, 3, 5]  # chunk 4: 6, 9, 3, 5 are not multiples; one length-1 document


@pytest.fixture
def mixer(tiny_config, randomize_vectors) -> Mamba2Mixer:
    torch.manual_seed(0)
    m = Mamba2Mixer(tiny_config(), layer_idx=0).double()
    randomize_vectors(m, 1)
    assert m.n_groups == 2 and m.chunk_size == 4
    return m


def _bounds(lengths: list[int]) -> list[tuple[int, int]]:
    ends = torch.tensor(lengths).cumsum(0).tolist()
    return [(e - n, e) for n, e in zip(lengths, ends)]


def _param_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in module.named_parameters()}


def test_packed_equals_unpacked_outputs_and_gradients(mixer, doc_seq_idx, rel_err) -> None:
    g = torch.Generator().manual_seed(2)
    total = sum(DOC_LENGTHS)
    u = torch.randn(1, total, 32, dtype=torch.float64, generator=g)
    w = torch.randn(1, total, 32, dtype=torch.float64, generator=g)  # loss weights: loss = <out, w>
    seq_idx = doc_seq_idx(DOC_LENGTHS)
    out_packed = mixer(u, MixerContext.of_documents(seq_idx))
    for a, b in _bounds(DOC_LENGTHS):
        out_alone = mixer(u[:, a:b])
        assert rel_err(out_packed[:, a:b], out_alone) < TOL, (a, b)

        # Gradient of this document's loss: through the packed batch vs the document alone.
        mixer.zero_grad()
        u_packed = u.clone().requires_grad_(True)
        (mixer(u_packed, MixerContext.of_documents(seq_idx))[:, a:b] * w[:, a:b]).sum().backward()
        packed = _param_grads(mixer)
        mixer.zero_grad()
        u_doc = u[:, a:b].clone().requires_grad_(True)
        (mixer(u_doc) * w[:, a:b]).sum().backward()
        alone = _param_grads(mixer)
        for name in alone:
            assert rel_err(packed[name], alone[name]) < TOL, name
        assert rel_err(u_packed.grad[:, a:b], u_doc.grad) < TOL
        # Nothing flows into the other documents' inputs (exact zeros: the masks multiply by 0).
        outside = torch.cat([u_packed.grad[:, :a], u_packed.grad[:, b:]], dim=1)
        assert outside.abs().max() == 0


def test_continuous_sequence_differs(mixer, doc_seq_idx) -> None:
    """Without seq_idx the documents mix: everything after the first boundary changes a lot."""
    u = torch.randn(1, sum(DOC_LENGTHS), 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    packed = mixer(u, MixerContext.of_documents(doc_seq_idx(DOC_LENGTHS)))
    continuous = mixer(u)
    first = DOC_LENGTHS[0]
    torch.testing.assert_close(continuous[:, :first], packed[:, :first], rtol=0, atol=1e-12)
    for a, b in _bounds(DOC_LENGTHS)[1:]:
        diff = (continuous[:, a:b] - packed[:, a:b]).norm() / packed[:, a:b].norm()
        assert diff > 1e-2, (a, b, float(diff))


@pytest.mark.parametrize("with_bias", [True, False])
def test_causal_conv_with_seq_idx_equals_per_document_conv(with_bias: bool, doc_seq_idx) -> None:
    g = torch.Generator().manual_seed(4)
    c, w = 5, 4
    x = torch.randn(2, sum(DOC_LENGTHS), c, dtype=torch.float64, generator=g)
    weight = torch.randn(c, w, dtype=torch.float64, generator=g)
    bias = torch.randn(c, dtype=torch.float64, generator=g) if with_bias else None
    seq_idx = doc_seq_idx(DOC_LENGTHS).expand(2, -1)
    y = causal_conv1d_ref(x, weight, bias, seq_idx=seq_idx)
    for a, b in _bounds(DOC_LENGTHS):
        doc = x[:, a:b].transpose(1, 2)  # (b, c, len)
        want = F.conv1d(F.pad(doc, (w - 1, 0)), weight.unsqueeze(1), bias, groups=c).transpose(1, 2)
        torch.testing.assert_close(y[:, a:b], want, rtol=0, atol=1e-13)
    # Without seq_idx: one causal conv over the whole row.
    y_cont = causal_conv1d_ref(x, weight, bias)
    want = F.conv1d(F.pad(x.transpose(1, 2), (w - 1, 0)), weight.unsqueeze(1), bias, groups=c).transpose(1, 2)
    torch.testing.assert_close(y_cont, want, rtol=0, atol=1e-13)


def test_causal_conv_prefix_continues_sequence() -> None:
    """A prefix of the w-1 earlier inputs makes a split conv equal to the unsplit one."""
    g = torch.Generator().manual_seed(5)
    c, w, k = 3, 4, 7
    x = torch.randn(1, 12, c, dtype=torch.float64, generator=g)
    weight, bias = torch.randn(c, w, dtype=torch.float64, generator=g), torch.randn(c, dtype=torch.float64, generator=g)
    full = causal_conv1d_ref(x, weight, bias)
    prefix = x[:, k - (w - 1) : k].transpose(1, 2)  # (b, c, w-1)
    torch.testing.assert_close(causal_conv1d_ref(x[:, k:], weight, bias, prefix=prefix), full[:, k:], rtol=0, atol=1e-13)
