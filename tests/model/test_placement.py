"""The strategic-placement rule (`strategic_pattern`), checked against its docstring.

Docstring contract, for n_attn = round(ratio * n_layers) (exact halves round up: the code adds 1e-9):
  - n_attn == 0: all M; n_attn >= n_layers - 1: the top n_attn layers are A (no room for M ends);
  - otherwise layer 0 and the last layer are M; early group at layer 1 (and 2 once n_attn >= 5);
    top group of 1/2/3 contiguous A (n_attn <= 3 / <= 6 / >= 7; none when n_attn == 1) ending at
    layer n_layers - 2; the rest evenly spaced strictly between them, so the gaps between
    consecutive A's from the last early one to the first top one differ by at most 1.
"""

from __future__ import annotations

import math

import pytest

from model import ModelConfig, strategic_pattern
from model.presets import PRESETS

RATIOS = [0.0, 0.05, 0.1, 1 / 8, 1 / 6, 0.2, 0.25, 1 / 3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0]
GRID = [(n, r) for n in range(1, 65) for r in RATIOS]


def _expected_count(n: int, ratio: float) -> int:
    return math.floor(ratio * n + 0.5 + 1e-9)


def _attn(pattern: str) -> list[int]:
    return [i for i, c in enumerate(pattern) if c == "A"]


def test_deterministic_and_well_formed() -> None:
    for n, r in GRID:
        p = strategic_pattern(n, r)
        assert p == strategic_pattern(n, r)
        assert len(p) == n and set(p) <= {"M", "A"}
        assert p.count("A") == _expected_count(n, r), (n, r, p)


def test_degenerate_ratios() -> None:
    for n in range(1, 40):
        assert strategic_pattern(n, 0.0) == "M" * n
        assert strategic_pattern(n, 1.0) == "A" * n
    # No room for Mamba2 at both ends: attention fills from the top down.
    assert strategic_pattern(6, 5 / 6) == "MAAAAA"
    assert strategic_pattern(3, 2 / 3) == "MAA"


def test_ends_early_and_top_groups() -> None:
    checked = 0
    for n, r in GRID:
        p, k = strategic_pattern(n, r), _expected_count(n, r)
        if k == 0 or k >= n - 1:
            continue
        checked += 1
        a = _attn(p)
        assert p[0] == "M" and p[-1] == "M", (n, r, p)
        assert a[0] == 1  # first attention within the first 3 layers (layer 0 stays M)
        if k >= 5:
            assert a[:2] == [1, 2], (n, r, p)
        n_top = 0 if k == 1 else 1 if k <= 3 else 2 if k <= 6 else 3
        if n_top:
            assert a[-1] == n - 2  # last attention within the top 3 layers (the last stays M)
            assert a[-n_top:] == list(range(n - 1 - n_top, n - 1)), (n, r, p)
    assert checked > 300


def test_middle_evenly_spread() -> None:
    checked = 0
    for n, r in GRID:
        k = _expected_count(n, r)
        if k < 3 or k >= n - 1:
            continue
        a = _attn(strategic_pattern(n, r))
        n_early = 2 if k >= 5 else 1
        n_top = 1 if k <= 3 else 2 if k <= 6 else 3
        span = a[n_early - 1 : len(a) - n_top + 1]  # last early, the middle ones, first top
        gaps = [y - x for x, y in zip(span, span[1:])]
        assert max(gaps) - min(gaps) <= 1, (n, r, a)
        checked += 1
    assert checked > 200


def test_known_patterns() -> None:
    """Hand-derived from the docstring's formula (Python's round() is round-half-even)."""
    assert strategic_pattern(6, 1 / 3) == "MAMMAM"
    assert strategic_pattern(12, 1 / 6) == "MAMMMMMMMMAM"
    # 24 layers, 4 A: early [1], top [21, 22], middle round(1 + 20 / 2) = 11.
    assert _attn(strategic_pattern(24, 1 / 6)) == [1, 11, 21, 22]
    # 32 layers, 5 A: early [1, 2], top [29, 30], middle round(2 + 27 / 2) = round(15.5) = 16.
    assert _attn(strategic_pattern(32, 1 / 6)) == [1, 2, 16, 29, 30]
    # 40 layers, 7 A: early [1, 2], top [36, 37, 38], middle round(2 + 34/3) = 13, round(2 + 68/3) = 25.
    assert _attn(strategic_pattern(40, 1 / 6)) == [1, 2, 13, 25, 36, 37, 38]


def test_presets_resolve_their_pattern() -> None:
    want = {
        "tiny": "MAMMAM",
        "small": "MAMMMMMMMMAM",
        "1.3b": strategic_pattern(24, 1 / 6),
        "2.7b": strategic_pattern(32, 1 / 6),
        "6.7b": strategic_pattern(32, 1 / 6),
        "13b": strategic_pattern(40, 1 / 6),
    }
    assert set(want) == set(PRESETS)
    for name, pattern in want.items():
        cfg = ModelConfig(preset=name)
        assert cfg.pattern is None and cfg.layer_pattern == pattern, name


@pytest.mark.parametrize("pattern", ["AMMA", "MMMM"])
def test_explicit_pattern_wins(pattern: str, tiny_config) -> None:
    cfg = tiny_config(pattern=pattern, attn_ratio=0.5)
    assert cfg.layer_pattern == pattern
