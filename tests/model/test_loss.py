"""model/loss.py: per-target NLL against a float64 log-softmax written out, ignored targets, and which
path runs. The fused Triton kernel itself runs in test_kernels_interpreted.py (Triton's CPU
interpreter, fp16) and on the GPU (bench/block_costs.py, head_loss rows: loss and gradient error
against float64 in bf16)."""

from __future__ import annotations

import pytest
import torch

from model import loss as loss_mod
from model.loss import IGNORE_INDEX, mean_nll, token_nll, use_fused


def _logits_labels(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 11, generator=g)).to(dtype)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = IGNORE_INDEX
    return logits, labels


def _float64_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logsumexp - target logit, in float64, 0 at ignored targets."""
    x = logits.double()
    safe = labels.clamp_min(0)
    nll = torch.logsumexp(x, -1) - x.gather(-1, safe[..., None])[..., 0]
    return nll.masked_fill(labels == IGNORE_INDEX, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_nll_matches_float64(dtype: torch.dtype) -> None:
    """float32 statistics over the given logits: within 1e-5 relative of float64 on the same values."""
    logits, labels = _logits_labels(dtype)
    nll = token_nll(logits, labels)
    assert nll.shape == labels.shape and nll.dtype == torch.float32
    torch.testing.assert_close(nll.double(), _float64_nll(logits, labels), rtol=1e-5, atol=1e-6)
    assert (nll[labels == IGNORE_INDEX] == 0).all()


def test_mean_nll_is_cross_entropy_over_kept_targets() -> None:
    logits, labels = _logits_labels(torch.float64)
    keep = labels != IGNORE_INDEX
    want = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    got = mean_nll(logits, labels)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_fused_path_needs_cuda_half_logits_and_the_kernel_path() -> None:
    bf16 = torch.zeros(1, 2, 3, dtype=torch.bfloat16)
    assert not use_fused(bf16, "kernels")  # CPU logits
    assert not use_fused(bf16.float(), "kernels")
    assert not use_fused(bf16, "reference")


def test_fused_branch_hands_flat_logits_and_reshapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused branch calls flash-attn's contract (flat (n, vocab) logits, (n,) labels, ignore_index,
    in-place backward) and returns (b, l): here with a torch stand-in of that contract."""
    calls = []

    def stand_in(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, inplace_backward: bool):
        calls.append((tuple(logits.shape), tuple(labels.shape), ignore_index, inplace_backward))
        nll = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
        return nll, torch.zeros_like(nll)

    monkeypatch.setattr(loss_mod, "use_fused", lambda logits, impl: True)
    monkeypatch.setattr(loss_mod, "cross_entropy_ops", lambda: stand_in)
    logits, labels = _logits_labels()
    nll = token_nll(logits, labels, "kernels")
    assert calls == [((10, 11), (10,), IGNORE_INDEX, True)]
    torch.testing.assert_close(nll.double(), _float64_nll(logits, labels), rtol=1e-5, atol=1e-6)


# ---- chunked head + loss ------------------------------------------------------------------------------
def _head_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 hidden states (2, 7, 8), a head padded to 16 rows for a vocabulary of 11, labels with ignored targets."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 7, 8, dtype=torch.float64, generator=g)
    w = torch.randn(16, 8, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[0, :3] = IGNORE_INDEX
    labels[1, 6] = IGNORE_INDEX
    return h, w, labels


def _head_reference(h, w, labels, upstream):
    """Unchunked: logits of the padded head, padding columns dropped, token_nll, then backward."""
    h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    nll = token_nll(torch.nn.functional.linear(h, w)[..., :11], labels)
    (nll * upstream).sum().backward()
    return nll.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 3, 5, 14, 100])
def test_chunked_head_nll_exact(chunk: int) -> None:
    """Values and gradients (h and head, padding rows zero) of the chunked head + loss equal the
    unchunked ones to 1e-10 relative in float64, for any upstream gradient per target."""
    h, w, labels = _head_inputs()
    upstream = torch.rand(2, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    want_nll, want_h, want_w = _head_reference(h, w, labels, upstream)
    hc, wc = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    nll = loss_mod.chunked_token_nll(hc, wc, labels, 11, chunk)
    (nll * upstream).sum().backward()
    assert nll.dtype == torch.float64 and (nll[labels == IGNORE_INDEX] == 0).all()
    torch.testing.assert_close(nll, want_nll, rtol=1e-10, atol=0)
    torch.testing.assert_close(hc.grad, want_h, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(wc.grad, want_w, rtol=1e-10, atol=1e-14)
    assert (wc.grad[11:] == 0).all()


def test_chunked_head_nll_fused_path_and_main_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each chunk goes through the fused branch (here a float64 torch stand-in of flash-attn's contract),
    once in the forward and once in the backward; a head weight with a bound `main_grad` (model/wgrad.py)
    gets its gradient added there and none through autograd."""
    calls = []

    def stand_in(logits, labels, ignore_index, inplace_backward):
        calls.append(tuple(logits.shape))
        nll = torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
        return nll, torch.zeros_like(nll)

    monkeypatch.setattr(loss_mod, "use_fused", lambda logits, impl: True)
    monkeypatch.setattr(loss_mod, "cross_entropy_ops", lambda: stand_in)
    h, w, labels = _head_inputs()
    upstream = torch.ones(2, 7, dtype=torch.float64)
    want_nll, want_h, want_w = _head_reference(h, w, labels, upstream)
    calls.clear()
    hc, wc = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    wc.main_grad = torch.full_like(w, 0.5)
    nll = loss_mod.chunked_token_nll(hc, wc, labels, 11, 6, "kernels")
    nll.sum().backward()
    assert calls == [(6, 11), (6, 11), (2, 11)] * 2
    torch.testing.assert_close(nll, want_nll, rtol=1e-10, atol=0)
    torch.testing.assert_close(hc.grad, want_h, rtol=1e-10, atol=1e-14)
    assert wc.grad is None
    torch.testing.assert_close(wc.main_grad - 0.5, want_w, rtol=1e-10, atol=1e-14)


def test_model_loss_chunked_same_loss_and_grads(tiny_model) -> None:
    """HybridLM.loss with loss_chunk_tokens: the same loss and gradients as the whole logits (float64, 1e-10)."""
    model = tiny_model(pattern="MA")
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=g)
    labels = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=g)
    labels[1, :4] = IGNORE_INDEX
    results = []
    for chunk in (0, 4):
        model.zero_grad()
        loss = model.loss(ids, labels, loss_chunk_tokens=chunk)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (loss_ref, grads_ref), (loss, grads) = results
    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=0)
    for name, g_ref in grads_ref.items():
        torch.testing.assert_close(grads[name], g_ref, rtol=1e-10, atol=1e-14, msg=name)
