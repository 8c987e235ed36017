"""The kernel path on the real Triton kernels of mamba_ssm and flash-attn, run on CPU by Triton's interpreter.

mamba_ssm's kernels (SSD chunk scan forward and backward, gated RMSNorm, fused residual-add RMSNorm,
SwiGLU, the decode state update) and flash-attn's fused cross-entropy are Triton; with
TRITON_INTERPRET=1 Triton runs them on CPU tensors, so the kernel path is checked against the
reference path here, in CI, with the real kernels instead of stand-ins. What stays out: causal_conv1d
and flash-attn's attention are CUDA extensions (the kernel path then runs its PyTorch conv and SDPA,
as it does without them on a GPU; the test of the fused split-conv scan, the GPU training path,
answers mamba_ssm's two causal_conv1d calls with the reference conv), and the kernels' GPU speed and
thread timing (bench/kernel_parity.py compares the paths on a GPU).

Set-up, undone after the module (only the triton package stays imported): TRITON_INTERPRET=1 before
mamba_ssm is imported (Triton decides at import whether a kernel is compiled or interpreted);
MAMBA_DETERMINISTIC=1, under which each mamba_ssm kernel has one tile config (the autotuner otherwise
times every config through a GPU driver; the tests switch its reductions between atomics and per-program
sums at call time); empty modules for the packages' CUDA extensions where they are not built
(`selective_scan_cuda`, `flash_attn_2_cuda`: imported by the packages' __init__, never called by these
kernels); and two CUDA queries answered for CPU tensors: `torch.cuda.device(None)` (both packages enter
the tensor's device around each launch) and the SM count (mamba_ssm sizes a backward workspace by it).
On CPU machines scripts/setup.sh installs triton and the two packages' Python sources into
.venv/kernels-cpu, which is on sys.path only while this module runs (where the packages are installed,
as on a GPU image, they are used as they are).

Tolerances: the model in float32, observed relative errors 3e-7 (logits) to 3e-6 (gradients of A_log),
bound 2e-5; the loss on fp16 logits against float64 on the same values, bound 1e-5; the head's fp16
gradients fused vs torch, bound 1e-3 (observed 0.0).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import sys
import types
import warnings
from pathlib import Path
from typing import Iterator

import pytest
import torch

import model.kernels as kernels
from model import HybridLM, ModelConfig
from model.mamba2 import causal_conv1d_ref
from model.mixers import MixerContext

pytestmark = pytest.mark.slow  # launched runs / long exports: the full tier only (README, "Tests")

TOL = 2e-5
PACKAGES = ("mamba_ssm", "flash_attn")
# The project's modules that bind the packages' modules at import: dropped with them, so that a second set-up in
# one process (xdist hands a worker this module's tests in more than one batch) does not leave them holding the
# first set-up's modules, which the fixtures below no longer patch.
BINDING = ("model.ssd_saved", "model.ssd_cb_grad")
INTERPRETER_TRITON = (3, 9)  # the interpreter these tests run on (scripts/setup.sh's triton==3.9.0)


@pytest.fixture(scope="module")
def interpreted_kernels(kernels_cpu: Path) -> Iterator[types.SimpleNamespace]:
    """The packages' kernels imported under Triton's interpreter (see the module doc): mamba_ssm's ops."""
    if any(name in sys.modules for name in PACKAGES):
        pytest.fail(f"{PACKAGES} imported before this module: their kernels are compiled, not interpreted; "
                    "run these tests in a process of their own")
    with pytest.MonkeyPatch.context() as mp:
        if kernels_cpu.is_dir():
            mp.syspath_prepend(str(kernels_cpu))
        version = importlib.metadata.version("triton")  # not imported yet: TRITON_INTERPRET must come first
        if tuple(int(x) for x in version.split(".")[:2]) < INTERPRETER_TRITON:
            pytest.skip(f"Triton {version}'s interpreter raises TypeError('only 0-dimensional arrays can be "
                        "converted to Python scalars') at every launch (the GPU image's 3.6: bench/results/"
                        "test_suite_gpu_h200_2026-12-06_interpreted_log.txt); scripts/setup.sh gives CPU machines 3.9, and on a "
                        "GPU the compiled kernels run in the other tests")
        mp.setenv("TRITON_INTERPRET", "1")
        mp.setenv("MAMBA_DETERMINISTIC", "1")
        for extension in ("selective_scan_cuda", "flash_attn_2_cuda"):
            if importlib.util.find_spec(extension) is None:  # built only on CUDA machines
                mp.setitem(sys.modules, extension, types.ModuleType(extension))
        cuda_device, cuda_props = torch.cuda.device, torch.cuda.get_device_properties
        mp.setattr(torch.cuda, "device",
                   lambda index: contextlib.nullcontext() if index is None else cuda_device(index))
        mp.setattr(torch.cuda, "get_device_properties",
                   lambda d=None: types.SimpleNamespace(multi_processor_count=4)
                   if getattr(d, "type", None) == "cpu" else cuda_props(d))
        accessors = (kernels.mamba_ops, kernels.cross_entropy_ops, kernels.flash_ops)
        for accessor in accessors:
            accessor.cache_clear()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Deterministic mode")  # about autotune caching
            ops = kernels.mamba_ops()
        assert ops is not None and kernels.cross_entropy_ops() is not None, \
            "the Triton kernels did not import: run scripts/setup.sh (triton, mamba-ssm, flash-attn)"
        mp.setattr("model.mamba2.conv_ops", lambda: None)  # causal_conv1d: a CUDA extension
        yield ops
        for accessor in accessors:
            accessor.cache_clear()
        for name in [m for m in sys.modules if m.split(".")[0] in PACKAGES or m in BINDING]:
            del sys.modules[name]  # interpreter-mode kernels: no later test may see them


DT_LIMITS = [(0.0, float("inf")), (0.01, 0.05)]  # none (the kernels' own softplus), and a clamp
# The hybrid options of part 2 together (docs/block_types.md): H blocks with 8-token spans, bridges, every
# Mamba2 state at half d_state (the kernel path's unfused scan on the compressed B and C).
OPTIONS = {"pattern": "HAMH", "bridges": True, "mamba": {"state_compression": 2}, "hierarchical": {"span": 8}}


def _model(pattern: str = "MAMA", seed: int = 0, dt_limit: tuple[float, float] = DT_LIMITS[0],
           model_cls: type[HybridLM] = HybridLM, **over) -> HybridLM:
    """float32, chunk 16 (few interpreter programs), both block kinds, 2 SSM groups; `over` merges deeply."""
    from config.base import deep_merge

    torch.manual_seed(seed)
    values = dict(
        vocab_size=61, d_model=32, n_layers=len(pattern), pattern=pattern, ffn_hidden=48,
        attention={"n_heads": 4, "n_kv_heads": 2},
        mamba={"d_state": 8, "headdim": 8, "expand": 2, "n_groups": 2, "d_conv": 4, "chunk_size": 16,
               "dt_limit": dt_limit},
        tie_embeddings=False, impl="reference",
    )
    cfg = ModelConfig(**deep_merge(values, over))
    model = model_cls(cfg)
    with torch.no_grad():  # norm weights, D and conv bias away from their init, so a misuse shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


def _use(model: HybridLM, impl: str) -> None:
    for layer in model.layers:
        layer.mixer.impl = layer.mlp.impl = impl
    model.impl = impl


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("reduction", "over"), [
    ("atomic adds", {}), ("per-program sums", {}), pytest.param("atomic adds", OPTIONS, marks=pytest.mark.slow)],
    ids=["atomic", "per-program", "options"])
def test_training_step_matches_reference(interpreted_kernels, reduction: str, over: dict) -> None:
    """Packed documents (2 in the first row), forward and backward: logits and every parameter's gradient,
    with mamba_ssm's backward reductions as atomic adds (its default) and as per-program partial sums
    (its deterministic mode, which train.deterministic turns on); and the hybrid options of part 2."""
    from mamba_ssm.utils.determinism import set_deterministic_mode

    model = _model(**over)
    ids = torch.randint(0, 61, (2, 32))
    seq_idx = torch.tensor([[0] * 10 + [1] * 22, [0] * 32])
    results = {}
    set_deterministic_mode(reduction == "per-program sums")
    try:
        for impl in ("reference", "kernels"):
            _use(model, impl)
            model.zero_grad(set_to_none=True)
            logits = model(ids, seq_idx=seq_idx)
            logits.pow(2).mean().backward()
            results[impl] = [("logits", logits.detach())] + [(n, p.grad.clone()) for n, p in model.named_parameters()]
    finally:
        set_deterministic_mode(None)  # back to the environment's MAMBA_DETERMINISTIC
    for (name, got), (_, want) in zip(results["kernels"], results["reference"]):
        assert _rel(got, want) < TOL, name


def test_prefill_in_two_parts_continues_the_state(interpreted_kernels) -> None:
    """A Mamba2 mixer fed 20 then 12 tokens through its state (the scan's initial state, the conv's
    carried inputs) gives the one-shot reference output and final state."""
    model = _model()
    mixer = next(layer.mixer for layer in model.layers if layer.kind == "M")
    u = torch.randn(2, 32, model.cfg.d_model)
    with torch.no_grad():
        mixer.impl = "reference"
        ref_state = mixer.empty_state(2, u.device, u.dtype)
        want = mixer(u, state=ref_state)
        mixer.impl = "kernels"
        state = mixer.empty_state(2, u.device, u.dtype)
        got = torch.cat([mixer(u[:, :20], state=state), mixer(u[:, 20:], state=state)], dim=1)
    assert _rel(got, want) < TOL
    assert _rel(state.ssm, ref_state.ssm) < TOL and torch.equal(state.conv, ref_state.conv)


@pytest.mark.parametrize("dt_limit", DT_LIMITS)
def test_slice_scans_continued_from_the_entering_state(interpreted_kernels, dt_limit: tuple[float, float]) -> None:
    """Context parallelism on the kernel path (model/context_parallel.py `enter_state`): mamba_ssm's chunk scan
    over each half of the rows from a zero state, the second half continued from the first half's final state,
    gives the float64 reference scan of the whole rows: outputs, and gradients (through the kernel's final
    state too). Row 0's second document runs across the halves; row 1's begins exactly where the second half
    does (nothing enters)."""
    from model.context_parallel import enter_state
    from model.ssd import discretize_dt, ssd_chunked

    gen = torch.Generator().manual_seed(3)
    b, length, h, p, g, n, half = 2, 32, 4, 8, 2, 8, 16
    x, B, C = (torch.randn(*shape, generator=gen) for shape in ((b, length, h, p), (b, length, g, n), (b, length, g, n)))
    dt = torch.randn(b, length, h, generator=gen) - 1
    dt_bias, D = 0.3 * torch.randn(h, generator=gen), torch.randn(h, generator=gen)
    A = -0.5 - torch.rand(h, generator=gen)
    seq_idx = torch.tensor([[0] * 10 + [1] * 22, [0] * 16 + [1] * 16])
    leaves = [t.requires_grad_() for t in (x, dt, B, C)]
    weight = torch.randn(b, length, h, p, generator=gen)
    want, _ = ssd_chunked(x.double(), discretize_dt(dt.double(), dt_bias.double(), dt_limit), A.double(),
                          B.double(), C.double(), half, D=D.double(), seq_idx=seq_idx)
    want_grads = torch.autograd.grad((want * weight.double()).sum(), leaves)
    ys, entering = [], None
    for part in (slice(0, half), slice(half, length)):
        y, final = interpreted_kernels.chunk_scan(
            x[:, part], dt[:, part], A, B[:, part], C[:, part], chunk_size=half, D=D, dt_bias=dt_bias,
            dt_softplus=True, seq_idx=seq_idx[:, part].to(torch.int32).contiguous(), dt_limit=dt_limit,
            return_final_states=True)
        if entering is not None:
            log_decay = torch.cumsum(discretize_dt(dt[:, part], dt_bias, dt_limit) * A, dim=1)
            y, final = enter_state(y, final, entering, log_decay, C[:, part], seq_idx[:, part])
        ys.append(y)
        entering = final * (seq_idx[:, half] == seq_idx[:, half - 1]).float().view(b, 1, 1, 1)
    got = torch.cat(ys, dim=1)
    got_grads = torch.autograd.grad((got * weight).sum(), leaves)
    assert _rel(got.detach(), want.detach().float()) < TOL
    for name, g1, g2 in zip(("x", "dt", "B", "C"), got_grads, want_grads):
        assert _rel(g1, g2.float()) < TOL, name


@pytest.mark.slow
def test_context_parallel_kernel_path_on_one_rank(interpreted_kernels, tmp_path: Path) -> None:
    """The kernel path through model/context_parallel.py with a one-rank group (each slice's forward under
    train.context_parallel on a GPU: the Mamba2 chunk scan kernel, its conv in PyTorch): logits and every
    gradient equal the reference path's without context parallelism, packed documents."""
    import torch.distributed as dist

    from model.context_parallel import ContextParallel

    model = _model()
    ids = torch.randint(0, 61, (2, 32))
    seq_idx = torch.tensor([[0] * 10 + [1] * 22, [0] * 32])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    results = {}
    try:
        for impl, cp in (("reference", None), ("kernels", ContextParallel(dist.group.WORLD, 0, 1))):
            _use(model, impl)
            model.context_parallel = cp
            model.zero_grad(set_to_none=True)
            logits = model(ids, seq_idx=seq_idx)
            logits.pow(2).mean().backward()
            results[impl] = [("logits", logits.detach())] + [(n, p.grad.clone()) for n, p in model.named_parameters()]
    finally:
        dist.destroy_process_group()
    for (name, got), (_, want) in zip(results["kernels"], results["reference"]):
        assert _rel(got, want) < TOL, name


@pytest.mark.parametrize(("dt_limit", "static", "over"), [
    *[(dt_limit, static, {}) for dt_limit in DT_LIMITS for static in (False, True)],
    pytest.param(DT_LIMITS[1], True, OPTIONS, marks=pytest.mark.slow)])
def test_decoding_matches_reference(interpreted_kernels, dt_limit: tuple[float, float], static: bool,
                                    over: dict) -> None:
    """Prefill of left-padded prompts, then 5 decode steps on the same tokens (teacher-forced, so that a
    near-tie cannot fork the paths): every step's logits. With a dt clamp the decode step discretises
    dt itself (the state-update kernel has no clamp). The static cache is the form a CUDA graph replays.
    Last: the hybrid options of part 2 (the state-update kernel on the compressed state)."""
    model = _model(dt_limit=dt_limit, **over).eval()
    prompts = [[5, 9, 2, 33, 7, 1, 14, 3, 8, 21, 40, 6], [11, 4, 30, 2, 9]]
    ids = torch.tensor([[0] * 7 + prompts[1], prompts[0]])
    mask = (torch.arange(12) >= torch.tensor([[7], [0]])).long()
    forced = torch.randint(1, 61, (5, 2))
    steps = {}
    with torch.no_grad():
        for impl in ("reference", "kernels"):
            _use(model, impl)
            logits, cache = model.prefill(ids, mask)
            if static:
                cache.make_static(12 + len(forced))
            steps[impl] = [logits] + [model.step(tok, cache=cache) for tok in forced]
    for i, (got, want) in enumerate(zip(steps["kernels"], steps["reference"])):
        assert _rel(got, want) < TOL, f"step {i}"


def test_fused_cross_entropy_matches_float64(interpreted_kernels, monkeypatch) -> None:
    """model/loss.py's fused branch on flash-attn's kernel (fp16 logits of a linear head, an ignored
    target): the per-target NLL against float64 on the same logits, and the head's gradients against
    the torch path's (both round one float32 gradient to fp16); the backward overwrites the logits.
    fp16, not bf16: Triton 3.9's interpreter reads a scalar bf16 load (the kernel loads the target's
    logit so) as its raw bits. bf16 runs on the GPU: bench/block_costs.py's head_loss rows."""
    from model import loss as loss_mod

    torch.manual_seed(0)
    h = torch.randn(2, 12, 16, dtype=torch.float16, requires_grad=True)
    w = torch.randn(61, 16, dtype=torch.float16, requires_grad=True)
    labels = torch.randint(0, 61, (2, 12))
    labels[0, 3] = loss_mod.IGNORE_INDEX
    grads = {}
    for fused in (False, True):
        monkeypatch.setattr(loss_mod, "use_fused", lambda logits, impl, fused=fused: fused)
        h.grad = w.grad = None
        logits = h @ w.T
        before = logits.detach().clone()
        nll = loss_mod.token_nll(logits, labels, "kernels")
        want = torch.nn.functional.cross_entropy(before.double().flatten(0, 1), labels.flatten(),
                                                 ignore_index=loss_mod.IGNORE_INDEX, reduction="none")
        assert nll.dtype == torch.float32 and nll.shape == labels.shape
        torch.testing.assert_close(nll.double().flatten(), want, rtol=1e-5, atol=1e-6)
        nll.mean().backward()
        assert torch.equal(logits.detach(), before) != fused  # the fused backward wrote into the logits
        grads[fused] = (h.grad.clone(), w.grad.clone())
    for got, want in zip(grads[True], grads[False]):
        assert _rel(got.float(), want.float()) < 1e-3  # observed 0.0: the same fp16 rounding of equal float32


def test_chunked_fused_cross_entropy(interpreted_kernels, monkeypatch) -> None:
    """model/loss.py's chunked head + loss on flash-attn's kernel (fp16, chunks of 5 of 24 tokens, the
    backward's recomputed logits overwritten in place): the NLL and the head's gradients as the whole
    logits through the same kernel (the head gradient is summed over chunks in float32)."""
    from model import loss as loss_mod

    monkeypatch.setattr(loss_mod, "use_fused", lambda logits, impl: True)
    torch.manual_seed(0)
    h = torch.randn(2, 12, 16, dtype=torch.float16)
    w = torch.randn(64, 16, dtype=torch.float16)
    labels = torch.randint(0, 61, (2, 12))
    labels[1, 5] = loss_mod.IGNORE_INDEX
    out = {}
    for chunk in (0, 5):
        hc, wc = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        if chunk:
            nll = loss_mod.chunked_token_nll(hc, wc, labels, 61, chunk, "kernels")
        else:
            nll = loss_mod.token_nll((hc @ wc.T)[..., :61], labels, "kernels")
        nll.sum().backward()
        out[chunk] = (nll.detach(), hc.grad, wc.grad)
    torch.testing.assert_close(out[5][0], out[0][0], rtol=1e-6, atol=1e-6)  # the same kernel on the same logits
    for got, want in zip(out[5][1:], out[0][1:]):
        assert _rel(got.float(), want.float()) < 1e-3


def _conv_fwd_standin(x, weight, bias, seq_idx, initial_states, final_states_out, silu):
    """causal_conv1d's C++ forward contract (x: (b, d, l) -> (b, d, l)) on the reference conv."""
    assert initial_states is None and final_states_out is None
    out = causal_conv1d_ref(x.transpose(1, 2), weight, bias, None, seq_idx).transpose(1, 2)
    return torch.nn.functional.silu(out) if silu else out


def _conv_bwd_standin(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, return_dinitial, silu):
    """causal_conv1d's C++ backward contract: (dx (into `dx` when given), dweight, dbias, dinitial_states)."""
    assert initial_states is None and dfinal_states is None and not return_dinitial
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
        grads = torch.autograd.grad(_conv_fwd_standin(*leaves, seq_idx, None, None, silu), leaves, dout)
    if dx is not None:
        dx.copy_(grads[0])
    return (dx if dx is not None else grads[0], *grads[1:], None)


@pytest.fixture
def fused_split_conv(interpreted_kernels, monkeypatch) -> None:
    """The kernel path's fused split-conv scan, causal_conv1d's calls inside it answered by the reference conv."""
    from mamba_ssm.ops.triton import ssd_combined

    monkeypatch.setattr(ssd_combined, "causal_conv1d_fwd_function", _conv_fwd_standin)
    monkeypatch.setattr(ssd_combined, "causal_conv1d_bwd_function", _conv_bwd_standin)
    monkeypatch.setattr("model.mamba2.conv_ops", lambda: types.SimpleNamespace())  # present: the fused path


@pytest.mark.parametrize("dt_limit", DT_LIMITS)
def test_fused_split_conv_training_matches_reference(fused_split_conv, dt_limit: tuple[float, float]) -> None:
    """The GPU training path: mamba_ssm's mamba_split_conv1d_scan_combined (conv, SSD scan, gated
    RMSNorm and out_proj in one autograd function) with the model's arguments. Packed documents;
    output and every gradient of the mixer."""
    model = _model(dt_limit=dt_limit)
    mixer = next(layer.mixer for layer in model.layers if layer.kind == "M")
    u = torch.randn(2, 32, model.cfg.d_model)
    seq_idx = torch.tensor([[0] * 10 + [1] * 22, [0] * 32])
    results = {}
    for impl in ("reference", "kernels"):
        mixer.impl = impl
        mixer.zero_grad(set_to_none=True)
        out = mixer(u, MixerContext.of_documents(seq_idx))
        out.pow(2).mean().backward()
        results[impl] = [("out", out.detach())] + [(n, p.grad.clone()) for n, p in mixer.named_parameters()]
    for (name, got), (_, want) in zip(results["kernels"], results["reference"]):
        assert _rel(got, want) < TOL, name


class _DoubledLinear(torch.nn.Linear):
    """A stand-in for what float8 training or a LoRA adapter puts in out_proj's place: another module class,
    whose forward (twice the plain projection) must run on the fused scan's output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * torch.nn.functional.linear(x, self.weight)


@pytest.mark.parametrize("grad", [True, False], ids=["training", "prefill"])
def test_fused_split_conv_runs_a_swapped_out_proj(fused_split_conv, grad: bool) -> None:
    """With out_proj swapped for another module, the fused scans (model/ssd_saved.py in training,
    mamba_ssm's in a gradient-free prefill) return the normed output and the module projects it: output and
    every gradient (the swapped weight's too) equal the reference path's, and twice the unswapped output."""
    model = _model()
    mixer = next(layer.mixer for layer in model.layers if layer.kind == "M")
    u = torch.randn(2, 32, model.cfg.d_model)
    ctx = MixerContext.of_documents(torch.tensor([[0] * 10 + [1] * 22, [0] * 32]))
    mixer.impl = "kernels"
    with torch.no_grad():
        plain = mixer(u, ctx)
    swapped = _DoubledLinear(mixer.d_inner, model.cfg.d_model, bias=False)
    swapped.weight = mixer.out_proj.weight
    mixer.out_proj = swapped
    results = {}
    for impl in ("reference", "kernels"):
        mixer.impl = impl
        mixer.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grad):
            out = mixer(u, ctx)
        if grad:
            out.pow(2).mean().backward()
        results[impl] = [("out", out.detach())] + [(n, p.grad.clone()) for n, p in mixer.named_parameters() if grad]
    assert _rel(results["kernels"][0][1], 2 * plain) < TOL
    assert len(results["kernels"]) == (1 + len(list(mixer.parameters())) if grad else 1)
    for (name, got), (_, want) in zip(results["kernels"], results["reference"]):
        assert _rel(got, want) < TOL, name


def test_cb_grad_kernel_matches_mamba_ssms_two_kernels(interpreted_kernels) -> None:
    """model/ssd_cb_grad.py: one kernel for the C.B gradient and the intra-chunk decay gradient against
    mamba_ssm's `_chunk_scan_bwd_dcb` and `_chunk_scan_bwd_ddAcs_stable` (called as bench/block_costs.py's
    A/B variant calls them), and both against float64 from the definition. Chunk 64 (several tiles: the
    cross-tile sums and the zero tiles above the diagonal), a partial last chunk, document boundaries, 2
    groups of 2 heads. And the benches' A/B switch replaces the function model/ssd_saved.py calls."""
    from mamba_ssm.ops.triton import ssd_bmm

    import model.ssd_saved as ssd_saved
    from bench.block_costs import mamba_ssm_cb_and_decay_grads, mamba_ssm_cb_grad
    from experiments.kernels.ssd_cb_grad import decay_grad_float64
    from model.ssd_cb_grad import cb_and_decay_grads

    gen = torch.Generator().manual_seed(3)
    b, seqlen, h, p, g, n, q = 2, 150, 4, 16, 2, 8, 64
    x, dout = (torch.randn(b, seqlen, h, p, generator=gen) for _ in range(2))
    C, B = (torch.randn(b, seqlen, g, n, generator=gen) for _ in range(2))
    seq_idx = torch.tensor([[0] * 50 + [1] * 90 + [2] * 10, [0] * 150], dtype=torch.int32)
    dt = torch.nn.functional.pad(torch.rand(b, h, seqlen, generator=gen) * 0.2, (0, 3 * q - seqlen)).view(b, h, 3, q)
    dA_cumsum = (dt * -torch.rand(h, generator=gen)[None, :, None, None]).cumsum(-1)
    CB = ssd_bmm._bmm_chunk_fwd(C, B, q, seq_idx=seq_idx, output_dtype=torch.float32)
    dcb, ddA = cb_and_decay_grads(x, dt, dA_cumsum, dout, CB, seq_idx=seq_idx, ngroups=g)
    want_dcb, want_ddA = mamba_ssm_cb_and_decay_grads(x, dt, dA_cumsum, dout, CB, seq_idx=seq_idx, ngroups=g)
    assert _rel(dcb, want_dcb) < 1e-6  # the same products, summed in other tiles (observed 2.0e-8)
    exact_dcb, exact = decay_grad_float64(x, dt, dA_cumsum, dout, CB, seq_idx, h // g)
    assert _rel(want_dcb.double(), exact_dcb) < 1e-6 and _rel(want_ddA.double(), exact) < 1e-6  # the float64 reference
    assert _rel(dcb.double(), exact_dcb) < 1e-6
    assert _rel(ddA.double(), exact) < 1e-6  # observed 2.3e-7 (the stable kernel: 1.3e-7)
    assert torch.equal(ddA[..., 0], torch.zeros_like(ddA[..., 0]))
    with mamba_ssm_cb_grad():  # the benches' A/B switch reaches the function model/ssd_saved.py calls
        assert ssd_saved.cb_and_decay_grads is mamba_ssm_cb_and_decay_grads
    assert ssd_saved.cb_and_decay_grads is cb_and_decay_grads


def test_ssd_cb_grad_bench_smoke(interpreted_kernels, tmp_path) -> None:
    """experiments/kernels/ssd_cb_grad.py --smoke (its kernels are Triton: on CPU only here, interpreted): both paths and
    both tile sizes write rows, each within float32 rounding of the float64 definition."""
    import json

    from experiments.kernels import ssd_cb_grad

    assert ssd_cb_grad.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "ssd_cb_grad_tiny_smoke.json").read_text())["rows"]
    assert [r["path"] for r in rows] == ["mamba_ssm dcb + ddAcs_stable", "ours 64x4x3", "ours 32x4x3"]
    for r in rows:
        assert r["ms"] > 0 and r["err_dcb"] < 1e-5 and r["err_ddA"] < 1e-5, r


def test_saved_intermediates_give_mamba_ssms_result(fused_split_conv, monkeypatch) -> None:
    """model/ssd_saved.py (the training form that keeps the conv output, chunk states and C.B from
    the forward) runs mamba_ssm's kernels on the same inputs as mamba_ssm's own fused function, which
    recomputes them, except that model/ssd_cb_grad.py forms the C.B and intra-chunk decay gradients in
    one kernel: the output and the gradients that do not pass through dt bitwise, those that do (dt's
    bias, A, in_proj and the input) within float32 rounding. Training takes it by default;
    `model.mamba.recompute_in_backward` and gradient-free calls take mamba_ssm's function."""
    import model.ssd_saved as ssd_saved

    model = _model(dt_limit=DT_LIMITS[1])
    mixer = next(layer.mixer for layer in model.layers if layer.kind == "M")
    mixer.impl = "kernels"
    calls = []
    apply = ssd_saved.SplitConvScanSavedFn.apply
    monkeypatch.setattr(ssd_saved.SplitConvScanSavedFn, "apply", lambda *a: calls.append(1) or apply(*a))
    u = torch.randn(2, 40, model.cfg.d_model)  # 40: a partial last chunk
    seq_idx = torch.tensor([[0] * 10 + [1] * 30, [0] * 40])
    results = []
    for recompute in (False, True):
        mixer.cfg.mamba.recompute_in_backward = recompute
        mixer.zero_grad(set_to_none=True)
        x = u.clone().requires_grad_()
        out = mixer(x, MixerContext.of_documents(seq_idx))
        out.pow(2).mean().backward()
        results.append([out.detach(), x.grad] + [p.grad.clone() for p in mixer.parameters()])
        assert len(calls) == 1, "training takes the saved form by default, mamba_ssm's with the flag"
    names = ["out", "input"] + [n for n, _ in mixer.named_parameters()]
    through_dt = {"input", "in_proj.weight", "dt_bias", "A_log"}
    assert through_dt < set(names)
    for name, got, want in zip(names, *results):
        if name in through_dt:
            assert _rel(got, want) < 1e-6, name
        else:
            assert torch.equal(got, want), name
    with torch.no_grad():
        mixer.cfg.mamba.recompute_in_backward = False
        mixer(u, MixerContext.of_documents(seq_idx))
    assert len(calls) == 1, "a gradient-free call kept intermediates"


def test_fused_split_conv_prefill_returns_the_final_state(fused_split_conv) -> None:
    """The GPU prefill: the fused scan's final SSM state (what decoding continues from) and output equal
    the reference's, after packed documents and left padding."""
    model = _model()
    mixer = next(layer.mixer for layer in model.layers if layer.kind == "M")
    u = torch.randn(2, 32, model.cfg.d_model)
    seq_idx = torch.tensor([[0] * 7 + [1] * 25, [1] * 32])  # row 0: 7 padding positions, then the prompt
    outs, states = [], []
    with torch.no_grad():
        for impl in ("reference", "kernels"):
            mixer.impl = impl
            state = mixer.empty_state(2, u.device, u.dtype)
            outs.append(mixer(u, MixerContext.of_documents(seq_idx), state))
            states.append(state)
    assert _rel(outs[1], outs[0]) < TOL
    assert _rel(states[1].ssm, states[0].ssm) < TOL and torch.equal(states[1].conv, states[0].conv)


def test_graphed_training_step_replays_the_eager_kernel_step(fused_split_conv) -> None:
    """train/graph_step.py on the kernel path (fused split-conv scan, fused norms and SwiGLU): the
    capture's stand-in parameters and static buffers through mamba_ssm's autograd functions. With
    EagerReplayGraphs in place of CUDA graphs, two replayed steps (an in-place weight update between
    them, as the optimizer makes) give the eager kernel step's loss and gradients."""
    from train.graph_step import EagerReplayGraphs, GraphedLM, graph_training_forward

    def eager(ids: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        logits = HybridLM.forward(model, ids[:, :-1])  # not the graphs
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))

    model = _model("MA", model_cls=GraphedLM).train()
    _use(model, "kernels")
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 61, (2, 17), generator=gen) for _ in range(2)]
    dispatcher = graph_training_forward(model, batches[0][:, :-1], ops=EagerReplayGraphs(), warmup=1)
    for ids in batches:
        want_loss, want_grads = eager(ids)
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        assert _rel(loss.detach(), want_loss) < TOL
        for (name, p), g in zip(model.named_parameters(), want_grads):
            assert _rel(p.grad, g) < TOL, name
            p.grad = None  # consumed before the next replay, as the engine's hooks do
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
    assert dispatcher.replays == 2 and dispatcher.eager_calls == 0


@pytest.mark.parametrize("graphed", [False, True])
def test_kernel_path_adds_linear_weight_gradients_into_main_grad(fused_split_conv, grads_then_bind_main_grads,
                                                                 graphed: bool) -> None:
    """model/wgrad.py on the kernel path: the fused SwiGLU's concatenated gate/up GEMM, out_proj's weight
    gradient formed inside model/ssd_saved.py, in_proj, attention and the head. With every parameter's
    float32 main_grad bound (train/grad_fold.py's fused_wgrad), two steps, eager or replayed through the
    training graphs' stand-in parameters: the linear weights' main_grads hold the unbound model's summed
    gradients and they get no .grad; the other parameters keep autograd's .grad."""
    from train.graph_step import EagerReplayGraphs, GraphedLM, graph_training_forward

    model = _model("MA", model_cls=GraphedLM).train()
    _use(model, "kernels")
    batches, want = grads_then_bind_main_grads(model, 61)
    if graphed:
        graph_training_forward(model, batches[0][:, :-1], ops=EagerReplayGraphs(), warmup=1)
    got = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for ids in batches:
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        for n, p in model.named_parameters():  # the graphs' static gradients: consumed before the next replay
            if p.grad is not None:
                got[n] += p.grad
                p.grad = None
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, p in model.named_parameters():
        if name in linears:
            assert not got[name].any(), f"{name} got a .grad"
            assert _rel(p.main_grad, want[name]) < TOL, name
        else:
            assert not p.main_grad.any(), name
            assert _rel(got[name], want[name]) < TOL, name
