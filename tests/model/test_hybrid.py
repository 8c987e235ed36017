"""Full hybrid LM: packed documents behave exactly like separate sequences; RoPE positions restart.

Tolerance: float64, relative error < 1e-10 (see tests/model/test_ssd.py).
"""

from __future__ import annotations

import pytest
import torch

from model import positions_from_seq_idx

TOL = 1e-10
# Two packed rows of 19 tokens; chunk 4, so most lengths are not multiples; one length-1 document.
ROW_DOCS = [[6, 1, 9, 3], [4, 11, 4]]


def test_positions_from_seq_idx() -> None:
    seq_idx = torch.tensor([[0, 0, 0, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1], [3, 3, 3, 3, 3, 4, 4]])
    want = torch.tensor([[0, 1, 2, 0, 0, 1, 2], [0, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 0, 1]])
    got = positions_from_seq_idx(seq_idx)
    assert got.dtype == torch.long
    assert torch.equal(got, want)


def test_model_restarts_rope_positions(tiny_model, doc_seq_idx, monkeypatch) -> None:
    """Given only seq_idx, the model feeds RoPE the in-document positions."""
    model = tiny_model()
    seen = []
    original = model.rope.forward
    monkeypatch.setattr(model.rope, "forward", lambda pos, dtype: seen.append(pos) or original(pos, dtype))
    seq_idx = doc_seq_idx([3, 1, 4])
    model(torch.zeros(1, 8, dtype=torch.long), seq_idx=seq_idx)
    assert torch.equal(seen[0], torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3]]))


def _pack(lengths_per_row: list[list[int]], vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randint(0, vocab, (sum(r),), generator=g) for r in lengths_per_row])
    seq_idx = torch.stack([
        torch.cat([torch.full((n,), d, dtype=torch.long) for d, n in enumerate(r)]) for r in lengths_per_row
    ])
    return ids, seq_idx


def _doc_slices(lengths_per_row: list[list[int]]):
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for n in lengths:
            yield row, start, start + n
            start += n


@pytest.mark.parametrize("qk_norm", [False, True])
def test_packed_equals_unpacked(qk_norm: bool, tiny_model, rel_err) -> None:
    model = tiny_model(pattern="MAAM", qk_norm=qk_norm)
    vocab = model.cfg.vocab_size
    ids, seq_idx = _pack(ROW_DOCS, vocab, seed=1)
    w = torch.randn(*ids.shape, vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    logits = model(ids, seq_idx=seq_idx)
    assert logits.shape == (*ids.shape, vocab)
    (logits * w).sum().backward()
    packed = {k: p.grad.clone() for k, p in model.named_parameters()}

    model.zero_grad()
    for row, a, b in _doc_slices(ROW_DOCS):
        alone = model(ids[row : row + 1, a:b])
        assert rel_err(logits[row : row + 1, a:b], alone) < TOL, (row, a, b)
        (alone * w[row : row + 1, a:b]).sum().backward()  # grads accumulate over the documents
    for name, p in model.named_parameters():
        assert rel_err(packed[name], p.grad) < TOL, name
    if qk_norm:
        assert model.layers[1].mixer.q_norm.weight.grad.abs().max() > 0


def test_packing_matters_for_the_model(tiny_model) -> None:
    """The same tokens without seq_idx give different logits after the first boundary."""
    model = tiny_model(pattern="MAAM")
    ids, seq_idx = _pack(ROW_DOCS, model.cfg.vocab_size, seed=1)
    with torch.no_grad():
        packed, continuous = model(ids, seq_idx=seq_idx), model(ids)
    first = ROW_DOCS[0][0]
    torch.testing.assert_close(packed[0, :first], continuous[0, :first], rtol=0, atol=1e-12)
    assert (packed[0, first:] - continuous[0, first:]).abs().max() > 1e-3


def test_loss_equals_cross_entropy_of_logits(tiny_model) -> None:
    """`loss` == mean CE of the forward logits over labels != -100, in the model's float64
    (relative 1e-12: the same math, only a different reduction order). vocab 128: no padding."""
    model = tiny_model(pattern="MA", vocab_size=128)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 128, (2, 9), generator=g)
    labels = torch.randint(0, 128, (2, 9), generator=g)
    labels[:, :3] = -100
    seq_idx = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])
    with torch.no_grad():
        loss = model.loss(ids, labels, seq_idx=seq_idx)
        logits = model(ids, seq_idx=seq_idx)
    keep = labels != -100
    want = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
