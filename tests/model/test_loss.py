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
