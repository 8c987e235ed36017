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

`chunked_token_nll` (train.loss_chunk_tokens) runs the LM head and either path a chunk of tokens at a
time and recomputes each chunk's logits in the backward, so the logits never exist whole: at 131,072
tokens x 32K vocabulary they would be 8 GB in bf16, plus their gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from model.kernels import cross_entropy_ops
from model.wgrad import weight_grad

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


class _ChunkedHeadNLL(torch.autograd.Function):
    """Per-target NLL of the LM head `h @ weight[:vocab]^T` computed `chunk` tokens at a time; the
    backward recomputes each chunk's logits (one more head GEMM per chunk) instead of keeping them.
    Liger's and torchtune's chunked cross-entropy compute the gradient in the forward instead, which
    needs a scalar loss; this one takes any upstream gradient per target, as `token_nll` does."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab: int, chunk: int,
                impl: str, ignore_index: int) -> torch.Tensor:
        ctx.save_for_backward(h, weight, labels)
        ctx.vocab, ctx.chunk, ctx.impl, ctx.ignore_index = vocab, chunk, impl, ignore_index
        flat_h, flat_labels, head = h.flatten(0, -2), labels.flatten(), weight[:vocab]
        nll = [token_nll(F.linear(flat_h[s:s + chunk], head), flat_labels[s:s + chunk], impl, ignore_index)
               for s in range(0, flat_labels.numel(), chunk)]
        return torch.cat(nll).view(labels.shape)

    @staticmethod
    def backward(ctx: Any, grad_nll: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weight, labels = ctx.saved_tensors
        chunk, vocab = ctx.chunk, ctx.vocab
        flat_h, flat_labels, flat_grad = h.flatten(0, -2), labels.flatten(), grad_nll.flatten()
        head = weight[:vocab]
        grad_h = torch.empty_like(flat_h)
        # weight gradient summed over chunks in float32 (float64 stays float64), as one GEMM would
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device)
        bound = getattr(weight, "main_grad", None) is not None
        for s in range(0, flat_labels.numel(), chunk):
            hc = flat_h[s:s + chunk]
            logits = F.linear(hc, head).detach().requires_grad_(True)  # (n, vocab), a leaf: only its gradient is needed
            with torch.enable_grad():
                nll = token_nll(logits, flat_labels[s:s + chunk], ctx.impl, ctx.ignore_index)
                (grad_logits,) = torch.autograd.grad(nll, logits, flat_grad[s:s + chunk])
            grad_h[s:s + chunk] = grad_logits @ head
            padded = F.pad(grad_logits, (0, weight.shape[0] - vocab))  # padding rows of the head: zero gradient
            part = weight_grad(weight, padded, hc)  # None: added into the bound main_grad
            if not bound:
                grad_w += part
        return (grad_h.view_as(h), None if bound else grad_w.to(weight.dtype), None, None, None, None, None)


def chunked_token_nll(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int, chunk: int,
                      impl: str = "reference", ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """`token_nll` of the logits `h @ weight[:vocab_size]^T` without the (tokens x vocab) logits ever
    existing whole: h (b, l, d) final hidden states, weight (padded vocab, d) the head, labels (b, l)
    -> (b, l). At most `chunk` tokens' logits exist at a time, in the forward and again in the backward.
    Same values as the unchunked head and loss; `impl` picks the fused or reference loss per chunk."""
    return _ChunkedHeadNLL.apply(h, weight, labels, vocab_size, chunk, impl, ignore_index)
