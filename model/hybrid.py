"""The hybrid causal LM: embedding, a stack of pre-norm blocks, final RMSNorm, LM head.

Each block is  h = h + mixer(norm(h));  h = h + mlp(norm(h))  with the mixer the block type the
config's layer pattern names (one letter per layer, model/mixers: `M` Mamba2, `A` GQA attention, ...),
and the MLP the config's kind (`model.mlp`, model/mlps.py: SwiGLU by default). Blocks pass the
pair (branch output, residual stream) so that each residual add is fused into the following norm on
the kernel path (`model.layers.ResidualRMSNorm`); the arithmetic is the same on both paths.

Multipliers (model.scales, default 1: Granite 4.0-H's muP-style constants): the embedding times
scales.embedding, each branch output times scales.residual before its residual add, the logits divided
by scales.logits_divisor (the attention's softmax scale is in model/attention.py).

Shape legend: b batch, l sequence, d d_model, v vocabulary.

Packed documents: pass `seq_idx` (b, l), the document index of every token (non-decreasing per row),
and `position_ids` restarting at 0 per document (`positions_from_seq_idx`). Then the Mamba2 conv and
state restart at every document, attention stays inside its document and RoPE restarts. The
boundaries are worked out once per forward (`DocumentLayout`) and shared by all layers.

With `model.bridges`, some blocks' mixers also receive a gated projection of an earlier block's mixer
output at the same positions (model/bridges.py says which and why).

Context parallelism: with `context_parallel` set (a `ContextParallel` group, by train/), input_ids are this
rank's slice of every row, and `seq_idx` / `position_ids` the slice's part of the whole rows' (model/
context_parallel.py has the mixers' math across ranks).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from model.bridges import Bridges
from model.cache import HybridCache
from model.config import ModelConfig
from model.context_parallel import ContextParallel
from model.documents import DocumentLayout, positions_from_seq_idx
from model.kernels import kernel_report, resolve_impl
from model.layers import ResidualRMSNorm, RotaryEmbedding, init_linear, residual_std
from model.loss import IGNORE_INDEX, chunked_token_nll, mean_nll
from model.mixers import LayerState, MixerContext, block_type
from model.mlps import mlp_type
from model.wgrad import Linear, linear

log = logging.getLogger(__name__)


class Block(nn.Module):
    """Pre-norm residual block: mixer then MLP.

    (x, residual) -> (x', residual', the mixer's output), all (b, l, d): the stream entering the block is
    x + residual (x alone for the first block), the stream leaving it is x' + residual'. inflow: a bridge's
    (b, l, d) addend to the normed mixer input (model/bridges.py), or None.
    """

    def __init__(self, cfg: ModelConfig, kind: str, layer_idx: int) -> None:
        super().__init__()
        self.kind = kind
        self.mixer_norm = ResidualRMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = block_type(kind)(cfg, layer_idx)
        self.mlp_norm = ResidualRMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = mlp_type(cfg.mlp)(cfg.d_model, cfg.ffn_hidden)
        self.mlp.reset(cfg.resolved_init_std, residual_std(cfg.resolved_init_std, cfg.n_layers))
        self.residual_scale = cfg.scales.residual

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        ctx: MixerContext,
        state: LayerState | None = None,
        inflow: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fused = self.mixer.impl == "kernels"
        x, residual = self.mixer_norm(x, residual, fused)
        if inflow is not None:
            x = x + inflow
        mixed = self.mixer(x, ctx, state)
        x, residual = self.mlp_norm(self.scaled(mixed), residual, fused)
        return self.scaled(self.mlp(x)), residual, mixed

    def scaled(self, branch: torch.Tensor) -> torch.Tensor:
        """A branch's output as it enters the residual stream (model.scales.residual; 1.0 costs nothing)."""
        return branch if self.residual_scale == 1.0 else branch * self.residual_scale


class HybridLM(nn.Module):
    """Strategic-placement Mamba2/attention causal language model."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, kind, i) for i, kind in enumerate(cfg.layer_pattern))
        self.bridges = Bridges(cfg) if cfg.bridges else None
        self.final_norm = ResidualRMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.attention.rope_theta, cfg.attention.rope_scaling)
        self.context_parallel: ContextParallel | None = None  # set by train/context_parallel.py
        nn.init.normal_(self.embed.weight, std=cfg.resolved_init_std)
        if self.lm_head is not None:
            init_linear(self.lm_head, cfg.resolved_init_std)
        self.impl = "reference"

    # ---- execution path ---------------------------------------------------------------------------
    def set_impl(self, impl: str | None = None) -> str:
        """Choose reference/kernels for every mixer and MLP (default: config's `impl` on the model's device)."""
        device = self.embed.weight.device
        chosen = resolve_impl(impl or self.cfg.impl, device)
        for layer in self.layers:
            layer.mixer.set_impl(chosen)
            layer.mlp.impl = chosen
        self.impl = chosen
        found = ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in kernel_report().items())
        log.info("model execution path: %s (device %s; %s)", chosen, device, found)
        return chosen

    def set_attn_backend(self, backend: str) -> None:
        """Attention kernel of the kernel path for every attention block (see ModelConfig.attn_backend)."""
        for layer in self.layers:
            layer.mixer.set_attn_backend(backend)

    def zero3_leaves(self) -> list[nn.Module]:
        """Modules whose parameters ZeRO-3 must gather together: the kernel path reads their weights
        outside the submodules that hold them (each mixer says which; the fused SwiGLU concatenates
        gate and up; every MLP is one leaf, whatever its kind)."""
        return [leaf for layer in self.layers for leaf in (*layer.mixer.zero3_leaves(), layer.mlp)]

    def block_statistics(self) -> dict[str, float]:
        """What the last forward's mixers measured (router fractions, gate means...), keyed
        `layers.{i}.{name}`; empty for block types that measure nothing."""
        return {f"layers.{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.mixer.statistics().items()}

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    # ---- forward ----------------------------------------------------------------------------------
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        seq_idx: torch.Tensor | DocumentLayout | None = None,
        cache: HybridCache | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (b, l, d). input_ids: (b, l) long; seq_idx: the packed documents, (b, l)
        (it may stay on the host: the boundaries are derived there), or their `DocumentLayout` when the
        caller already worked the boundaries out (and keeps them, e.g. as fixed buffers across calls)."""
        b, l = input_ids.shape
        h = self.embed(input_ids)
        if self.cfg.scales.embedding != 1.0:
            h = h * self.cfg.scales.embedding
        kernels = self.impl == "kernels"
        docs = seq_idx
        if isinstance(seq_idx, torch.Tensor):
            docs = DocumentLayout.build(seq_idx, h.device, boundaries=kernels)
        cp = None
        if self.context_parallel is not None:  # input_ids: this rank's slice of each row
            if cache is not None:
                raise ValueError("decoding is not context-parallel: clear model.context_parallel first")
            cp = self.context_parallel.split(seq_idx, l, h.device)
        if position_ids is None:
            if cp is not None:
                position_ids = cp.positions(b, input_ids.device)
            elif cache is not None:
                position_ids = cache.next_pos.unsqueeze(1) + torch.arange(l, device=input_ids.device)
            elif docs is not None:
                position_ids = positions_from_seq_idx(docs.seq_idx)
            else:  # also rows that are single documents
                position_ids = torch.arange(l, device=input_ids.device).expand(b, l)
        ctx = MixerContext(rope=self.rope(position_ids, h.dtype), positions=position_ids, docs=docs,
                           key_valid=cache.attention_keys(l) if cache is not None else None, cp=cp)
        residual = None
        kept: dict[int, torch.Tensor] = {}  # mixer outputs that bridges carry to later layers
        for i, layer in enumerate(self.layers):
            state = cache.layers[i] if cache is not None else None
            inflow = self.bridges.inflow(i, kept) if self.bridges is not None else None
            h, residual, mixed = layer(h, residual, ctx, state, inflow)
            if self.bridges is not None and self.bridges.keeps(i):
                kept[i] = mixed
        if cache is not None:
            if cache.filled is not None:  # static form: in place, so that a captured graph advances it
                cache.next_pos.copy_(position_ids[:, -1] + 1)
                cache.filled.add_(l)
            else:
                cache.next_pos = position_ids[:, -1] + 1
            cache.seen += l
        return self.final_norm(h, residual, kernels)[0]

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        seq_idx: torch.Tensor | DocumentLayout | None = None,
        cache: HybridCache | None = None,
        labels: torch.Tensor | None = None,
        loss_chunk_tokens: int = 0,
    ) -> torch.Tensor:
        """Logits (b, l, vocab_size) (padding columns of the embedding dropped); arguments as `hidden_states`.
        With `labels` (b, l) and `loss_chunk_tokens` > 0: the per-target NLL (b, l) instead, the head and
        loss run that many tokens at a time (model/loss.py `chunked_token_nll`): in the forward, so that
        a wrapper running it (DeepSpeed's engine) runs the head too."""
        h = self.hidden_states(input_ids, position_ids, seq_idx, cache)
        if labels is not None and loss_chunk_tokens:
            divisor = self.cfg.scales.logits_divisor  # linear(h / s, W) = linear(h, W) / s
            return chunked_token_nll(h if divisor == 1.0 else h / divisor, self.head_weight, labels,
                                     self.cfg.vocab_size, loss_chunk_tokens, self.impl)
        return self.logits(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head: final hidden states (..., d) -> logits (..., vocab_size), padding columns dropped,
        divided by model.scales.logits_divisor."""
        logits = linear(h, self.head_weight)[..., : self.cfg.vocab_size]
        divisor = self.cfg.scales.logits_divisor
        return logits if divisor == 1.0 else logits / divisor

    def loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
        loss_chunk_tokens: int = 0,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy (float32, or float64 for a float64 model) over labels != -100.
        labels: (b, l), already shifted. On the kernel path, the fused cross-entropy of model/loss.py;
        loss_chunk_tokens > 0: the head and loss that many tokens at a time."""
        if loss_chunk_tokens:
            nll = self.forward(input_ids, position_ids, seq_idx, labels=labels, loss_chunk_tokens=loss_chunk_tokens)
            return nll.sum() / (labels != IGNORE_INDEX).sum()
        logits = self.forward(input_ids, position_ids, seq_idx)  # a subclass's (train/graph_step.py) if it is one
        return mean_nll(logits, labels, self.impl)

    # ---- decoding ---------------------------------------------------------------------------------
    def new_cache(self, batch: int, dtype: torch.dtype | None = None) -> HybridCache:
        """Empty decoding state for `batch` rows on the model's device."""
        device = self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        states = [layer.mixer.empty_state(batch, device, dtype) for layer in self.layers]
        return HybridCache(layers=states, next_pos=torch.zeros(batch, dtype=torch.long, device=device))

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, HybridCache]:
        """Run a prompt and return (last-position logits (b, v), cache).

        attention_mask: (b, l) 1 for tokens, 0 for LEFT padding. Padding is treated as a separate
        document (seq_idx 0) so it never reaches the prompt through conv, state or attention, and
        RoPE positions start at each row's first real token.
        """
        b, l = input_ids.shape
        cache = self.new_cache(b)
        seq_idx = position_ids = None
        if attention_mask is not None and not bool(attention_mask.all()):
            valid = attention_mask.bool()
            seq_idx = valid.long()  # 0 = padding, 1 = prompt
            position_ids = (valid.long().cumsum(1) - 1).clamp(min=0)
            cache.key_valid = valid
        logits = self.forward(input_ids, position_ids, seq_idx, cache)
        return logits[:, -1], cache

    def step(self, token: torch.Tensor, cache: HybridCache) -> torch.Tensor:
        """Decode one token per row. token: (b,) long -> logits (b, v); cache updated in place."""
        if cache.key_valid is not None and cache.filled is None:
            cache.key_valid = torch.cat([cache.key_valid, cache.key_valid.new_ones(token.size(0), 1)], dim=1)
        return self.forward(token.unsqueeze(1), cache=cache)[:, -1]
