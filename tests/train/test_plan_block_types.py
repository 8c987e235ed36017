"""The planner's activation formulas for every block type (`Mixer.saved_activation_bytes`, which
train/plan_memory.py sums per block): every registered letter plans, M and A keep the numbers they had
in train/plan_memory.py, and the formulas of attention and of the composite blocks R, G, H equal what
autograd saves in a bf16 forward on CPU."""

from __future__ import annotations

import itertools
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import model.mixers.routed as routed_module
from config.schema import load_run_config
from model.config import ModelConfig
from model.layers import RotaryEmbedding
from model.mamba2 import Mamba2Mixer
from model.mixers import Mixer, MixerContext, block_type, block_types
from train.plan import plan
from train.plan_memory import CHECKPOINT_MODES, activations, block_activation_bytes

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("letter", list(block_types()))
def test_every_block_type_plans(letter: str) -> None:
    """A pattern holding the letter gets activations in every checkpointing mode and a whole plan (what
    launch/pretrain.py's preflight asks for on a GPU)."""
    cfg = ModelConfig(preset="tiny", n_layers=4, pattern=f"M{letter}A{letter}")
    tokens = 4096
    per_block = sum(block_activation_bytes(cfg, letter).values())
    n_blocks = cfg.layer_pattern.count(letter)
    assert activations(cfg, tokens, "none")[letter] == pytest.approx(n_blocks * per_block * tokens)
    for mode in CHECKPOINT_MODES:
        assert activations(cfg, tokens, mode)[letter] >= 0
    assert plan(load_run_config("tiny", [f"model.pattern=M{letter}A{letter}M{letter}"]), 1).total > 0


def test_mamba2_and_attention_numbers_are_unchanged() -> None:
    """The 1.3B's per-token mixer bytes and 8192-token activations, as the formulas gave them when they
    lived in train/plan_memory.py's block_activation_bytes (commit affdfa1)."""
    cfg = ModelConfig(preset="1.3b")
    assert block_activation_bytes(cfg, "M", 2) == {"norms": 16384, "mixer": 43652.0, "mlp": 30720}
    assert block_activation_bytes(cfg, "A", 2) == {"norms": 16384, "mixer": 10304, "mlp": 30720}
    assert block_activation_bytes(cfg, "M", 4)["mixer"] == 77572.0
    assert block_activation_bytes(cfg, "A", 4)["mixer"] == 20544
    recompute = ModelConfig(preset="1.3b", mamba={"recompute_in_backward": True})
    assert block_activation_bytes(recompute, "M", 2)["mixer"] == 25216
    assert activations(cfg, 8192, "none") == {"M": 14869463040.0, "A": 1881145344.0, "head": 591396864,
                                              "recompute": 0.0, "host": 0.0}


# Each case: a letter and the config it runs with (tiny widths: d 256, 4 heads of 64, 2 kv heads; spans of
# 64 tokens). The routed block's threshold is low enough that every token asks for attention, so that each
# prefix routes its cap: the formula's assumption (an upper bound). The measured rows are max_seq_len long,
# the hierarchical formula's row length.
LENGTH = 512
CASES: dict[str, tuple[str, dict]] = {
    "A": ("A", {}),
    "R": ("R", {"routed": {"capacity": 0.25, "threshold": 0.01}}),
    "G": ("G", {"gated": {"slots": 8}}),
    "G_no_memory": ("G", {"gated": {"slots": 0}}),
    "H": ("H", {"hierarchical": {"width": 128}}),
}


def _sdpa_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                 max_q: int, max_k: int, causal: bool, deterministic: bool = False) -> torch.Tensor:
    """flash-attn's varlen contract ((n, h, k) + cu_seqlens) as SDPA per segment: on CPU in bf16 its flash
    kernel saves what flash-attn's does (q, k, v, output, float32 log-sum-exp)."""
    def heads(t: torch.Tensor, a: int, b: int) -> torch.Tensor:  # (n, h, k) -> (1, h, b - a, k)
        return t[a:b].transpose(0, 1).unsqueeze(0)

    sdpa = torch.nn.functional.scaled_dot_product_attention
    return torch.cat([sdpa(heads(q, a, b), heads(k, a, b), heads(v, a, b), is_causal=causal, enable_gqa=True)[0]
                      .transpose(0, 1) for a, b in itertools.pairwise(cu_q.tolist())])


def _saved_outside_mamba2(mixer: Mixer, x: torch.Tensor, ctx: MixerContext) -> int:
    """Bytes of the distinct storages autograd saves in one forward of `mixer`, leaving out the parameters,
    the input x, the shared RoPE tables and whatever its Mamba2 sub-mixers save inside their own forwards."""
    skip = {t.untyped_storage().data_ptr() for t in (*mixer.parameters(), x, *ctx.rope)}
    # the storages themselves, held so that a freed one's address cannot come back as another's
    seen: dict[int, torch.UntypedStorage] = {}
    depth = [0]  # > 0 inside a Mamba2 sub-mixer's forward

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if depth[0] == 0 and storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage
        return t

    def enter(*_: object) -> None:
        depth[0] += 1

    def leave(*_: object) -> None:
        depth[0] -= 1

    subs = [m for m in mixer.modules() if isinstance(m, Mamba2Mixer)]
    hooks = [h for m in subs for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mixer(x, ctx)
    finally:
        for h in hooks:
            h.remove()
    return sum(storage.nbytes() for storage in seen.values())


@pytest.mark.parametrize("case", list(CASES))
def test_formulas_match_what_autograd_saves(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per token, the formula less its Mamba2 sub-mixers' share equals the bytes autograd saves outside
    those sub-mixers, in a bf16 forward of two 512-token rows on CPU: to the byte, but for the
    hierarchical block's 0.5%.

    What runs as on the GPU: every mixer but Mamba2 on its kernel path (attention's SDPA with GQA, the
    routed block's gather of routed tokens), flash-attn's varlen function standing in as per-segment SDPA.
    What is left out: Mamba2's share, whose kernel-path form (model/ssd_saved.py, Triton) does not run on
    CPU and whose reference path saves other, float32, tensors (~8x the bytes here): its formula is checked
    against the committed H100 runs' memory (tests/train/test_plan.py), not here; the cu_seqlens of the
    varlen call (a few int32 per micro-batch).
    The 0.5% covers the hierarchical block's per-micro-batch tensors (1 - a per span and the decays, w
    float32 each), which its formula counts per row: 0.3% of its own bytes here, at two rows."""
    letter, over = CASES[case]
    cfg = ModelConfig(preset="tiny", n_layers=1, pattern=letter, max_seq_len=LENGTH, **over)
    torch.manual_seed(0)
    mixer = block_type(letter)(cfg, 0).to(torch.bfloat16)
    for m in mixer.modules():
        if isinstance(m, Mixer):
            m.impl = "reference" if isinstance(m, Mamba2Mixer) else "kernels"
    monkeypatch.setattr(routed_module, "flash_ops", lambda: types.SimpleNamespace(varlen=_sdpa_varlen))
    rows = 2
    x = torch.randn(rows, LENGTH, cfg.d_model, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(LENGTH).expand(rows, -1)
    rope = RotaryEmbedding(cfg.head_dim, cfg.attention.rope_theta, cfg.attention.rope_scaling)(positions, x.dtype)
    measured = _saved_outside_mamba2(mixer, x, MixerContext(rope=rope, positions=positions)) / (rows * LENGTH)

    n_mamba = sum(isinstance(m, Mamba2Mixer) for m in mixer.modules())
    estimate = block_type(letter).saved_activation_bytes(cfg, 2) - n_mamba * Mamba2Mixer.saved_activation_bytes(cfg, 2)
    if letter == "R":  # the threshold made every prefix route its cap, the formula's assumption
        assert mixer.statistics()["routed_fraction"] == cfg.routed.capacity
    assert estimate == pytest.approx(measured, rel=0.005 if letter == "H" else 1e-12)


# ---- activation checkpointing's scope: train.checkpoint_block_types, and `attention` on every block type ----

def _expected(cfg: ModelConfig, tokens: int, mode: str, block_types: str | None) -> dict[str, float]:
    """Hand-computed from block_activation_bytes: a selected block keeps its input (2 d: hidden state and
    residual) under full, everything but its mixer's tensors under attention, everything but its MLP's under
    mlp (the recomputed part's input is a norm's output, already in the norms term); an unselected one keeps
    everything."""
    d, e = cfg.d_model, 2
    out: dict[str, float] = {}
    for kind in cfg.layer_pattern:
        parts = block_activation_bytes(cfg, kind, e)
        whole = sum(parts.values())
        chosen = block_types is None or kind in block_types
        kept = {"full": 2 * d * e, "attention": whole - parts["mixer"], "mlp": whole - parts["mlp"]}[mode] \
            if chosen else whole
        out[kind] = out.get(kind, 0.0) + kept * tokens
    return out


@pytest.mark.parametrize("mode", ["full", "attention", "mlp"])
@pytest.mark.parametrize("block_types", [None, "A", "M", "MA"])
def test_checkpointing_applies_to_the_selected_blocks(mode: str, block_types: str | None) -> None:
    """MAMA: `attention` recomputes each selected block's mixer, M's (in_proj, conv, scan) as A's; with
    checkpoint_block_types=A the M blocks keep everything under every mode (as apply_activation_checkpointing
    wraps only the selected blocks)."""
    cfg = ModelConfig(preset="tiny", n_layers=4, pattern="MAMA")
    tokens = 4096
    acts = activations(cfg, tokens, mode, block_types=block_types)
    expected = _expected(cfg, tokens, mode, block_types)
    assert {k: acts[k] for k in "MA"} == pytest.approx(expected)
    parts = {k: block_activation_bytes(cfg, k) for k in "MA"}
    rebuilt = [sum(p.values()) if mode == "full" else p["mixer" if mode == "attention" else "mlp"]
               for k, p in parts.items() if block_types is None or k in block_types]
    assert acts["recompute"] == max(rebuilt) * tokens
    whole = activations(cfg, tokens, "none")
    if block_types == "A":
        assert acts["M"] == whole["M"]
    if mode == "attention" and block_types is None:  # the M blocks' mixer bytes are no longer kept
        m = parts["M"]
        assert acts["M"] == 2 * (sum(m.values()) - m["mixer"]) * tokens < whole["M"]


def test_small_pattern_by_hand() -> None:
    """tiny MAMA (d 256, ffn 512, bf16), 1024 tokens, the numbers worked out by hand from the per-token parts
    (norms 2 x 2 x 256 x 2 = 2048, SwiGLU 3 x 512 x 2 = 3072, the mixers' formulas) and the blocks' weights.

    attention / mlp: a selected block keeps all but the recomputed part (its input is a norm's output,
    already in norms); offload: nothing of a selected block on the GPU, its saved bytes and weights on the host,
    and the largest such block twice on the GPU in the backward (in use and in flight)."""
    from model.sizing import block_params

    cfg = ModelConfig(preset="tiny", n_layers=4, pattern="MAMA")
    assert block_activation_bytes(cfg, "M") == {"norms": 2048, "mixer": 5796.0, "mlp": 3072}
    assert block_activation_bytes(cfg, "A") == {"norms": 2048, "mixer": 1552, "mlp": 3072}
    assert (block_params(cfg, "M"), block_params(cfg, "A")) == (810_864, 590_336)
    tokens, head = 1024, 17_825_792  # head: (2 x 256 x 2 + 8192 x 2) x 1024
    # per token: M whole 2048 + 5796 + 3072 = 10916, A whole 2048 + 1552 + 3072 = 6672
    assert activations(cfg, tokens, "attention") == {
        "M": 2 * (10916 - 5796) * 1024, "A": 2 * (6672 - 1552) * 1024, "head": head, "recompute": 5796 * 1024,
        "host": 0.0}
    assert activations(cfg, tokens, "mlp") == {
        "M": 2 * (10916 - 3072) * 1024, "A": 2 * (6672 - 3072) * 1024, "head": head, "recompute": 3072 * 1024,
        "host": 0.0}
    m_block = 10916 * 1024 + 2 * 810_864  # 12,799,712 bytes: an M block's saved tensors and bf16 weights
    a_block = 6672 * 1024 + 2 * 590_336  # 8,012,800
    assert activations(cfg, tokens, "offload") == {
        "M": 0.0, "A": 0.0, "head": head, "recompute": 0.0, "host": 2 * m_block + 2 * a_block,
        "offload_transient": m_block, "offload_in_flight": m_block}
    assert activations(cfg, tokens, "offload", block_types="A") == {
        "M": 2 * 10916 * 1024, "A": 0.0, "head": head, "recompute": 0.0, "host": 2 * a_block,
        "offload_transient": a_block, "offload_in_flight": a_block}
    assert "offload_in_flight" not in activations(cfg, tokens, "offload", block_types="R")  # no R block here


def test_offload_counts_fp8s_extra_on_the_host() -> None:
    """fp8's per-Mamba2 d_inner goes to the host with the rest of the block, and to the transient."""
    cfg = ModelConfig(preset="tiny", n_layers=4, pattern="MAMA")
    bf16, fp8 = activations(cfg, 1024, "offload"), activations(cfg, 1024, "offload", fp8=True)
    assert fp8["host"] - bf16["host"] == 2 * cfg.d_inner * 2 * 1024  # two M blocks
    assert fp8["offload_transient"] - bf16["offload_transient"] == cfg.d_inner * 2 * 1024


def test_speed_of_offload_and_of_the_recomputing_modes() -> None:
    """offload recomputes nothing: its micro-batch is none's plus the host bytes down and up at 25 GB/s;
    attention / mlp add 1/3 of the selected parts' time."""
    from train.plan_memory import ZeroSetup
    from train.plan_speed import PCIE_BYTES_PER_S, part_ms_per_token, predict

    cfg = ModelConfig(preset="1.3b")
    seq, mb = 4096, 2

    def micro(mode: str, selected: str | None = None) -> float:
        return predict(cfg, seq, mb, 8, ZeroSetup(stage=1), 1, mode, block_types=selected).micro_ms

    for selected in (None, "A"):
        host = activations(cfg, mb * seq, "offload", block_types=selected)["host"]
        assert PCIE_BYTES_PER_S == 25e9
        assert micro("offload", selected) - micro("none") == pytest.approx(1e3 * 2 * host / 25e9)
    parts, _ = part_ms_per_token(cfg, seq)
    n = {k: cfg.layer_pattern.count(k) for k in "MA"}
    assert micro("attention") - micro("none") == pytest.approx(
        (n["M"] * parts["M"] + n["A"] * parts["A"]) / 3 * mb * seq)
    assert micro("mlp", "A") - micro("none") == pytest.approx(n["A"] * parts["mlp"] / 3 * mb * seq)


@pytest.mark.parametrize("letter", list(block_types()))
def test_fp8_counts_each_mamba2_sub_mixer(letter: str) -> None:
    """fp8: every Mamba2 mixer (M's own, the `ssm` of R, G, H) keeps its normed scan output (d_inner) for the
    float8 out_proj; attention has none."""
    cfg = ModelConfig(preset="tiny", n_layers=2, pattern=f"{letter}A")
    n = sum(isinstance(m, Mamba2Mixer) for m in block_type(letter)(cfg, 0).modules())
    assert n == (0 if letter == "A" else 1)
    tokens = 1024
    bf16, fp8 = activations(cfg, tokens, "none"), activations(cfg, tokens, "none", fp8=True)
    assert fp8[letter] - bf16[letter] == n * cfg.d_inner * 2 * tokens * (2 if letter == "A" else 1)


def test_plan_and_cli_read_checkpoint_block_types() -> None:
    """plan() threads train.checkpoint_block_types into the activations and the speed; the CLI takes it
    through --set beside --activation-checkpointing and names the letters."""
    base = ["train.activation_checkpointing=attention"]
    every = plan(load_run_config("1.3b", base), 1, gpu="h100")
    only_a = plan(load_run_config("1.3b", [*base, "train.checkpoint_block_types=A"]), 1, gpu="h100")
    none = plan(load_run_config("1.3b"), 1, gpu="h100")
    assert only_a.activations_by_kind["M"] == none.activations_by_kind["M"] > every.activations_by_kind["M"]
    assert only_a.activations_by_kind["A"] == every.activations_by_kind["A"] < none.activations_by_kind["A"]
    assert none.speed.tokens_per_s > only_a.speed.tokens_per_s > every.speed.tokens_per_s
    argv = ["--config", "1.3b", "--activation-checkpointing", "attention", "--set", "train.checkpoint_block_types=A"]
    proc = subprocess.run([sys.executable, "-m", "train.plan", *argv], check=False, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "activation checkpointing attention (A blocks)" in out
    assert f"{only_a.memory['activations'] / 2**30:8.2f} GiB" in out


def _saved(pattern: str, mode: str, selected: str | None, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Bytes of the distinct storages autograd saves in one bf16 training forward of the tiny model on CPU
    (2 rows of 256 tokens): "gpu" outside the checkpointed regions (non-reentrant checkpoint's own hooks take
    those) and outside mode offload's save_on_cpu, parameters and the shared RoPE tables left out; "host" what
    save_on_cpu takes (a counting hook stands in: on CPU it would keep the tensors where they are), and
    "host_weights" the parameters among it. Attention on its kernel path (SDPA), Mamba2 on its reference path,
    the norms unfused, the SwiGLU on its reference path (it also keeps silu(gate): 4 ffn, not the kernel's 3)."""
    from model import HybridLM, layers
    from train.activation_checkpointing import apply_activation_checkpointing

    def add_rms_norm(x, weight, bias, residual=None, eps=1e-6, prenorm=True):  # the unfused ResidualRMSNorm
        r = x if residual is None else x + residual
        return torch.nn.functional.rms_norm(r, (r.shape[-1],), weight, eps), r

    monkeypatch.setattr(layers, "mamba_ops", lambda: types.SimpleNamespace(add_rms_norm=add_rms_norm))
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", n_layers=len(pattern), pattern=pattern, max_seq_len=256)
    model = HybridLM(cfg).to(torch.bfloat16).train()
    for m in model.modules():
        if isinstance(m, Mixer):
            m.impl = "reference" if isinstance(m, Mamba2Mixer) else "kernels"
    apply_activation_checkpointing(model, mode, selected)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    rope: set[int] = set()  # alive for the whole step whatever saves them (HybridLM's ctx)
    model.rope.register_forward_hook(lambda _m, _a, out: rope.update(t.untyped_storage().data_ptr() for t in out))
    # the storages themselves, held so that a freed one's address cannot come back as another's
    seen: dict[str, dict[int, torch.UntypedStorage]] = {"gpu": {}, "host": {}, "host_weights": {}}

    def hook(where: str):
        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr in params:
                if where == "host":
                    seen["host_weights"][ptr] = t.untyped_storage()
            elif ptr not in rope:
                seen[where][ptr] = t.untyped_storage()
            return t
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", lambda pin_memory=False: hook("host"))
    ids = torch.randint(0, cfg.vocab_size, (2, 256), generator=torch.Generator().manual_seed(1))
    with hook("gpu"):
        model.loss(ids, ids)
    return {k: sum(st.nbytes() for st in v.values()) for k, v in seen.items()}


def _saved_bytes(pattern: str, mode: str, selected: str | None, monkeypatch: pytest.MonkeyPatch) -> int:
    return _saved(pattern, mode, selected, monkeypatch)["gpu"]


def test_recomputed_parts_and_offload_match_what_autograd_saves(monkeypatch: pytest.MonkeyPatch) -> None:
    """AAAA in bf16 on CPU, 512 tokens: what mode attention drops is each block's mixer share
    (`block_activation_bytes`' "mixer") to the byte, so the mixer's input (a norm's output) is not kept twice;
    mode mlp drops the MLP share to the byte, give or take the reference SwiGLU's extra silu(gate) (ffn x 2 per
    token; the kernel path fuses it away). Mode offload moves every tensor the blocks save to the host: nothing
    of theirs is left outside, and their weights go too (e x block_params each, as the planner counts)."""
    from model.sizing import block_params

    cfg = ModelConfig(preset="tiny", n_layers=4, pattern="AAAA")
    tokens, blocks, e = 2 * 256, 4, 2
    parts = block_activation_bytes(cfg, "A", e)
    none = _saved("AAAA", "none", None, monkeypatch)
    attention = _saved("AAAA", "attention", None, monkeypatch)
    mlp = _saved("AAAA", "mlp", None, monkeypatch)
    offload = _saved("AAAA", "offload", None, monkeypatch)
    assert none["host"] == attention["host"] == mlp["host"] == 0
    assert none["gpu"] - attention["gpu"] == blocks * parts["mixer"] * tokens
    assert none["gpu"] - mlp["gpu"] == blocks * (parts["mlp"] + cfg.ffn_hidden * e) * tokens
    # the planner's GPU difference is the same less the reference SwiGLU's extra
    planned = {m: sum(v for k, v in activations(cfg, tokens, m).items() if k == "A") for m in ("none", "attention", "mlp")}
    assert planned["none"] - planned["attention"] == none["gpu"] - attention["gpu"]
    assert planned["none"] - planned["mlp"] == none["gpu"] - mlp["gpu"] - blocks * cfg.ffn_hidden * e * tokens
    assert offload["host"] == none["gpu"] - offload["gpu"] > 0  # all the blocks saved, nothing left behind
    assert offload["host_weights"] == blocks * e * block_params(cfg, "A")
    assert activations(cfg, tokens, "offload")["host"] == blocks * (sum(parts.values()) * tokens
                                                                    + e * block_params(cfg, "A"))


@pytest.mark.parametrize("mode", ["attention", "full", "mlp"])
def test_checkpoint_scope_agrees_with_what_autograd_saves(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner's ordering is autograd's, on CPU: in MAMA, the mode on every block saves less than on the
    A blocks only, which saves less than none (the M blocks' share differs in size: Mamba2's reference path
    saves other tensors than the kernel path's the planner counts); in AAAA, A only and all are the same."""
    cfg = ModelConfig(preset="tiny", n_layers=4, pattern="MAMA")

    def planned(pattern: str, m: str, selected: str | None) -> float:
        c = cfg.model_copy(update={"pattern": pattern})
        return sum(v for k, v in activations(c, 512, m, block_types=selected).items() if k in "MA")

    none = _saved_bytes("MAMA", "none", None, monkeypatch)
    only_a = _saved_bytes("MAMA", mode, "A", monkeypatch)
    every = _saved_bytes("MAMA", mode, None, monkeypatch)
    assert none > only_a > every
    assert planned("MAMA", "none", None) > planned("MAMA", mode, "A") > planned("MAMA", mode, None)
    assert _saved_bytes("AAAA", mode, "A", monkeypatch) == _saved_bytes("AAAA", mode, None, monkeypatch)
    assert planned("AAAA", mode, "A") == planned("AAAA", mode, None)
