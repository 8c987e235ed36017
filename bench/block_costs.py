"""Where a training micro-step spends GPU time: forward+backward of each part of a block, alone.

Each part (Mamba2 mixer, attention mixer, SwiGLU MLP, fused residual RMSNorm, LM head + loss) is
built from the model package at a preset's widths, in bf16 on the kernel path, and its forward and
backward over one micro-batch (`--tokens` tokens at each sequence length) are captured as one CUDA
graph and replayed, so the time is the GPU's alone (no host launch gaps). Rate = the part's model
FLOPs (model.sizing's terms, 3 x forward) / time, and its share of the bf16 GEMM peak measured in the
same run. Variants: the Mamba2 chunk sizes (`--chunks`), its backward as the model runs it (intermediates kept
from the forward, model/ssd_saved.py, with model/ssd_cb_grad.py's one kernel for the C.B and intra-chunk decay
gradients) vs the same with mamba_ssm's two kernels for those ("mamba_ssm dCB + ddA") and vs mamba_ssm's
recomputing function, each with its gradients' errors against a float64 copy of the mixer on the reference path
(A, dt's bias, in_proj, the input), the attention kernels (`--attn-backends`),
the MLP eager vs kernel path (one GEMM over [gate; up] + mamba_ssm's fused SwiGLU), the MLP at
the all-attention twin's width (bench/peers.attention_twin), and the loss as float32 torch
cross-entropy vs the kernel path's fused cross-entropy (model/loss.py).

From the parts, the `estimate` rows add up a whole micro-step of ours and of the twin (per layer:
two norms + mixer + MLP; plus the head) with the fastest variant of each part and with the preset's
own settings, and their ratio: the speed-up the parts allow before optimizer, embedding and any
launch gaps. `--profile` adds the top kernels of the Mamba2 mixer's forward+backward.

    python bench/block_costs.py --preset 1.3b --seq-lens 4096,8192 --tokens 8192 --chunks 128,256
    python bench/block_costs.py --smoke      # CPU plumbing check on the tiny preset (eager timing)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from bench.common import add_run_options, environment, matmul_peak_tflops, median, rel_err, sync, time_fn, write_results  # noqa: E402
from bench.peers import attention_twin  # noqa: E402
from model import ModelConfig, train_flops_per_token  # noqa: E402
from model.attention import Attention  # noqa: E402
from model.layers import ResidualRMSNorm, RotaryEmbedding, SwiGLU  # noqa: E402
from model.loss import mean_nll  # noqa: E402
from model.mamba2 import Mamba2Mixer  # noqa: E402
from model.sizing import mlp_params  # noqa: E402

COLUMNS = ["part", "variant", "seq_len", "batch", "ms", "tflops", "mfu", "fwd_flops_per_token"]
PART_NAMES = ("mamba_mixer", "attention_mixer", "mlp", "norm", "head_loss")


@dataclass
class Part:
    """One timed unit: `run(x)` is its forward on the (b, l, d) input; flops = forward FLOPs per token."""

    name: str
    variant: str
    module: nn.Module
    run: Callable[[torch.Tensor], torch.Tensor]
    flops: float
    check: Callable[[torch.Tensor], dict] | None = None  # x -> accuracy columns of this variant
    context: Callable[[], ContextManager] = contextlib.nullcontext  # entered around its steps and check


def parts(cfg: ModelConfig, seq_len: int, batch: int, chunks: list[int], backends: list[str],
          device: torch.device, dtype: torch.dtype, kernels: bool) -> list[Part]:
    """Every part and variant at `cfg`'s widths for (batch, seq_len) inputs."""
    impl = "kernels" if kernels else "reference"
    d = cfg.d_model
    out: list[Part] = []

    def ready(mod: nn.Module) -> nn.Module:
        mod = mod.to(device=device, dtype=dtype).train()
        for m in mod.modules():
            if hasattr(m, "impl"):
                m.impl = impl
        return mod

    for chunk in chunks:
        for variant, recompute, context in mamba_variants(chunk, kernels):
            c = cfg.model_copy(update={"mamba": cfg.mamba.model_copy(
                update={"chunk_size": chunk, "recompute_in_backward": recompute})})
            mixer = ready(Mamba2Mixer(c, 0))
            mm = 2.0 * Mamba2Mixer.matmul_params(c)
            out.append(Part("mamba_mixer", variant, mixer, mixer, mm + Mamba2Mixer.core_flops(c, seq_len)["ssd"],
                            lambda x, m=mixer: mixer_grad_error(m, x), context))
    positions = torch.arange(seq_len, device=device).expand(batch, seq_len)
    rope = RotaryEmbedding(cfg.head_dim, cfg.attention.rope_theta)(positions, dtype)
    for backend in backends:
        attn = ready(Attention(cfg.model_copy(update={"attn_backend": backend}), 0))
        attn.backend = backend
        flops = 2.0 * Attention.matmul_params(cfg) + Attention.core_flops(cfg, seq_len)["attention"]
        out.append(Part("attention_mixer", backend, attn, lambda x, a=attn: a.attend(x, rope), flops))
    twin = attention_twin(cfg)
    for label, width in (("ours", cfg.ffn_hidden), ("twin", twin.ffn_hidden)):
        for mlp_impl in (("reference", "kernels") if kernels else ("reference",)):
            mlp = ready(SwiGLU(d, width))
            mlp.impl = mlp_impl
            variant = f"{label} {width}, {'fused' if mlp_impl == 'kernels' else 'eager'}"
            out.append(Part("mlp", variant, mlp, mlp, 2.0 * mlp_params(cfg.model_copy(update={"ffn_hidden": width}))))
    norm = ready(ResidualRMSNorm(d, cfg.norm_eps))
    residual = torch.randn(batch, seq_len, d, device=device, dtype=dtype)
    out.append(Part("norm", "fused" if kernels else "eager", norm,
                    lambda x, n=norm: n(x, residual, kernels)[0], 0.0))
    head = nn.Linear(d, cfg.padded_vocab_size, bias=False).to(device=device, dtype=dtype)
    labels = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device)

    for impl in (("reference", "kernels") if kernels else ("reference",)):
        variant = "fused CE" if impl == "kernels" else "float32 CE"
        out.append(Part("head_loss", variant, head, lambda x, i=impl: mean_nll(head(x), labels, i),
                        2.0 * cfg.padded_vocab_size * d, lambda x, i=impl: loss_error(head(x).detach(), labels, i)))
    return out


def mamba_variants(chunk: int, kernels: bool) -> list[tuple[str, bool, Callable[[], ContextManager]]]:
    """(variant, recompute_in_backward, context) of the Mamba2 mixer at one chunk size: as the model runs
    and, on the kernel path (the reference path has one form), with mamba_ssm's two kernels in place of
    model/ssd_cb_grad.py's one, and mamba_ssm's recomputing function."""
    plain = contextlib.nullcontext
    if not kernels:
        return [(f"chunk {chunk}", False, plain)]
    return [(f"chunk {chunk}", False, plain), (f"chunk {chunk}, mamba_ssm dCB + ddA", False, mamba_ssm_cb_grad),
            (f"chunk {chunk}, recompute", True, plain)]


def mamba_ssm_cb_grad() -> ContextManager:
    """While entered, model/ssd_saved.py's backward takes mamba_ssm's two kernels (the A/B variant of the
    mixer here and of bench/train_step_throughput.py --ssd-cb-grad mamba_ssm)."""
    return mock.patch("model.ssd_saved.cb_and_decay_grads", mamba_ssm_cb_and_decay_grads)


def mamba_ssm_cb_and_decay_grads(x: torch.Tensor, dt: torch.Tensor, dA_cumsum: torch.Tensor, dout: torch.Tensor,
                                 CB: torch.Tensor, seq_idx: torch.Tensor | None = None,
                                 ngroups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """model.ssd_cb_grad.cb_and_decay_grads' result from mamba_ssm's two kernels (what it replaces)."""
    from mamba_ssm.ops.triton import ssd_chunk_scan as cs

    return (cs._chunk_scan_bwd_dcb(x, dt, dA_cumsum, dout, seq_idx=seq_idx, ngroups=ngroups),
            cs._chunk_scan_bwd_ddAcs_stable(x, dt, dA_cumsum, dout, CB))


def mixer_grad_error(mixer: Mamba2Mixer, x: torch.Tensor) -> dict:
    """Gradients of the mixer as timed (its path and dtype) against a float64 copy on the reference path,
    for one seeded output gradient: relative errors of A (A_log), dt's bias, in_proj and the input."""
    names = ("A_log", "dt_bias", "in_proj.weight")
    ref = copy.deepcopy(mixer).double()
    ref.impl = "reference"
    gen = torch.Generator(device=x.device).manual_seed(0)
    dy = torch.randn(x.shape, generator=gen, device=x.device)
    grads = []
    for m, inp in ((mixer, x), (ref, x.double())):
        inp = inp.detach().requires_grad_()
        params = dict(m.named_parameters())
        y = m(inp)
        grads.append(torch.autograd.grad(y, [params[n] for n in names] + [inp], dy.to(y.dtype)))
    return {f"err_{n.split('.')[0]}": rel_err(g, w) for n, g, w in zip(names + ("x",), *grads)}


def loss_error(logits: torch.Tensor, labels: torch.Tensor, impl: str) -> dict:
    """Loss and logits-gradient of model.loss.mean_nll on path `impl` against float64 cross-entropy of
    the same logits (relative errors)."""
    ref = logits.double().requires_grad_()
    want = F.cross_entropy(ref.flatten(0, 1), labels.flatten())
    want.backward()
    test = logits.clone().requires_grad_()
    got = mean_nll(test.clone(), labels, impl)  # a copy: the fused backward overwrites its input
    got.backward()
    return {"loss_rel_err": rel_err(got, want), "grad_rel_err": rel_err(test.grad, ref.grad)}


def fwd_bwd(part: Part, x: torch.Tensor, grad: torch.Tensor | None) -> Callable[[], None]:
    """One forward+backward of `part` (gradient `grad` on its output, or a scalar loss), in its context."""
    def step() -> None:
        with part.context():
            y = part.run(x)
            y.backward(grad if y.dim() else None)
    return step


def time_part(step: Callable[[], None], params: list[nn.Parameter], x: torch.Tensor, device: torch.device,
              iters: int, cpu_warmup: int = 2) -> float:
    """Milliseconds per call of `step`: replayed from a CUDA graph on CUDA, eager elsewhere (after
    `cpu_warmup` untimed calls: 0 where the caller has just made one)."""
    if device.type != "cuda":
        return 1e3 * median(time_fn(step, device, warmup=cpu_warmup, iters=iters))
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up (Triton autotuning) off the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    for p in [*params, x]:
        p.grad = None  # the captured backward allocates the gradients in the graph's pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return median(times)


def kernel_table(step: Callable[[], None], device: torch.device, top: int = 15) -> list[dict]:
    """The `top` GPU kernels of one eager call of `step` by total time (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync(device)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    return [{"kernel": e.key[:100], "calls": e.count, "ms": e.device_time_total / 1e3} for e in events[:top]]


def estimates(rows: list[dict], cfg: ModelConfig, peak: float, kernels: bool) -> list[dict]:
    """Per sequence length: a whole micro-step of ours and of the all-attention twin summed from the
    parts (n_layers x (2 norms + mixer + MLP) + head), with the fastest variant of each part and with
    the settings the model runs (preset chunk size, SDPA, the device's MLP path), and their ratio."""
    twin = attention_twin(cfg)
    runs = {"mamba_mixer": f"chunk {cfg.mamba.chunk_size}", "attention_mixer": "sdpa",
            "mlp": "fused" if kernels else "eager", "head_loss": "fused CE" if kernels else "float32 CE"}
    n_mamba, n_attn = cfg.layer_pattern.count(Mamba2Mixer.letter), cfg.layer_pattern.count(Attention.letter)
    out = []
    for seq in sorted({r["seq_len"] for r in rows}):
        timed = [r for r in rows if r["seq_len"] == seq and "ms" in r]
        batch = timed[0]["batch"] if timed else 1
        for label in ("fastest variants", "as the model runs"):
            def ms(part: str, prefix: str = "") -> float:
                cand = [r for r in timed if r["part"] == part and r["variant"].startswith(prefix)]
                if label != "fastest variants" and part in runs:
                    cand = [r for r in cand if r["variant"].endswith(runs[part])]
                return min(r["ms"] for r in cand)

            try:
                shared = 2 * ms("norm")
                ours = (n_mamba * ms("mamba_mixer") + n_attn * ms("attention_mixer")
                        + cfg.n_layers * (shared + ms("mlp", "ours")) + ms("head_loss"))
                twin_ms = twin.n_layers * (ms("attention_mixer") + shared + ms("mlp", "twin")) + ms("head_loss")
            except ValueError:  # a part failed at this length: no estimate
                continue
            for name, c, t in (("ours", cfg, ours), ("attention twin", twin, twin_ms)):
                tok = batch * seq / (t / 1e3)
                out.append({"part": "estimate", "variant": f"{name}, {label}", "seq_len": seq, "batch": batch,
                            "ms": t, "tokens_per_s": tok, "mfu": tok * train_flops_per_token(c, seq) / (peak * 1e12)})
            out.append({"part": "estimate", "variant": f"ours / twin, {label}", "seq_len": seq, "batch": batch,
                        "ratio": twin_ms / ours})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--seq-lens", default="4096,8192")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch (batch = tokens / seq_len)")
    ap.add_argument("--chunks", default="128,256", help="Mamba2 chunk sizes to time")
    ap.add_argument("--attn-backends", default="sdpa,flash")
    ap.add_argument("--profile", action="store_true", help="also list the Mamba2 mixer's top kernels")
    ap.add_argument("--profile-top", type=int, default=15, help="how many kernels --profile lists")
    ap.add_argument("--parts", type=lambda t: t.split(","), default=None,
                    help=f"comma-separated subset of {', '.join(PART_NAMES)} (default all)")
    add_run_options(ap, iters=20)
    args = ap.parse_args(argv)
    if args.parts and set(args.parts) - set(PART_NAMES):
        ap.error(f"--parts: unknown {sorted(set(args.parts) - set(PART_NAMES))}; choose from {', '.join(PART_NAMES)}")
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        preset, seq_lens, tokens, chunks, backends = "tiny", [64, 128], 128, [32, 64], ["sdpa"]
    else:
        preset, seq_lens, tokens = args.preset, [int(s) for s in args.seq_lens.split(",")], args.tokens
        chunks, backends = [int(c) for c in args.chunks.split(",")], args.attn_backends.split(",")
    cfg = ModelConfig(preset=preset)
    peak = matmul_peak_tflops(device, n=1024 if args.smoke else 8192)
    meta = environment(device) | {"matmul_peak_tflops": peak, "preset": preset, "tokens": tokens}
    name = args.name or f"block_costs_{preset}" + ("_smoke" if args.smoke else "")
    rows: list[dict] = []
    for seq in seq_lens:
        batch = max(1, tokens // seq)
        torch.manual_seed(0)
        for part in parts(cfg, seq, batch, chunks, backends, device, dtype, kernels=device.type == "cuda"):
            if args.parts and part.name not in args.parts:
                continue
            x = torch.randn(batch, seq, cfg.d_model, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn_like(x)
            step = fwd_bwd(part, x, grad)
            row = {"part": part.name, "variant": part.variant, "seq_len": seq, "batch": batch,
                   "fwd_flops_per_token": part.flops}
            try:
                t = time_part(step, list(part.module.parameters()), x, device, 3 if args.smoke else args.iters)
                row |= {"ms": t, "tflops": 3 * part.flops * batch * seq / (t / 1e3) / 1e12}
                row["mfu"] = row["tflops"] / peak
                if part.check is not None:
                    with part.context():
                        row |= part.check(x.detach())
                if args.profile and part.name == "mamba_mixer":
                    row["kernels"] = kernel_table(step, device, args.profile_top)
            except Exception as exc:  # OOM or a failed capture: the row says so, the run goes on
                row["status"] = f"{type(exc).__name__}: {exc}"[:200]
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "kernels"},
                  flush=True)
            del part, step, x, grad
            if device.type == "cuda":
                torch.cuda.empty_cache()
        write_results(name, rows + estimates(rows, cfg, peak, device.type == "cuda"), meta,
                      COLUMNS + ["loss_rel_err", "grad_rel_err", "err_A_log", "err_dt_bias", "err_in_proj", "err_x",
                                "tokens_per_s", "ratio", "status"],
                      args.out, title=f"Forward+backward time of each block part ({preset}, {tokens} tokens per micro-batch)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
