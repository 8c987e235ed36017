"""Named layer-pattern variants (for ablations) and parameter matching between them.

A variant is a rule that lays out a config's `n_layers` blocks (one block-type letter per layer,
model/mixers), so the same name means the same idea at every size:

  strategic      the preset's attention share placed by the strategic-placement rule
                 (model.config.strategic_pattern: early, middle and top attention, Mamba2 ends)
  alternating    attention and Mamba2 in turn, attention first: AMAM... (half attention)
  all_mamba      every block Mamba2
  all_attention  every block attention
  routed         strategic, with each attention block a routed block (`R`, model/mixers/routed.py)
  gated_memory   strategic, with each attention block a gated memory block (`G`, model/mixers/gated.py)
  hierarchical   strategic, with each Mamba2 block a hierarchical-state block (`H`, model/mixers/hierarchical.py)

Options that are not layer patterns (`model.bridges`, `model.mamba.state_compression`) are varied with a
variant's `set` in the ablation runner (config/ablations/variants2.yaml).

Parameter matching (`match_ffn`): the blocks of different mixers differ in size (a Mamba2 mixer of the
`small` preset holds ~2.4x the weights of its attention mixer), so a variant is brought to a target
parameter count by its SwiGLU width, the one width every block has: the count is linear in
`ffn_hidden` (model.sizing), so the width is solved for exactly and rounded to a multiple of 64
(tensor-core-friendly GEMMs). The rounding moves the count by at most 32 x 3 x d_model x n_layers
parameters (0.7% of the `small` preset); `match_ffn` refuses a result off by more than `tolerance`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from model.config import ATTENTION, MAMBA, ModelConfig, strategic_pattern
from model.mixers.gated import GatedMemoryMixer
from model.mixers.hierarchical import HierarchicalMixer
from model.mixers.routed import RoutedMixer
from model.sizing import count_params, mlp_params

FFN_MULTIPLE = 64
MATCH_TOLERANCE = 0.03  # relative: the "equal parameter counts within 3%"


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    rule: Callable[[ModelConfig], str]  # config -> layer pattern of cfg.n_layers chars

    def apply(self, cfg: ModelConfig) -> ModelConfig:
        """`cfg` with this variant's layer pattern (every other value kept)."""
        return cfg.model_copy(update={"pattern": self.rule(cfg)})


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("strategic", "the preset's attention share at strategic positions (model.config.strategic_pattern)",
            lambda c: strategic_pattern(c.n_layers, c.attn_ratio)),
    Variant("alternating", "attention and Mamba2 in turn, attention first (AMAM...)",
            lambda c: "".join(ATTENTION if i % 2 == 0 else MAMBA for i in range(c.n_layers))),
    Variant("all_mamba", "every block Mamba2", lambda c: MAMBA * c.n_layers),
    Variant("all_attention", "every block attention", lambda c: ATTENTION * c.n_layers),
    Variant("routed", "strategic, each attention block routed (R: Mamba2 + attention on routed tokens)",
            lambda c: strategic_pattern(c.n_layers, c.attn_ratio).replace(ATTENTION, RoutedMixer.letter)),
    Variant("gated_memory", "strategic, each attention block gated memory (G: gated attention + Mamba2)",
            lambda c: strategic_pattern(c.n_layers, c.attn_ratio).replace(ATTENTION, GatedMemoryMixer.letter)),
    Variant("hierarchical", "strategic, each Mamba2 block hierarchical (H: Mamba2 + a slow per-span state)",
            lambda c: strategic_pattern(c.n_layers, c.attn_ratio).replace(MAMBA, HierarchicalMixer.letter)),
)}


def match_ffn(cfg: ModelConfig, target: int, tolerance: float = MATCH_TOLERANCE) -> ModelConfig:
    """`cfg` with the `ffn_hidden` (a multiple of 64, at least 64) that brings count_params closest to
    `target`; ValueError if that is still more than `tolerance` (relative) away."""
    per_unit = mlp_params(cfg.model_copy(update={"ffn_hidden": 1})) * cfg.n_layers  # params per unit of width
    base = count_params(cfg) - per_unit * cfg.ffn_hidden
    ffn = max(FFN_MULTIPLE, round((target - base) / per_unit / FFN_MULTIPLE) * FFN_MULTIPLE)
    matched = cfg.model_copy(update={"ffn_hidden": ffn, "preset": None})
    off = count_params(matched) / target - 1
    if abs(off) > tolerance:
        raise ValueError(f"pattern {cfg.layer_pattern} cannot be brought within {tolerance:.0%} of {target:,} "
                         f"parameters by model.ffn_hidden (best {ffn}: {off:+.1%}); change d_model or n_layers")
    return matched


def variant_rows(preset: str = "small") -> list[dict]:
    """One row per named variant on `preset`: its pattern and counts as is, and the SwiGLU width and
    count that match the preset's own parameter count (what an ablation with match_params runs)."""
    base = ModelConfig(preset=preset)
    target = count_params(base)
    rows = []
    for v in VARIANTS.values():
        cfg = v.apply(base)
        matched = match_ffn(cfg, target)
        rows.append({"variant": v.name, "preset": preset, "description": v.description, "pattern": cfg.layer_pattern,
                     "params": count_params(cfg), "non_embedding_params": count_params(cfg, include_embedding=False),
                     "matched_ffn_hidden": matched.ffn_hidden, "matched_params": count_params(matched)})
    return rows
