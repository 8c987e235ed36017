"""Decoding with the cache equals the full forward (float64, relative error < 1e-10).

The model has both block types; chunk 4 with prompt lengths that are not multiples of it, and a
continuation chunk shorter than the conv width (d_conv 4).
"""

from __future__ import annotations

import pytest
import torch

from model.cache import KVState, MambaState

TOL = 1e-10
PATTERN = "MAMAM"


def _ids(length: int, vocab: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("qk_norm", [False, True])
@torch.no_grad()
def test_prefill_then_steps_equals_forward(qk_norm: bool, tiny_model, rel_err) -> None:
    model = tiny_model(pattern=PATTERN, qk_norm=qk_norm)
    ids = _ids(15, model.cfg.vocab_size, seed=1, batch=2)
    full = model(ids)
    prompt = 6
    last, cache = model.prefill(ids[:, :prompt])
    got = [last]
    for t in range(prompt, ids.size(1)):
        got.append(model.step(ids[:, t], cache))
    # prefill returns the logits at prompt-1; step t returns the logits at position t.
    assert rel_err(torch.stack(got, 1), full[:, prompt - 1 :]) < TOL
    assert cache.seen == ids.size(1)
    assert torch.equal(cache.next_pos, torch.full((2,), ids.size(1)))


@torch.no_grad()
def test_chunked_prefill_equals_forward(tiny_model, rel_err) -> None:
    """Multi-token forwards on a filled cache (chunks of 2, 5 and 4 tokens), then one step."""
    model = tiny_model(pattern=PATTERN)
    ids = _ids(12, model.cfg.vocab_size, seed=2, batch=2)
    full = model(ids)
    cache = model.new_cache(2)
    start = 0
    for n in (2, 5, 4):
        out = model(ids[:, start : start + n], cache=cache)
        assert rel_err(out, full[:, start : start + n]) < TOL, (start, n)
        start += n
    assert rel_err(model.step(ids[:, start], cache), full[:, start]) < TOL


@torch.no_grad()
def test_left_padded_batch_equals_rows_alone(tiny_model, rel_err) -> None:
    """Prompts of lengths 7, 3 and 5 left-padded into one batch, then 4 steps: each row == alone."""
    model = tiny_model(pattern=PATTERN)
    vocab, steps = model.cfg.vocab_size, 4
    lengths = [7, 3, 5]
    seqs = [_ids(n + steps, vocab, seed=10 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.full((len(lengths), width), 5, dtype=torch.long)  # pad id 5: any token must work
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, (n, s) in enumerate(zip(lengths, seqs)):
        ids[i, width - n :], mask[i, width - n :] = s[:n], 1
    last, cache = model.prefill(ids, attention_mask=mask)
    got = [last]
    for k in range(steps):
        got.append(model.step(torch.stack([s[n + k] for n, s in zip(lengths, seqs)]), cache))
    got = torch.stack(got, 1)  # (rows, steps + 1, vocab)
    assert torch.isfinite(got).all()
    for i, (n, s) in enumerate(zip(lengths, seqs)):
        alone = model(s.unsqueeze(0))[0, n - 1 :]
        assert rel_err(got[i], alone) < TOL, i
    assert torch.equal(cache.next_pos, torch.tensor(lengths) + steps)


def _mamba_bytes(cache) -> int:
    return sum(
        st.conv.numel() * st.conv.element_size() + st.ssm.numel() * st.ssm.element_size()
        for st in cache.layers
        if isinstance(st, MambaState)
    )


@torch.no_grad()
def test_mamba_state_size_independent_of_context(tiny_model) -> None:
    model = tiny_model(pattern=PATTERN)
    m = model.cfg
    per_layer = 8 * (m.conv_dim * m.mamba.d_conv + m.n_ssm_heads * m.mamba.headdim * m.mamba.d_state)  # float64
    sizes, kv_sizes = [], []
    for length in (3, 40):
        _, cache = model.prefill(_ids(length, m.vocab_size, seed=3))
        for _ in range(2):
            model.step(torch.tensor([1]), cache)
        sizes.append(_mamba_bytes(cache))
        kv_sizes.append(cache.memory_bytes() - sizes[-1])
        kv_len = [st.length for st in cache.layers if isinstance(st, KVState)]
        assert kv_len == [length + 2] * PATTERN.count("A")
    assert sizes[0] == sizes[1] == PATTERN.count("M") * per_layer
    # The KV cache grows linearly: 2 (k, v) * kv heads * head_dim * 8 bytes per position per layer.
    per_pos = 2 * m.attention.n_kv_heads * m.head_dim * 8 * PATTERN.count("A")
    assert kv_sizes == [per_pos * 5, per_pos * 42]


@pytest.mark.parametrize("penalty", [1.0, 5.0])
def test_generate_batch_equals_rows_alone_with_repetition_penalty(tiny_model, penalty) -> None:
    """Greedy generation of left-padded prompts gives each row what it gives alone, also with a
    repetition penalty: padding must not enter the penalised history. The pad id is the first token
    the shortest row generates alone, so a penalised pad would change that row."""
    from model.generation import SamplingParams, generate

    model = tiny_model(pattern=PATTERN)
    params = SamplingParams(temperature=0.0, max_new_tokens=6, repetition_penalty=penalty)
    prompts = [_ids(n, model.cfg.vocab_size, seed=20 + n)[0].tolist() for n in (7, 2, 4)]
    alone = [generate(model, [p], params)[0] for p in prompts]
    pad_id = alone[1][0]
    assert pad_id not in prompts[1]
    assert generate(model, prompts, params, pad_id=pad_id) == alone


def test_static_cache_decodes_like_the_growing_cache(tiny_model, rel_err) -> None:
    """The static form (fixed-capacity KV, device-side fill count: what a CUDA graph replays) gives the
    growing cache's logits step by step, left-padded rows included; float64 reference path."""
    model = tiny_model(pattern=PATTERN)
    ids = _ids(9, model.cfg.vocab_size, seed=3, batch=3)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4], mask[2, :2] = 0, 0
    runs = []
    for static in (False, True):
        logits, cache = model.prefill(ids, mask)
        if static:
            cache.make_static(9 + 6)
        steps = [logits]
        for _ in range(5):
            steps.append(model.step(steps[-1].argmax(-1), cache))
        runs.append(torch.stack(steps, 1))
    assert rel_err(runs[1], runs[0]) < TOL
    assert int(cache.filled) == 14 and torch.equal(cache.next_pos, torch.tensor([14, 10, 12]))


def test_cuda_graph_capture_needs_cuda_and_a_static_cache(tiny_model) -> None:
    from model.decode_graph import GraphedDecodeStep

    model = tiny_model(pattern=PATTERN)
    _, cache = model.prefill(_ids(4, model.cfg.vocab_size, seed=1))
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        GraphedDecodeStep(model, cache)
    with pytest.raises(ValueError, match="below the 4 positions"):
        cache.make_static(3)


@pytest.mark.parametrize("setting, device, expected", [
    ("auto", "cpu", False), ("auto", "cuda", True), (False, "cuda", False), ("false", "cuda", False),
    (True, "cuda", True), ("True", "cuda", True), ("no", "cpu", False),
])
def test_decode_graph_setting_resolves_per_device(setting, device: str, expected: bool) -> None:
    """auto (every entrypoint's default) decodes through CUDA graphs exactly on CUDA devices."""
    from model.decode_graph import decode_graph_enabled

    assert decode_graph_enabled(setting, torch.device(device)) is expected


@pytest.mark.parametrize("setting, message", [(True, "needs a CUDA device"), ("maybe", "auto, true or false")])
def test_decode_graph_setting_refuses_what_cannot_run(setting, message: str) -> None:
    from model.decode_graph import decode_graph_enabled

    with pytest.raises(ValueError, match=message):
        decode_graph_enabled(setting, torch.device("cpu"))
