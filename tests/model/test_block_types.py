"""The block-type registry and the block types beyond M and A (routed `R`, gated memory `G`, hierarchical `H`),
and the hybrid options that change what blocks compute (bridges, state compression), which the model-level
checks below cover too (their own checks: tests/model/test_hybrid_options.py).

Every numerical check runs a float64 model on the reference path: causality and packing are exact up
to rounding (<= 1e-12 relative), decoding token by token equals the full forward (<= 1e-10 relative, the
issue's bound). The routing rule is checked against a plain per-token loop (a second implementation), the
hierarchical block's slow state against the span recurrence written out by hand.
"""

from __future__ import annotations

import pytest
import torch

from config.loader import ConfigError
from model import HybridLM, ModelConfig
from model.mixers import MixerContext, block_type, block_types
from model.mixers.routed import RoutedMixer, budget, route
from model.sizing import count_params

# Patterns that put each new block type between the others; the routed layers route often enough at toy
# sizes (capacity 0.5, threshold 0.3) that attention among routed tokens is exercised; the hierarchical layers'
# spans are the tiny chunk (4 tokens), so a 24-token row holds 6.
# The options run on patterns of M and A, on one with R and G (compression inside them) and with H; tiny_model
# perturbs every 1-D parameter, so the bridges' gates are open.
PATTERNS = {"R": "MRAR", "G": "GMAG", "H": "HMAH", "bridges": "MAMA", "compression2": "MAMA", "compression4": "MRAG",
            "all_options": "HAMH"}
OVERRIDES = {"routed": {"capacity": 0.5, "threshold": 0.3}, "gated": {"slots": 6}}
OPTIONS = {"bridges": {"bridges": True}, "compression2": {"mamba": {"state_compression": 2}},
           "compression4": {"mamba": {"state_compression": 4}},
           "all_options": {"bridges": True, "mamba": {"state_compression": 2}}}
CASES = list(PATTERNS)


@pytest.fixture
def model_of(tiny_model):
    def make(case: str, seed: int = 0) -> HybridLM:
        return tiny_model(PATTERNS[case], seed=seed, **OVERRIDES, **OPTIONS.get(case, {}))
    return make


def test_registry_lists_every_letter_once_and_unknown_letters_are_config_errors() -> None:
    assert list(block_types()) == ["M", "A", "R", "G", "H"]
    for letter, cls in block_types().items():
        assert cls.letter == letter and cls.name and cls.description and cls.design
    with pytest.raises(Exception, match=r"pattern has unknown block type 'X': known letters are M \(mamba2\), "
                                        r"A \(attention\), R \(routed\), G \(gated_memory\), H \(hierarchical\)"):
        ModelConfig(preset="tiny", pattern="MXMAMM")
    from config.schema import load_run_config
    with pytest.raises(ConfigError, match=r"^config error: model\.pattern has unknown block type 'Z'"):
        load_run_config("tiny", ["model.pattern=MZMAMM"])


@pytest.mark.parametrize("letter", ["R", "G", "H"])
def test_param_count_formula_equals_the_built_model(letter: str, tiny_config) -> None:
    for slots in (0, 6):
        cfg = tiny_config(PATTERNS[letter], **{**OVERRIDES, "gated": {"slots": slots}})
        assert count_params(cfg) == sum(p.numel() for p in HybridLM(cfg).parameters())


@pytest.mark.parametrize("letter", CASES)
def test_causal(letter: str, model_of) -> None:
    """Changing the tokens after t changes no logit at or before t."""
    model = model_of(letter)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 61, (2, 24), generator=gen)
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 61, (2, 12), generator=gen)
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("letter", CASES)
def test_decode_equals_full_forward(letter: str, model_of, rel_err) -> None:
    """A 5-token prefill then 25 one-token steps give the full forward's logits for 30 tokens."""
    model = model_of(letter)
    ids = torch.randint(0, 61, (3, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        logits, cache = model.prefill(ids[:, :5])
        steps = [logits] + [model.step(ids[:, t], cache) for t in range(5, 29)]
    assert rel_err(torch.stack(steps, 1), full[:, 4:29]) <= 1e-10


@pytest.mark.parametrize("letter", CASES)
def test_left_padded_and_static_decoding_equal_rows_alone(letter: str, model_of, rel_err) -> None:
    """A left-padded batch decodes each row as it decodes alone, with the growing and the static cache."""
    model = model_of(letter)
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(0, 61, (n,), generator=gen) for n in (9, 4)]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 9 - len(r):], mask[i, 9 - len(r):] = r, 1
    nxt = torch.randint(0, 61, (2, 6), generator=gen)
    with torch.no_grad():
        alone = []
        for i, r in enumerate(rows):
            full = model(torch.cat([r, nxt[i]]).unsqueeze(0))[0]
            alone.append(full[len(r) - 1 : len(r) + 5])
        for static in (False, True):
            logits, cache = model.prefill(ids, mask)
            if static:
                cache.make_static(16)
            got = [logits] + [model.step(nxt[:, t], cache) for t in range(5)]
            got = torch.stack(got, 1)
            for i in range(2):
                assert rel_err(got[i], alone[i]) <= 1e-10, (static, i)


@pytest.mark.parametrize("letter", CASES)
def test_packed_equals_unpacked(letter: str, model_of, doc_seq_idx, rel_err) -> None:
    model = model_of(letter)
    lengths = [7, 12, 5]
    ids = torch.randint(0, 61, (1, sum(lengths)), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        packed = model(ids, seq_idx=doc_seq_idx(lengths))
        start = 0
        for n in lengths:
            assert rel_err(packed[:, start : start + n], model(ids[:, start : start + n])) <= 1e-12
            start += n


@pytest.mark.parametrize("letter", CASES)
def test_every_parameter_gets_a_gradient(letter: str, model_of) -> None:
    model = model_of(letter).train()
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(7))
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("letter", ["R", "G", "H", "all_options"])
def test_save_load_round_trip(letter: str, model_of, tmp_path) -> None:
    from model.weights import load_weights, save_weights

    model = model_of(letter)
    save_weights(model, tmp_path)
    loaded = load_weights(tmp_path, dtype=torch.float64).eval()
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def _route_loop(wants, positions, seq_idx, capacity, count0=None):
    """The rule of model/mixers/routed.py token by token: c_t = min(c_{t-1} + d_t, A_t), reset per document."""
    b, l = wants.shape
    routed = torch.zeros(b, l, dtype=torch.bool)
    last = torch.zeros(b, dtype=torch.long)
    for i in range(b):
        c = int(count0[i]) if count0 is not None else 0
        for t in range(l):
            if t > 0 and seq_idx is not None and seq_idx[i, t] != seq_idx[i, t - 1]:
                c = 0
            allowed = int(budget(positions[i, t : t + 1], capacity))
            new = min(c + int(wants[i, t]), allowed)
            routed[i, t], c = new > c, new
        last[i] = c
    return routed, last


def test_route_equals_the_token_by_token_rule() -> None:
    from model.documents import positions_from_seq_idx

    gen = torch.Generator().manual_seed(9)
    seq_idx = torch.tensor([[0] * 13 + [1] * 20 + [2] * 7, [0] * 40])
    positions = positions_from_seq_idx(seq_idx)
    for capacity in (0.15, 0.5, 1.0):
        wants = torch.rand(2, 40, generator=gen) > 0.3
        got = route(wants, positions, seq_idx, capacity)
        want = _route_loop(wants, positions, seq_idx, capacity)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        # continuing a document: positions go on from 25 and 3 tokens were routed before
        later = torch.arange(25, 65).expand(2, 40)
        count0 = torch.tensor([3, 0])
        got = route(wants, later, None, capacity, count0)
        want = _route_loop(wants, later, None, capacity, count0)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        # the cap holds at every prefix of every document
        routed = route(torch.ones(2, 40, dtype=torch.bool), positions, seq_idx, capacity)[0]
        for i in range(2):
            for doc in seq_idx[i].unique():
                sel = routed[i][seq_idx[i] == doc].long().cumsum(0)
                assert torch.all(sel <= budget(positions[i][seq_idx[i] == doc], capacity))


def test_routed_kernel_path_gathers_the_routed_tokens_exactly(model_of, doc_seq_idx, flash_standins) -> None:
    """The kernel path's gather + varlen attention (flash-attn's contract, here on SDPA in float64) equals
    the reference path's masked attention on every routed token, across documents."""
    model = model_of("R")
    mixer: RoutedMixer = model.layers[1].mixer
    lengths = [9, 14, 9]
    seq_idx = doc_seq_idx(lengths).expand(2, -1).contiguous()
    x = torch.randn(2, sum(lengths), 32, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    from model.documents import positions_from_seq_idx

    positions = positions_from_seq_idx(seq_idx)
    ctx = MixerContext.of_documents(seq_idx)
    ctx.positions, ctx.rope = positions, model.rope(positions, x.dtype)
    routed = torch.rand(2, x.size(1), generator=torch.Generator().manual_seed(11)) > 0.6
    calls: list = []
    with torch.no_grad():
        got = mixer._gathered_attention(x, ctx, routed, flash_standins(calls).varlen)
        want = mixer._masked_attention(x, ctx, routed)
    assert calls and calls[0][0] == "varlen"
    torch.testing.assert_close(got[routed], want[routed], rtol=1e-12, atol=1e-12)
    assert torch.equal(got[~routed], torch.zeros_like(got[~routed]) @ mixer.attn.o_proj.weight.t())


def test_statistics_are_reported_per_layer(model_of) -> None:
    routed, gated = model_of("R"), model_of("G")
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        routed(ids)
        gated(ids)
    stats = routed.block_statistics()
    assert set(stats) == {"layers.1.routed_fraction", "layers.1.router_score", "layers.3.routed_fraction",
                          "layers.3.router_score"}
    assert 0 < stats["layers.1.routed_fraction"] <= 0.5
    g = gated.block_statistics()
    assert {"layers.0.gate_mean", "layers.0.gate_std", "layers.0.memory_max_slot_mass"} <= set(g)
    mass = gated.layers[0].mixer.memory_read_mass()
    assert mass.shape == (6,) and abs(float(mass.sum()) - 1) < 1e-6  # float32 statistics


def test_stats_command_prints_every_layer(tiny_bundle_dir, tmp_path, test_tokenizer_dir, capsys) -> None:
    from model.__main__ import main
    from model.bundle import save_bundle

    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", vocab_size=512, d_model=64, n_layers=4, pattern="MRAG", ffn_hidden=128,
                      attention={"n_heads": 4, "n_kv_heads": 2}, gated={"slots": 4},
                      mamba={"d_state": 16, "headdim": 16, "chunk_size": 16})
    folder = save_bundle(HybridLM(cfg), test_tokenizer_dir, tmp_path / "bundle")
    main(["stats", str(folder), "--text", "def main():\n    return 0\n" * 4])
    out = capsys.readouterr().out
    assert "layer   1 R routed" in out and "routed_fraction" in out
    assert "layer   3 G gated_memory" in out and "gate_mean" in out and "top slots" in out


def test_exports_refuse_block_types_and_options_they_cannot_express(model_of, tmp_path) -> None:
    from export import ExportError
    from export.hf import check_exportable
    from export.onnx_export import export_onnx

    named = {"R": "block type R ", "G": "block type G ", "H": "block type H ", "bridges": "model.bridges=true ",
             "compression2": "model.mamba.state_compression=2 "}
    for case, what in named.items():
        model = model_of(case)
        with pytest.raises(ExportError, match=f"^cannot export {what}.*to Hugging Face") as e:
            check_exportable(model.cfg)
        assert "\n" not in str(e.value)
        with pytest.raises(ExportError, match=f"^cannot export {what}.*to ONNX"):
            export_onnx(model, tmp_path / case)
        assert not (tmp_path / case).exists()


def test_quantization_keeps_the_linears_each_mixer_names(model_of) -> None:
    from export.quantize import quantizable_linears

    names = set(quantizable_linears(model_of("R")))
    assert "layers.1.mixer.attn.q_proj" in names and "layers.1.mixer.ssm.in_proj" in names
    assert "layers.1.mixer.router" not in names
    # Mamba2's out_proj is quantized: the fused scan hands a swapped out_proj its output (model/mamba2.py)
    assert "layers.1.mixer.ssm.out_proj" in names and "layers.0.mixer.out_proj" in names


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_every_mlp_kind_counts_trains_and_exports_or_refuses(mlp: str, tiny_model, tmp_path) -> None:
    """Each registered MLP kind: the parameter formula equals the built model, every parameter gets a
    gradient, and HF export takes it only if Bamba expresses it (one-line refusal otherwise)."""
    from export import ExportError
    from export.hf import bamba_norms_per_group, check_exportable
    from model.mlps import mlp_kinds

    assert set(mlp_kinds()) == {"swiglu", "gelu"}
    model = tiny_model("MAMA", mlp=mlp).train()
    assert count_params(model.cfg) == sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(13))
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    if mlp_kinds()[mlp].hf_export and bamba_norms_per_group():
        check_exportable(model.cfg)
    elif mlp_kinds()[mlp].hf_export:  # this model has 2 SSM groups: refused where transformers normalizes them as one
        with pytest.raises(ExportError, match="cannot export mamba.n_groups=2 with transformers"):
            check_exportable(model.cfg)
    else:
        with pytest.raises(ExportError, match=f"cannot export MLP kind {mlp} to Hugging Face"):
            check_exportable(model.cfg)
    with pytest.raises(Exception, match="mlp is an unknown MLP kind 'relu': known kinds are swiglu, gelu"):
        ModelConfig(preset="tiny", mlp="relu")


def test_zero3_leaves_are_the_mixers_that_read_weights_outside_their_modules(model_of) -> None:
    model = model_of("R")
    leaves = model.zero3_leaves()
    assert model.layers[0].mixer in leaves and model.layers[1].mixer in leaves  # Mamba2, routed
    assert model.layers[2].mixer not in leaves  # attention calls its Linears as modules
    assert all(layer.mlp in leaves for layer in model.layers)
    assert block_type("A").zero3_leaves is not block_type("M").zero3_leaves


def test_hierarchical_slow_state_equals_the_span_recurrence(model_of, doc_seq_idx) -> None:
    """Every token's slow-state read, packed documents included, equals S_{J_t} of the module docstring written
    out per document: S_0 = 0, S_{j+1} = a S_j + (1 - a) mean(v over span j), J_t = floor(p_t / k)."""
    from model.documents import positions_from_seq_idx
    from model.mixers.hierarchical import HierarchicalMixer

    mixer: HierarchicalMixer = model_of("H").layers[0].mixer
    k, lengths = mixer.span, [7, 13, 4]
    seq_idx = doc_seq_idx(lengths)
    ctx = MixerContext.of_documents(seq_idx)
    ctx.positions = positions_from_seq_idx(seq_idx)
    v = torch.randn(1, sum(lengths), mixer.cfg.slow_width, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        reads = mixer.slow_states(v, ctx, None)[0][0]
        a = torch.sigmoid(mixer.decay_logit)
    start = 0
    for n in lengths:
        doc = v[0, start : start + n]
        spans = [torch.zeros_like(doc[0])]
        for j in range(n // k):
            spans.append(a * spans[-1] + (1 - a) * doc[j * k : (j + 1) * k].mean(0))
        want = torch.stack([spans[p // k] for p in range(n)])
        torch.testing.assert_close(reads[start : start + n], want, rtol=1e-12, atol=1e-12)
        start += n
    assert reads[k:lengths[0]].abs().sum() > 0  # the first document's second span reads its first


@pytest.mark.slow
def test_hierarchical_decoding_state_is_fixed_size(tiny_config) -> None:
    """The decoding state of an H layer holds the same tensors, of the same bytes, after 1,024 and after
    4,096 one-token steps (the slow state moves, its size does not)."""
    from model.mixers.hierarchical import HierarchicalMixer

    mixer = HierarchicalMixer(tiny_config("H"), 0).eval()
    state = mixer.empty_state(1, torch.device("cpu"), torch.float32)
    x = torch.randn(1, 4096, 32, generator=torch.Generator().manual_seed(15))
    seen = {}
    with torch.no_grad():
        for p in range(4096):
            mixer(x[:, p : p + 1], MixerContext(positions=torch.tensor([[p]])), state)
            if p + 1 in (1024, 4096):
                seen[p + 1] = (state.nbytes(), [t.shape for t in state.tensors()], state.slow.clone())
    assert seen[1024][:2] == seen[4096][:2]
    assert seen[1024][0] == 4 * (96 * 4 + 8 * 8 * 8 + 2 * 32)  # conv (96 channels x d_conv 4) + SSM + 2 x (w,)
    assert not torch.equal(seen[1024][2], seen[4096][2])
