"""Named layer-pattern variants and parameter matching (model/variants.py)."""

from __future__ import annotations

import pytest
import torch

from model import HybridLM, ModelConfig, count_params
from model.config import strategic_pattern
from model.variants import FFN_MULTIPLE, VARIANTS, match_ffn, variant_rows


def test_variant_patterns_follow_n_layers() -> None:
    cfg = ModelConfig(preset="small", n_layers=7)
    got = {name: v.apply(cfg).layer_pattern for name, v in VARIANTS.items()}
    strategic = strategic_pattern(7, cfg.attn_ratio)
    assert got == {"strategic": strategic, "alternating": "AMAMAMA", "all_mamba": "MMMMMMM",
                   "all_attention": "AAAAAAA", "routed": strategic.replace("A", "R"),
                   "gated_memory": strategic.replace("A", "G"), "hierarchical": strategic.replace("M", "H")}


@pytest.mark.parametrize("preset", ["tiny", "small", "1.3b"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_match_ffn_within_tolerance_and_closest(preset: str, name: str) -> None:
    base = ModelConfig(preset=preset)
    target = count_params(base)
    cfg = VARIANTS[name].apply(base)
    matched = match_ffn(cfg, target)
    assert matched.ffn_hidden % FFN_MULTIPLE == 0 and matched.layer_pattern == cfg.layer_pattern
    assert abs(count_params(matched) / target - 1) <= 0.03
    # no other multiple of 64 is closer (the count is linear in ffn_hidden: neighbours suffice)
    for ffn in (matched.ffn_hidden - FFN_MULTIPLE, matched.ffn_hidden + FFN_MULTIPLE):
        other = cfg.model_copy(update={"ffn_hidden": ffn})
        assert abs(count_params(other) - target) >= abs(count_params(matched) - target)


def test_match_ffn_counts_a_built_model() -> None:
    cfg = match_ffn(VARIANTS["alternating"].apply(ModelConfig(preset="tiny")), 6_000_000)
    with torch.device("meta"):
        assert sum(p.numel() for p in HybridLM(cfg).parameters()) == count_params(cfg)


def test_match_ffn_refuses_an_unreachable_target() -> None:
    cfg = ModelConfig(preset="tiny")
    with pytest.raises(ValueError, match="cannot be brought within 3%"):
        match_ffn(cfg, count_params(cfg) // 10)


def test_variant_rows_match_the_preset() -> None:
    rows = variant_rows("small")
    target = count_params(ModelConfig(preset="small"))
    assert [r["variant"] for r in rows] == list(VARIANTS)
    assert rows[0]["matched_params"] == target  # strategic is the preset's own pattern
    assert all(abs(r["matched_params"] / target - 1) <= 0.03 for r in rows)
