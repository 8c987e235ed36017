"""Named model sizes. `ModelConfig(preset=NAME, **overrides)` starts from these values.

Why the numbers are what they are (counts from `model.sizing.count_params`, printed by
`python -m model list`; every count and ratio stated here is checked by tests/model/test_stated_numbers.py):

- Attention share 1/6 for every size (`attn_ratio`), placed by the strategic-placement rule: enough
  global mixing for retrieval/in-context copying (early, middle and top), while 5/6 of the blocks
  are Mamba2 so that training and prefill cost grow ~linearly with sequence length and decoding
  memory stays flat for most layers.
- Attention: head_dim 128 at 1.3B and up (the widest head flash-attn 2 and SDPA run at full speed on
  Hopper), grouped-query ratio 4:1 for 1.3B and 6.7B, 5:1 for 2.7B and 13B (the KV cache shrinks 4-5x,
  quality is within noise of MHA at these sizes per the Llama-2/3 ablations).
- Mamba2: d_state 128, headdim 64, expand 2, n_groups 1, conv 4, chunk 256: the Mamba2 paper's
  defaults for these scales (and mamba_ssm's), with chunk 256 the Triton SSD kernel's sweet spot.
- SwiGLU width: every block (Mamba2 or attention) carries an MLP. A Mamba2 mixer already holds
  6.1-6.2 d_model^2 weights at the production sizes, so the MLP width is chosen to land the totals on
  the published table (1.44B, 2.56B, 5.96B, 10.66B) rather than at the usual 8/3 d_model. Widths are
  multiples of 256 for tensor-core-friendly GEMMs: 1.3B 5120 (2.5x) -> 1.445B, 2.7B 5120 (2.0x) -> 2.587B,
  6.7B 6912 (1.69x) -> 5.952B, 13B 7424 (1.45x) -> 10.593B.
- Embeddings: untied for the production sizes (the head is < 5% of the weights there and untied
  heads train slightly better), tied for `tiny`/`small` where the embedding would otherwise be a
  large share of the model. Vocab 32000 (a multiple of 128: no padding) for the production
  tokenizer; `tiny` uses 8192, the size the embedded curation recipe trains.
- Context 8192 for the production sizes; `tiny` 1024 so CPU tests stay fast.
"""

from __future__ import annotations

from typing import Any

_PRODUCTION_MAMBA = {"d_state": 128, "headdim": 64, "expand": 2, "n_groups": 1, "d_conv": 4, "chunk_size": 256}

PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the embedded default run: ~6.5M params, both block types, chunked SSD with
    # several chunks per 256-token sequence.
    "tiny": {
        "vocab_size": 8192,
        "d_model": 256,
        "n_layers": 6,
        "attn_ratio": 1 / 3,
        "ffn_hidden": 512,
        "attention": {"n_heads": 4, "n_kv_heads": 2},
        "mamba": {"d_state": 32, "headdim": 32, "expand": 2, "n_groups": 1, "d_conv": 4, "chunk_size": 64},
        "tie_embeddings": True,
        "max_seq_len": 1024,
    },
    # GPT-2-small scale (~122M params) for quick GPU experiments and kernel-parity checks.
    "small": {
        "vocab_size": 32000,
        "d_model": 768,
        "n_layers": 12,
        "attn_ratio": 1 / 6,
        "ffn_hidden": 2048,
        "attention": {"n_heads": 12, "n_kv_heads": 4},
        "mamba": _PRODUCTION_MAMBA,
        "tie_embeddings": True,
        "max_seq_len": 8192,
    },
    "1.3b": {
        "vocab_size": 32000,
        "d_model": 2048,
        "n_layers": 24,
        "attn_ratio": 1 / 6,
        "ffn_hidden": 5120,
        "attention": {"n_heads": 16, "n_kv_heads": 4},
        "mamba": _PRODUCTION_MAMBA,
        "tie_embeddings": False,
        "max_seq_len": 8192,
    },
    "2.7b": {
        "vocab_size": 32000,
        "d_model": 2560,
        "n_layers": 32,
        "attn_ratio": 1 / 6,
        "ffn_hidden": 5120,
        "attention": {"n_heads": 20, "n_kv_heads": 4},
        "mamba": _PRODUCTION_MAMBA,
        "tie_embeddings": False,
        "max_seq_len": 8192,
    },
    "6.7b": {
        "vocab_size": 32000,
        "d_model": 4096,
        "n_layers": 32,
        "attn_ratio": 1 / 6,
        "ffn_hidden": 6912,
        "attention": {"n_heads": 32, "n_kv_heads": 8},
        "mamba": _PRODUCTION_MAMBA,
        "tie_embeddings": False,
        "max_seq_len": 8192,
    },
    "13b": {
        "vocab_size": 32000,
        "d_model": 5120,
        "n_layers": 40,
        "attn_ratio": 1 / 6,
        "ffn_hidden": 7424,
        "attention": {"n_heads": 40, "n_kv_heads": 8},
        "mamba": _PRODUCTION_MAMBA,
        "tie_embeddings": False,
        "max_seq_len": 8192,
    },
}


def preset_values(name: str) -> dict[str, Any]:
    """The raw values of preset `name` (a fresh copy, with `preset` set)."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"preset {name!r} is unknown; choose one of {', '.join(PRESETS)}")
    import copy

    return {**copy.deepcopy(PRESETS[key]), "preset": key}
