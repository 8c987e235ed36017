"""Context parallelism: one sequence split over a group of ranks, the math its mixers run across them.

Shape legend: b batch, l tokens per rank (the slice), R ranks in the group (r this rank), L = R l the whole
sequence, c conv channels, w conv width, h SSM heads, p head channels, n state size, j kv heads, k head dim.

Rank r of the group holds tokens [r l, (r + 1) l) of every row: the embeddings, MLPs, norms and the LM
head are per token and run on the slice as they are; only the sequence mixers look across slices:

  Mamba2 conv   its first w - 1 outputs read the previous slice's last w - 1 inputs: every rank's tail is
                all-gathered (tiny: (b, c, w - 1)), and taps that belong to another document are zeroed.
  Mamba2 scan   the scan is linear in the state entering it. Each rank scans its slice from a zero state
                (the mixer's own scan, reference or kernel), then all-gathers its final state
                F_r and the decay g_r of its whole slice (0 when the slice holds a document boundary:
                nothing entering survives to its end). The state entering slice r is the prefix
                combination  S_0 = 0,  S_{r+1} = a_{r+1} (F_r + g_r S_r)  with a_r = [slice r starts
                inside the document slice r - 1 ends in] (documents never pass state). Every rank
                adds the entering state's part to its outputs: y_t += exp(sum_{s<=t} dt_s A) C_t S_r
                for the tokens of its first document. Chosen over a sequential pipeline (rank r waits
                for r - 1's state before scanning) because all ranks scan at once: one all-gather of
                (b, h, p, n) per layer, no rank idles, and the combination over R ranks is R tiny ops.
  attention     keys and values are all-gathered (K/V of every rank: (R, 2, b, j, l, k)); the queries
                of rank r attend the keys of slices 0..r under a causal mask by global position and
                a same-document mask by the global `seq_idx`. A ring exchange would overlap the
                transfers with the attention; this is the first, dense form.

Documents: `seq_idx` is all-gathered once per forward (integers, no gradient) so that every layer knows
the document of every token of the row, and RoPE positions are positions in the document over the whole
row (`ContextSlice.positions`), not in the rank's slice.

Gradients: `ContextParallel.gather` is an autograd function whose backward sums, over the group, the gradient that
every rank's outputs put on each rank's slice (reduce-scatter on NCCL; gloo has none: all-reduce, then the
rank's own part). Every rank uses what it gathered (rank 0 too, with a zero weight where nothing reaches
it), so that every rank runs each backward collective, in the same order: autograd runs one device's
ready nodes in decreasing creation order, and every rank creates its collectives in the same order.
The parameters' gradients of one rank are its slice's share; summing them over the group gives the
whole sequence's gradient (train/context_parallel.py hands DeepSpeed the group as its sequence-parallel
group, which sums over it).

Paths: the Mamba2 scan runs on the mixer's path (model/ssd.py's reference, or mamba_ssm's chunk scan kernel),
from a zero state, and `ContextSlice.add_entering_state` adds the rest; the Mamba2 conv (it reads the
previous rank's inputs) and the attention (masked SDPA over the gathered keys) run in PyTorch on both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.documents import DocumentLayout, positions_from_seq_idx
from model.ssd import _expand_groups

if TYPE_CHECKING:
    from model.attention import Attention


def _all_gather(x: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """x (...) of every rank -> (R, ...) in rank order (the list form: every backend and torch version)."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.stack(parts)


def enter_state(
    y: torch.Tensor, final: torch.Tensor, state: torch.Tensor, log_decay: torch.Tensor, C: torch.Tensor,
    seq_idx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A slice's scan from a zero state (y (b, l, h, p), final (b, h, p, n)) continued from `state` (b, h, p, n),
    the state entering it: y_t += exp(log_decay_t) C_t state for the tokens of the slice's first document, and
    the final state gains the decayed `state` when the slice is one document. log_decay (b, l, h): the
    inclusive cumulative sum of dt A over the slice; C (b, l, g, n); seq_idx (b, l) or None."""
    work = final.dtype
    reach = torch.exp(log_decay)  # (b, l, h)
    carries = torch.ones_like(reach[:, 0, :1])  # (b, 1): the state reaches the slice's end
    if seq_idx is not None:  # the entering state feeds the slice's first document only
        reach = reach * (seq_idx == seq_idx[:, :1]).unsqueeze(-1).to(work)
        carries = (seq_idx[:, -1:] == seq_idx[:, :1]).to(work)
    y_in = torch.einsum("blhn,bhpn,blh->blhp", _expand_groups(C.to(work), y.size(2)), state, reach)
    carry_out = torch.exp(log_decay[:, -1]) * carries  # (b, h)
    return (y.to(work) + y_in).to(y.dtype), final + carry_out[..., None, None] * state


class _GatherSlices(torch.autograd.Function):
    """x (...) on every rank -> (R, ...) stacked in rank order; backward: the group's summed gradient of
    this rank's entry."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, size: int, rank: int) -> torch.Tensor:
        ctx.group, ctx.rank = group, rank
        return _all_gather(x, group, size)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        grad = grad.contiguous().clone()  # the collectives write in place; autograd may share `grad`
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = grad.new_empty(grad.shape[1:])
            dist.reduce_scatter(out, list(grad.unbind(0)), group=ctx.group)
            return out, None, None, None
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None, None, None


@dataclass(frozen=True)
class ContextParallel:
    """A group of `size` ranks that splits every sequence into consecutive slices; this process holds
    slice `rank`. Set on the model (HybridLM.context_parallel) by the trainer (train/context_parallel.py)."""

    group: Any  # torch.distributed ProcessGroup
    rank: int
    size: int

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable all-gather: x (...) -> (R, ...)."""
        return _GatherSlices.apply(x, self.group, self.size, self.rank)

    def split(self, seq_idx: torch.Tensor | DocumentLayout | None, length: int, device: torch.device) -> ContextSlice:
        """The per-forward view of this rank's slice: `seq_idx` (b, l) the slice's documents (global
        document numbers, as cut from the whole row) or None for plain rows; length l tokens per rank."""
        if isinstance(seq_idx, DocumentLayout):
            seq_idx = seq_idx.seq_idx
        whole = None
        if seq_idx is not None:
            sid = seq_idx.to(device=device, dtype=torch.long)
            parts = _all_gather(sid, self.group, self.size)  # (R, b, l) integers: no gradient
            whole = parts.permute(1, 0, 2).reshape(sid.size(0), self.size * length)  # (b, L)
        return ContextSlice(self, length, whole)


@dataclass(frozen=True)
class ContextSlice:
    """One forward's slice: the group, l tokens per rank, and the whole rows' documents (b, L) or None."""

    cp: ContextParallel
    length: int
    whole_seq_idx: torch.Tensor | None

    @property
    def start(self) -> int:
        return self.cp.rank * self.length

    @property
    def seq_idx(self) -> torch.Tensor | None:
        """(b, l): this slice's documents."""
        return None if self.whole_seq_idx is None else self.whole_seq_idx[:, self.start : self.start + self.length]

    def positions(self, batch: int, device: torch.device) -> torch.Tensor:
        """(b, l) long: RoPE positions of the slice's tokens in their documents over the whole row."""
        if self.whole_seq_idx is None:
            return torch.arange(self.start, self.start + self.length, device=device).expand(batch, self.length)
        return positions_from_seq_idx(self.whole_seq_idx)[:, self.start : self.start + self.length]

    def _slice_flags(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per rank, (R, b) float each: `enters` a_r, whether slice r's first token is in the document
        slice r - 1 ends in (0 for r = 0); `through`, whether slice r is one document (a state entering it
        reaches its end)."""
        R, l = self.cp.size, self.length
        if self.whole_seq_idx is None:
            b = 1
            enters = torch.ones(R, b, device=device)
            enters[0] = 0
            return enters, torch.ones(R, b, device=device)
        sid = self.whole_seq_idx.view(-1, R, l)  # (b, R, l)
        first, last = sid[..., 0], sid[..., -1]  # (b, R)
        enters = torch.cat([torch.zeros_like(first[:, :1]), (first[:, 1:] == last[:, :-1]).long()], dim=1)
        return enters.t().float(), (first == last).t().float()

    # ---- Mamba2 ---------------------------------------------------------------------------------
    def conv_prefix(self, xbc: torch.Tensor, width: int) -> torch.Tensor:
        """The w - 1 conv inputs before this slice: xbc (b, l, c) -> (b, c, w - 1), zero before the row
        and where they belong to another document than the slice's first token."""
        tails = self.cp.gather(xbc[:, self.length - (width - 1) :].transpose(1, 2))  # (R, b, c, w-1)
        r = self.cp.rank
        prefix = tails[r - 1] * float(r > 0)  # rank 0: zeros, still a user of the gather (module doc)
        if self.whole_seq_idx is not None and r > 0:
            sid = self.whole_seq_idx
            same = sid[:, self.start - (width - 1) : self.start] == sid[:, self.start : self.start + 1]  # (b, w-1)
            prefix = prefix * same.unsqueeze(1).to(prefix.dtype)
        return prefix

    def add_entering_state(
        self, y: torch.Tensor, final: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, C: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A scan of this slice from a zero state (any implementation: y (b, l, h, p), final (b, h, p, n)) ->
        the whole row's y and state after the slice's last token. dt (b, l, h) discretised, A (h,), C (b, l, g, n)."""
        work = final.dtype
        log_decay = torch.cumsum(dt.to(work) * A.to(work), dim=1)  # (b, l, h): decay from the slice start to t
        enters, through = self._slice_flags(y.device)  # (R, b)
        finals = self.cp.gather(final)  # (R, b, h, p, n)
        decays = self.cp.gather(torch.exp(log_decay[:, -1]))  # (R, b, h)
        entering = [torch.zeros_like(final)]  # S_0
        for r in range(self.cp.size - 1):
            carried = finals[r] + (decays[r] * through[r].to(work).unsqueeze(-1))[..., None, None] * entering[-1]
            entering.append(carried * enters[r + 1].to(work).view(-1, 1, 1, 1))
        state = torch.stack(entering)[self.cp.rank]  # (b, h, p, n); stacked: every gathered entry is used
        return enter_state(y, final, state, log_decay, C, self.seq_idx)

    # ---- attention ------------------------------------------------------------------------------
    def attention(self, mixer: Attention, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The attention mixer over the whole row for this slice's queries: x (b, l, d) -> (b, l, d)."""
        q, k, v = mixer.project(x, rope)  # (b, h, l, k), (b, j, l, k) x 2
        b, j, l, kd = k.shape
        upto = (self.cp.rank + 1) * l  # keys of slices 0..r; later ones are all masked
        kv = self.cp.gather(torch.stack([k, v]))[: self.cp.rank + 1]  # (r+1, 2, b, j, l, k)
        kv = kv.permute(1, 2, 3, 0, 4, 5).reshape(2, b, j, upto, kd)
        rep = mixer.n_heads // mixer.n_kv
        keys, values = kv[0].repeat_interleave(rep, dim=1), kv[1].repeat_interleave(rep, dim=1)
        qi = torch.arange(self.start, self.start + l, device=x.device).unsqueeze(1)
        mask = (torch.arange(upto, device=x.device).unsqueeze(0) <= qi).unsqueeze(0)  # (1, l, upto)
        if self.whole_seq_idx is not None:
            mask = mask & (self.seq_idx.unsqueeze(-1) == self.whole_seq_idx[:, :upto].unsqueeze(-2))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.unsqueeze(1))  # (b, h, l, k)
        return mixer.output(out)
