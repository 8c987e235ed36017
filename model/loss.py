"""Next-token cross-entropy per target: one function for the model, the trainer and the benchmarks.

Two paths with the same result (float32 statistics over the logits, targets equal to `ignore_index`
score 0):
  reference  torch: the logits cast to float32 (float64 stays float64), then F.cross_entropy. At 8,192
             tokens x 32K vocab that writes and reads a 1 GB float32 copy of the logits several times
             (forward, log-softmax, its backward, the cast back).
  fused      flash-attn's Triton cross-entropy (flash_attn.ops.triton.cross_entropy): one pass over the
             bf16 logits computes the loss and logsumexp in float32, and the backward writes the
             gradient into the logits' own buffer (`inplace_backward`), so no float32 copy exists.
             Used for bf16/fp16 logits on CUDA when the model runs its kernel path.
The logits handed to `token_nll` must not be read again after the backward (the fused path overwrites
them with their gradient): every caller computes them for the loss alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.kernels import cross_entropy_ops

IGNORE_INDEX = -100


def use_fused(logits: torch.Tensor, impl: str) -> bool:
    """Whether `token_nll` takes the fused path for these logits on a model running `impl`."""
    return (impl == "kernels" and logits.is_cuda and logits.dtype in (torch.bfloat16, torch.float16)
            and cross_entropy_ops() is not None)


def token_nll(logits: torch.Tensor, labels: torch.Tensor, impl: str = "reference",
              ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Negative log-likelihood of each target: logits (b, l, vocab), labels (b, l) long (already
    shifted) -> (b, l) float32 (float64 for float64 logits), 0 where labels == ignore_index."""
    flat_logits, flat_labels = logits.flatten(0, -2), labels.flatten()
    if use_fused(logits, impl):
        nll, _ = cross_entropy_ops()(flat_logits, flat_labels, ignore_index=ignore_index, inplace_backward=True)
    else:
        wide = flat_logits.to(torch.promote_types(logits.dtype, torch.float32))
        nll = F.cross_entropy(wide, flat_labels, ignore_index=ignore_index, reduction="none")
    return nll.view(labels.shape)


def mean_nll(logits: torch.Tensor, labels: torch.Tensor, impl: str = "reference",
             ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean of `token_nll` over the targets != ignore_index (nan when there are none, as F.cross_entropy)."""
    nll = token_nll(logits, labels, impl, ignore_index)
    return nll.sum() / (labels != ignore_index).sum()
