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
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from model.cache import HybridCache
from model.config import ModelConfig
from model.documents import DocumentLayout, positions_from_seq_idx
from model.kernels import kernel_report, resolve_impl
from model.layers import ResidualRMSNorm, RotaryEmbedding, init_linear, residual_std
from model.loss import mean_nll
from model.mixers import LayerState, MixerContext, block_type
from model.mlps import mlp_type
from model.wgrad import Linear, linear

log = logging.getLogger(__name__)


class Block(nn.Module):
    """Pre-norm residual block: mixer then MLP.

    (x, residual) -> (x', residual'), all (b, l, d): the stream entering the block is x + residual
    (x alone for the first block), the stream leaving it is x' + residual'.
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fused = self.mixer.impl == "kernels"
        x, residual = self.mixer_norm(x, residual, fused)
        x = self.scaled(self.mixer(x, ctx, state))
        x, residual = self.mlp_norm(x, residual, fused)
        return self.scaled(self.mlp(x)), residual

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
        self.final_norm = ResidualRMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.attention.rope_theta)
        self.activation_checkpointing = False
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
        if position_ids is None:
            if cache is not None:
                position_ids = cache.next_pos.unsqueeze(1) + torch.arange(l, device=input_ids.device)
            elif docs is not None:
                position_ids = positions_from_seq_idx(docs.seq_idx)
            else:  # also rows that are single documents
                position_ids = torch.arange(l, device=input_ids.device).expand(b, l)
        ctx = MixerContext(rope=self.rope(position_ids, h.dtype), positions=position_ids, docs=docs,
                           key_valid=cache.attention_keys(l) if cache is not None else None)
        residual = None
        for i, layer in enumerate(self.layers):
            state = cache.layers[i] if cache is not None else None
            if self.activation_checkpointing and self.training and cache is None:
                h, residual = checkpoint(layer, h, residual, ctx, use_reentrant=False)
            else:
                h, residual = layer(h, residual, ctx, state)
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
    ) -> torch.Tensor:
        """Logits (b, l, vocab_size) (padding columns of the embedding dropped); arguments as `hidden_states`."""
        return self.logits(self.hidden_states(input_ids, position_ids, seq_idx, cache))

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
    ) -> torch.Tensor:
        """Mean next-token cross-entropy (float32, or float64 for a float64 model) over labels != -100.
        labels: (b, l), already shifted. On the kernel path, the fused cross-entropy of model/loss.py."""
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
