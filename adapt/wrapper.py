"""AdaptedLM: a frozen Hugging Face decoder-only transformer whose top K layers gain a gated Mamba2 path
and an optional memory bank beside their attention.

In an adapted layer the attention module is replaced by `AdaptedAttention`, which reads the same normed
input x (b, l, d) and returns

    attn(x) + gate * (mamba(x) + memory(x))        gate: (d,) per channel, zero at init
    memory(x) = softmax(W_q x . K^T / sqrt(d)) V    K, V: (slots, d) learned (model/mixers/gated.memory_read)

so the rest of the layer (residual add, Gemma's post-attention norm, the MLP) is the base's own code, and
with the gate at zero the output is the base's exactly. The Mamba2 path is model/mamba2.py's Mamba2Mixer
(d_model = the base's hidden size, sizes from adapt.mamba); its decoding state lives in `AdaptCache` beside
the base's own KV cache (a transformers DynamicCache), so a cached decode equals the full forward.

Left-padded batches: the padding is a separate document for the Mamba2 path (seq_idx 0, as
HybridLM.prefill does) and is masked out of attention by the base; positions start at each row's first
real token.

Files (`save_added`): adapter.safetensors (the added weights only) + adapter_config.json (the base folder,
the adapted layer indices and the adapt section).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from config.atomic import atomic_write_bytes, atomic_write_json
from config.loader import ConfigError
from config.sections import AdaptConfig
from model.cache import MambaState
from model.config import ModelConfig
from model.layers import init_linear
from model.mamba2 import Mamba2Mixer
from model.mixers.base import MixerContext
from model.mixers.gated import memory_read

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def mamba_config(d_model: int, adapt: AdaptConfig) -> ModelConfig:
    """The ModelConfig a Mamba2Mixer of width `d_model` reads (only d_model, mamba, norm_eps and the init
    std matter; the attention fields are placeholders the schema requires). ConfigError names the key."""
    try:
        return ModelConfig(d_model=d_model, n_layers=adapt.layers, pattern="M" * adapt.layers, ffn_hidden=1,
                           vocab_size=2, attention={"n_heads": 1, "n_kv_heads": 1, "head_dim": 2},
                           mamba=adapt.mamba.model_dump())
    except ValueError as exc:
        first = str(exc).splitlines()
        raise ConfigError(f"adapt.mamba: {first[-1].strip() if len(first) > 1 else exc} (base hidden size "
                          f"{d_model})") from None


class AddedPaths(nn.Module):
    """What one adapted layer gains: Mamba2, the per-channel gate and the optional memory bank.
    forward: normed input x (b, l, d) -> gate * (mamba(x) + memory(x)) (b, l, d)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, slots: int) -> None:
        super().__init__()
        d = cfg.d_model
        self.mamba = Mamba2Mixer(cfg, layer_idx)
        self.gate = nn.Parameter(torch.zeros(d))  # zero: the wrapped model starts as the base
        self.memory_query = nn.Linear(d, d, bias=False) if slots else None
        self.memory_keys = nn.Parameter(torch.empty(slots, d)) if slots else None
        self.memory_values = nn.Parameter(torch.empty(slots, d)) if slots else None
        if slots:
            std = cfg.resolved_init_std
            init_linear(self.memory_query, std)
            nn.init.normal_(self.memory_keys, std=std)
            nn.init.normal_(self.memory_values, std=std)

    def forward(self, x: torch.Tensor, ctx: MixerContext | None, state: MambaState | None) -> torch.Tensor:
        extra = self.mamba(x.to(self.gate.dtype), ctx, state)
        if self.memory_query is not None:
            extra = extra + memory_read(x.to(self.gate.dtype), self.memory_query, self.memory_keys,
                                        self.memory_values)[0]
        return (self.gate * extra).to(x.dtype)


class AdaptedAttention(nn.Module):
    """The base layer's attention (frozen) with the added paths beside it; same call and return as the
    attention it replaces ((output, weights))."""

    def __init__(self, attn: nn.Module, added: AddedPaths) -> None:
        super().__init__()
        self.attn, self.added = attn, added
        # Set by AdaptedLM around each forward: the packed documents and this layer's decoding state.
        self.ctx: MixerContext | None = None
        self.state: MambaState | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        out, *rest = self.attn(hidden_states, *args, **kwargs)
        return (out + self.added(hidden_states, self.ctx, self.state), *rest)


@dataclass
class AdaptCache:
    """Decoding state: the base's KV cache, one Mamba2 state per adapted layer, the real-token mask
    (b, t) over everything seen and each row's next position (b,)."""

    kv: Any
    ssm: list[MambaState]
    mask: torch.Tensor
    next_pos: torch.Tensor


def decoder_layers(base: nn.Module) -> nn.ModuleList:
    """The base's decoder layers (transformers' causal LMs expose them as get_decoder().layers)."""
    layers = getattr(base.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ConfigError(f"adapt.base: {type(base).__name__} has no decoder layers with a self_attn module "
                          "(supported: decoder-only transformers of the Llama, Qwen2/3 and Gemma families)")
    return layers


class AdaptedLM(nn.Module):
    """The wrapped base model. forward: input_ids (b, l) -> logits (b, l, vocab) float32."""

    def __init__(self, base: nn.Module, adapt: AdaptConfig, base_folder: str | Path | None = None) -> None:
        super().__init__()
        layers = decoder_layers(base)
        if adapt.layers > len(layers):
            raise ConfigError(f"adapt.layers ({adapt.layers}) is more than the base's {len(layers)} decoder layers")
        base.requires_grad_(False)
        self.base, self.adapt, self.base_folder = base, adapt, base_folder
        d_model = base.get_input_embeddings().embedding_dim
        cfg = mamba_config(d_model, adapt)
        self.layer_indices = list(range(len(layers) - adapt.layers, len(layers)))
        added_dtype = torch.promote_types(base.get_input_embeddings().weight.dtype, torch.float32)  # fp32 at least
        self.added = nn.ModuleList(
            AddedPaths(cfg, i, adapt.memory_slots).to(device=base.device, dtype=added_dtype)
            for i in range(adapt.layers))
        self.wrapped: list[AdaptedAttention] = []
        for i, added in zip(self.layer_indices, self.added):
            layers[i].self_attn = AdaptedAttention(layers[i].self_attn, added)
            self.wrapped.append(layers[i].self_attn)

    @property
    def embed(self) -> nn.Embedding:
        """The base's input embedding (model/generation.py reads the device from it)."""
        return self.base.get_input_embeddings()

    def block_statistics(self) -> dict[str, float]:
        """Mean |gate| of each adapted layer (how far its added paths have opened), keyed
        `layers.{i}.gate_abs_mean` as HybridLM.block_statistics keys its blocks' (metrics.jsonl's blocks/*)."""
        return {f"layers.{i}.gate_abs_mean": float(added.gate.detach().abs().mean())
                for i, added in zip(self.layer_indices, self.added)}

    def trainable_fraction(self) -> tuple[int, int]:
        """(added parameters, all parameters)."""
        added = sum(p.numel() for p in self.added.parameters())
        return added, added + sum(p.numel() for p in self.base.parameters())

    # ---- forward ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _paths(self, seq_idx: torch.Tensor | None, states: list[MambaState] | None) -> Iterator[None]:
        ctx = MixerContext.of_documents(seq_idx) if seq_idx is not None else None
        for k, wrapped in enumerate(self.wrapped):
            wrapped.ctx, wrapped.state = ctx, states[k] if states is not None else None
        try:
            yield
        finally:
            for wrapped in self.wrapped:
                wrapped.ctx = wrapped.state = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: AdaptCache | None = None) -> torch.Tensor:
        """Logits (b, l, vocab) float32. attention_mask: (b, l) 1 for tokens, 0 for LEFT padding (no cache);
        with a cache, the step's tokens extend `cache` (its mask and positions are advanced in place)."""
        if cache is not None:
            l = input_ids.size(1)
            cache.mask = torch.cat([cache.mask, cache.mask.new_ones(input_ids.size(0), l)], dim=1)
            positions = cache.next_pos.unsqueeze(1) + torch.arange(l, device=input_ids.device)
            with self._paths(None, cache.ssm):
                out = self.base(input_ids=input_ids, attention_mask=cache.mask, position_ids=positions,
                                past_key_values=cache.kv, use_cache=True)
            cache.next_pos = positions[:, -1] + 1
            return out.logits.float()
        seq_idx = positions = None
        if attention_mask is not None and not bool(attention_mask.all()):
            seq_idx = attention_mask.long()  # 0 = padding, 1 = the row's tokens: separate documents
            positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        with self._paths(seq_idx, None):
            out = self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
        return out.logits.float()

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy; labels (b, l) already shifted, -100 ignored."""
        logits = self.forward(input_ids)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    # ---- decoding (the prefill/step interface of model/generation.py) -----------------------------
    def prefill(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, AdaptCache]:
        """Run a (left-padded) prompt batch: (last-position logits (b, v), cache)."""
        from transformers import DynamicCache

        b = input_ids.size(0)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        dtype = self.added[0].gate.dtype
        states = [added.mamba.empty_state(b, input_ids.device, dtype) for added in self.added]
        cache = AdaptCache(kv=DynamicCache(config=self.base.config), ssm=states, mask=mask[:, :0],
                           next_pos=torch.zeros(b, dtype=torch.long, device=input_ids.device))
        seq_idx = mask.long() if not bool(mask.all()) else None
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        with self._paths(seq_idx, states):
            out = self.base(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                            past_key_values=cache.kv, use_cache=True)
        cache.mask, cache.next_pos = mask, positions[:, -1] + 1
        return out.logits[:, -1].float(), cache

    def step(self, token: torch.Tensor, cache: AdaptCache) -> torch.Tensor:
        """One token per row: token (b,) -> logits (b, v); cache updated in place."""
        return self.forward(token.unsqueeze(1), cache=cache)[:, -1]

    # ---- files ------------------------------------------------------------------------------------
    def save_added(self, folder: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write only the added weights (`state`, keyed as `self.added.state_dict()`, e.g. a trainer's fp32
        master copies; default the module's own) and the config that rebuilds the wrapper around the base."""
        from safetensors.torch import save

        folder = Path(folder)
        tensors = {k: v.detach().contiguous().cpu() for k, v in (state or self.added.state_dict()).items()}
        atomic_write_bytes(folder / ADAPTER_WEIGHTS, save(tensors, metadata={"format": "pt"}))
        atomic_write_json(folder / ADAPTER_CONFIG, {
            "base": str(Path(self.base_folder).resolve()) if self.base_folder is not None else None,
            "base_class": type(self.base).__name__,
            "layer_indices": self.layer_indices,
            "adapt": self.adapt.model_dump(mode="json"),
        })
        return folder


def require_model_folder(folder: Path) -> None:
    """ConfigError (one line) unless `folder` looks like a Hugging Face model folder."""
    if not (folder / "config.json").is_file():
        raise ConfigError(f"adapt.base: {folder} is not a Hugging Face model folder (no config.json)")


def load_tokenizer(folder: str | Path) -> Any:
    """The base folder's transformers tokenizer; ConfigError (one line) when it has none."""
    from transformers import AutoTokenizer

    require_model_folder(Path(folder))
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"adapt.base: transformers finds no tokenizer in {folder} ({str(exc).splitlines()[0]})") from None


def load_base(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A local transformers causal LM, eval mode; ConfigError (one line) when the folder is not one."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    require_model_folder(folder)
    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"adapt.base: transformers cannot load {folder} as a causal LM ({reason})") from None


def wrap(base_folder: str | Path, adapt: AdaptConfig, dtype: torch.dtype = torch.float32) -> AdaptedLM:
    """The base at `base_folder`, wrapped with freshly initialised added paths."""
    return AdaptedLM(load_base(base_folder, dtype), adapt, base_folder)


def load_adapted(folder: str | Path, base_folder: str | Path | None = None,
                 dtype: torch.dtype = torch.float32) -> AdaptedLM:
    """Rebuild a saved wrapper: the base (from adapter_config.json, or `base_folder`) + the added weights.
    `folder` holds adapter_config.json, or is a training run's output folder (its final/ is read)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file() and (folder / "final" / ADAPTER_CONFIG).is_file():
        folder = folder / "final"
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"{folder} holds no {ADAPTER_CONFIG}: pass the output folder of launch/adapt.py")
    meta = json.loads((folder / ADAPTER_CONFIG).read_text())
    base = base_folder or meta["base"]
    if base is None:
        raise ConfigError(f"{folder / ADAPTER_CONFIG} names no base folder: pass --base")
    model = wrap(base, AdaptConfig.model_validate(meta["adapt"]), dtype)
    if model.layer_indices != meta["layer_indices"]:
        raise ConfigError(f"the adapter was trained on layers {meta['layer_indices']}, but {base} has "
                          f"{len(decoder_layers(model.base))} decoder layers: pass the base it was trained on")
    state = load_file(str(folder / ADAPTER_WEIGHTS))
    try:
        model.added.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        reason = str(exc).splitlines()[-1].strip()
        raise ConfigError(f"{folder / ADAPTER_WEIGHTS} does not fit {base}: {reason}") from None
    return model.eval()
