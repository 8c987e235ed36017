"""Numbers stated in comments, docstrings and YAML comments, checked against what the code computes.

Each test reads the statement out of its file (so that editing either the number or the code without
the other fails here) and recomputes it with model.sizing, the config or plain arithmetic on the
stated shapes. A statement that was reworded so the pattern no longer finds it fails too: update the
pattern with the new wording rather than dropping the check.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from config.recipe import MinhashSettings
from config.schema import load_run_config
from model.config import ATTENTION, MAMBA, ModelConfig
from model.sizing import count_params, mixer_params
from model.variants import FFN_MULTIPLE

REPO = Path(__file__).resolve().parents[2]
PRODUCTION = ("1.3b", "2.7b", "6.7b", "13b")
_SCALE = {"K": 1e3, "M": 1e6, "B": 1e9, "GB": 1e9}


def _source(rel: str) -> str:
    return (REPO / rel).read_text()


def _find(pattern: str, text: str, where: str, count: int | None = None) -> list[re.Match]:
    """Every match of `pattern` in `text`; fails naming `where` when there are none (or not `count`)."""
    found = list(re.finditer(pattern, text, re.S))
    assert found, f"{where}: no statement matches {pattern!r}; reworded? update this test"
    if count is not None:
        assert len(found) == count, f"{where}: {len(found)} statements match {pattern!r}, expected {count}"
    return found


def _within_rounding(actual: float, stated: str, scale: float) -> bool:
    """Whether `actual` rounds to `stated` (a decimal string in units of `scale`) at its stated digits."""
    digits = len(stated.split(".")[1]) if "." in stated else 0
    return round(actual / scale, digits) == float(stated)


def test_presets_docstring_widths_ratios_and_counts() -> None:
    """model/presets.py: `1.3B 5120 (2.5x) -> 1.445B, ...`: each preset's ffn_hidden, its ratio to
    d_model and its total parameter count."""
    matches = _find(r"(\d+(?:\.\d+)?)B (\d+) \(([\d.]+)x\) -> ([\d.]+)B", _source("model/presets.py"),
                    "model/presets.py", count=len(PRODUCTION))
    for m in matches:
        name = m.group(1).lower() + "b"
        cfg = ModelConfig(preset=name)
        assert cfg.ffn_hidden == int(m.group(2)), name
        assert cfg.ffn_hidden % 256 == 0, name
        assert _within_rounding(cfg.ffn_hidden / cfg.d_model, m.group(3), 1), (name, cfg.ffn_hidden / cfg.d_model)
        assert _within_rounding(count_params(cfg), m.group(4), 1e9), (name, count_params(cfg))


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_presets_comment_param_counts(name: str) -> None:
    """model/presets.py: the `~N M params` comment right above a preset's entry."""
    text = _source("model/presets.py")
    entry = text.index(f'    "{name}": {{')
    comment = text[text.rindex("},", 0, entry) if name != "tiny" else text.index("PRESETS"):entry]
    (m,) = _find(r"~([\d.]+)M params", comment, f"model/presets.py ({name})", count=1)
    assert _within_rounding(count_params(ModelConfig(preset=name)), m.group(1), 1e6)


def test_presets_docstring_attention_and_mamba_shares() -> None:
    """model/presets.py: head_dim 128 at 1.3B and up; grouped-query ratios 4:1 (1.3B, 6.7B) and 5:1
    (2.7B, 13B); a Mamba2 mixer holds 6.1-6.2 d_model^2 weights; the untied head is < 5% of the weights."""
    text = _source("model/presets.py")
    _find(r"head_dim 128 at 1\.3B and up", text, "model/presets.py")
    _find(r"ratio 4:1 for 1\.3B and 6\.7B, 5:1 for 2\.7B and 13B", text, "model/presets.py")
    (lo, hi), = [tuple(map(float, m.groups())) for m in _find(r"holds\s+([\d.]+)-([\d.]+) d_model\^2", text,
                                                             "model/presets.py", count=1)]
    (head,) = [float(m.group(1)) for m in _find(r"the head is < (\d+)% of the weights", text, "model/presets.py")]
    ratios = {"1.3b": 4, "2.7b": 5, "6.7b": 4, "13b": 5}
    for name in PRODUCTION:
        cfg = ModelConfig(preset=name)
        assert cfg.d_model // cfg.attention.n_heads == 128, name
        assert cfg.attention.n_heads // cfg.attention.n_kv_heads == ratios[name], name
        assert lo <= round(mixer_params(cfg, MAMBA) / cfg.d_model**2, 1) <= hi, name
        assert not cfg.tie_embeddings
        assert cfg.padded_vocab_size * cfg.d_model / count_params(cfg) < head / 100, name


def test_variants_docstring_mixer_ratio_and_rounding() -> None:
    """model/variants.py: a small Mamba2 mixer holds ~2.4x its attention mixer's weights; rounding the
    SwiGLU width to a multiple of 64 moves the count by at most 32 x 3 x d_model x n_layers (~0.7% of small)."""
    text = _source("model/variants.py")
    (m,) = _find(r"holds ~([\d.]+)x the weights of its attention mixer", text, "model/variants.py", count=1)
    cfg = ModelConfig(preset="small")
    assert _within_rounding(mixer_params(cfg, MAMBA) / mixer_params(cfg, ATTENTION), m.group(1), 1)
    (m,) = _find(r"at most 32 x 3 x d_model x n_layers\s+parameters \(([\d.]+)% of the `small` preset\)", text,
                 "model/variants.py", count=1)
    assert FFN_MULTIPLE == 64
    assert _within_rounding(100 * 32 * 3 * cfg.d_model * cfg.n_layers / count_params(cfg), m.group(1), 1)


@pytest.mark.parametrize("name", [*PRODUCTION, "small"])
def test_run_config_headers_state_the_preset_count(name: str) -> None:
    """config/runs/<name>.yaml's first line: `# <name> preset (N params)` or `(~N params`."""
    first = _source(f"config/runs/{name}.yaml").splitlines()[0]
    (m,) = _find(r"\(~?([\d.]+)([MB]) params", first, f"config/runs/{name}.yaml", count=1)
    assert _within_rounding(count_params(ModelConfig(preset=name)), m.group(1), _SCALE[m.group(2)])


@pytest.mark.parametrize("name", ["1.3b", "2.7b"])
def test_run_config_micro_batch_fits_an_80gb_gpu(name: str) -> None:
    """config/runs/{1.3b,2.7b}.yaml: `fits an 80 GB GPU (python -m train.plan --config NAME)`."""
    from train.plan import plan

    _find(rf"fits an 80 GB GPU\s*#?\s*\(`python -m train.plan --config {re.escape(name)}`\)",
          _source(f"config/runs/{name}.yaml"), f"config/runs/{name}.yaml", count=1)
    cfg = load_run_config(name)
    result = plan(cfg, gpus=8, gpu=80e9 / 2**30)  # --gpu takes GiB
    assert result.fits, (name, result.total)


def test_loss_docstring_logit_sizes() -> None:
    """model/loss.py: 8,192 tokens x 32K vocab is a 1 GB float32 copy; 131,072 tokens x 32K is 8 GB in bf16."""
    text = _source("model/loss.py")
    (m,) = _find(r"At 8,192\s+tokens x 32K vocab that writes and reads a (\d+) GB float32", text, "model/loss.py")
    assert _within_rounding(8192 * 32000 * 4, m.group(1), 1e9)
    (m,) = _find(r"at 131,072\s+tokens x 32K vocabulary they would be (\d+) GB in bf16", text, "model/loss.py")
    assert _within_rounding(131072 * 32000 * 2, m.group(1), 1e9)


def test_minhash_docstring_probability_and_threshold() -> None:
    """config/recipe.py: 14 buckets x 8 hashes dedup a pair at Jaccard 0.8 with P ~ 0.92; the S-curve's
    threshold (1/b)^(1/r) is ~0.72."""
    (m,) = _find(r"(\d+) buckets x (\d+) hashes.*?P\(dedup\) ~ ([\d.]+) at Jaccard ([\d.]+), threshold ~([\d.]+)",
                 _source("config/recipe.py"), "config/recipe.py", count=1)
    buckets, hashes = int(m.group(1)), int(m.group(2))
    settings = MinhashSettings()
    assert (settings.num_buckets, settings.hashes_per_bucket) == (buckets, hashes)
    jaccard = float(m.group(4))
    assert _within_rounding(1 - (1 - jaccard**hashes) ** buckets, m.group(3), 1)
    assert _within_rounding(math.pow(1 / buckets, 1 / hashes), m.group(5), 1)
