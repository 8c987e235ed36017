"""Reference SSD scan: the chunked form against the token-by-token recurrence, in float64.

Tolerance: relative error < 1e-10 (float64 carries ~1e-16; the chunked and sequential forms only
reorder sums of ~20 terms, so anything above 1e-10 is a wrong formula, not rounding).
"""

from __future__ import annotations

import pytest
import torch

from model.ssd import segsum, ssd_chunked, ssd_naive, ssd_step

TOL = 1e-10
B_, L_, H, P, G, N = 2, 13, 4, 3, 2, 5  # 13 tokens: not a multiple of any chunk size below but 1 and 13

# Two rows of packed documents: row 0 has a length-1 document in the middle, row 1 has boundaries
# on chunk-4 edges and a length-1 document on one.
SEQ_IDX = torch.tensor([
    [0, 0, 0, 0, 0, 1, 2, 2, 2, 2, 2, 2, 2],
    [0, 0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 3, 3],
])


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=g)
    return {
        "x": torch.randn(B_, L_, H, P, **f64),
        "dt": torch.rand(B_, L_, H, **f64) * 0.5 + 0.05,  # positive, as after softplus
        "A": -(torch.rand(H, **f64) + 0.5),  # negative decay rates
        "B": torch.randn(B_, L_, G, N, **f64),
        "C": torch.randn(B_, L_, G, N, **f64),
        "D": torch.randn(H, **f64),
        "s0": torch.randn(B_, H, P, N, **f64),
    }


def test_segsum_matches_definition() -> None:
    x = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = segsum(x)
    for i in range(6):
        for j in range(6):
            want = x[:, j + 1 : i + 1].sum(-1) if i >= j else torch.full((2,), float("-inf"), dtype=x.dtype)
            torch.testing.assert_close(out[:, i, j], want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 13, 20])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_matches_naive(chunk: int, with_init: bool, packed: bool, rel_err) -> None:
    t = _inputs()
    s0 = t["s0"] if with_init else None
    seq = SEQ_IDX if packed else None
    y, final = ssd_chunked(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"], initial_state=s0, seq_idx=seq)
    y_ref, final_ref = ssd_naive(t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], initial_state=s0, seq_idx=seq)
    assert y.shape == (B_, L_, H, P) and final.shape == (B_, H, P, N)
    assert rel_err(y, y_ref) < TOL
    assert rel_err(final, final_ref) < TOL


def test_chunked_gradients_match_naive(rel_err) -> None:
    """Backward of the masked chunked form (exp of -inf segments, document masks) is finite and exact."""
    t = _inputs(3)
    names = ["x", "dt", "A", "B", "C", "D", "s0"]
    grads = []
    for fn in (lambda *a: ssd_chunked(*a[:5], 4, D=a[5], initial_state=a[6], seq_idx=SEQ_IDX),
               lambda *a: ssd_naive(*a[:5], D=a[5], initial_state=a[6], seq_idx=SEQ_IDX)):
        args = [t[k].clone().requires_grad_(True) for k in names]
        y, final = fn(*args)
        w = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(4))
        ((y * w).sum() + final.sum()).backward()
        grads.append([a.grad for a in args])
    for name, g_chunk, g_ref in zip(names, *grads):
        assert torch.isfinite(g_chunk).all(), name
        assert rel_err(g_chunk, g_ref) < TOL, name


def test_naive_reference_resets_at_documents(rel_err) -> None:
    """The reference itself: with seq_idx == each document run alone (initial state only for doc 0)."""
    t = _inputs(5)
    y, final = ssd_naive(t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], initial_state=t["s0"], seq_idx=SEQ_IDX)
    for row in range(B_):
        docs = SEQ_IDX[row]
        for d in docs.unique().tolist():
            sl = (docs == d).nonzero().flatten()
            a, b = int(sl[0]), int(sl[-1]) + 1
            init = t["s0"][row : row + 1] if a == 0 else None
            y_doc, f_doc = ssd_naive(*(t[k][row : row + 1, a:b] for k in ("x", "dt")), t["A"],
                                     *(t[k][row : row + 1, a:b] for k in ("B", "C")), D=t["D"], initial_state=init)
            assert rel_err(y[row : row + 1, a:b], y_doc) < TOL
        assert rel_err(final[row : row + 1], f_doc) < TOL  # final state = last document's


def test_documents_really_separate() -> None:
    """Guard against a vacuous seq_idx: packing must change the outputs after the first boundary."""
    t = _inputs()
    y_packed, _ = ssd_chunked(t["x"], t["dt"], t["A"], t["B"], t["C"], 4, D=t["D"], seq_idx=SEQ_IDX)
    y_cont, _ = ssd_chunked(t["x"], t["dt"], t["A"], t["B"], t["C"], 4, D=t["D"])
    torch.testing.assert_close(y_packed[0, :5], y_cont[0, :5], rtol=0, atol=1e-12)  # first doc: same
    assert (y_packed[0, 5:] - y_cont[0, 5:]).abs().max() > 1e-2


def test_step_repeated_matches_naive(rel_err) -> None:
    t = _inputs(7)
    state = t["s0"].clone()
    ys = []
    for i in range(L_):
        y, state = ssd_step(state, t["x"][:, i], t["dt"][:, i], t["A"], t["B"][:, i], t["C"][:, i], t["D"])
        ys.append(y)
    y_ref, final_ref = ssd_naive(t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], initial_state=t["s0"])
    assert rel_err(torch.stack(ys, 1), y_ref) < TOL
    assert rel_err(state, final_ref) < TOL


def test_chunked_keeps_input_dtype_and_fp32_state() -> None:
    t = _inputs()
    y, final = ssd_chunked(*(t[k].float() for k in ("x", "dt", "A", "B", "C")), 4, D=t["D"].float())
    assert y.dtype == torch.float32 and final.dtype == torch.float32
    y16, final16 = ssd_chunked(*(t[k].bfloat16() for k in ("x", "dt", "A", "B", "C")), 4)
    assert y16.dtype == torch.bfloat16 and final16.dtype == torch.float32  # state never below fp32
