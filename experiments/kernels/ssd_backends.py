"""Which SSD scan kernel is fastest for the Mamba2 mixer's shapes: mamba_ssm's chunked SSD or
flash-linear-attention's (fla) chunked simple-GLA?

The SSD recurrence h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T, y_t = C_t^T h_t + D x_t is fla's simple
gated linear attention with q = C, k = B, v = dt * x and a per-head log decay g = dt * A. fla's kernels
take one q and k per head, so the group-shared B and C are expanded to every head (more work in the
C.B products than mamba_ssm, which computes them once per group), and fla fuses the backward into
four kernels where mamba_ssm runs ~10 per layer (bench/NOTES.md, session 8: those run at ~10% of the
tensor-core rate and are what is left of the gap to the all-attention twin).

Rows per sequence length: forward and forward+backward time (CUDA-graph replay, GPU time alone) of
  mamba_ssm    mamba_chunk_scan_combined(x, dt, A, B, C, D, dt_bias, dt_softplus) at each chunk of --chunks
  fla c<Q>     softplus and the products in torch, then fla's chunk_simple_gla at chunk Q (--fla-chunks)
  reference    model.ssd.ssd_chunked in the inputs' dtype at the preset's chunk (the pure-PyTorch path; the
               only one on CPU)
and each one's output and gradients (x, dt, A, B, C, D, dt_bias) against the float64 reference
(model.ssd.ssd_chunked in float64 on the same inputs), as relative errors.

    python experiments/kernels/ssd_backends.py --preset 1.3b --seq-lens 8192,16384 --fla-chunks 64,128
    python experiments/kernels/ssd_backends.py --smoke     # CPU: the reference path on the tiny preset, the files
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repo's packages first

from bench.block_costs import time_part  # noqa: E402
from bench.common import add_run_options, environment, rel_err, write_results  # noqa: E402
from model import ModelConfig  # noqa: E402
from model.ssd import discretize_dt, ssd_chunked  # noqa: E402

COLUMNS = ["backend", "seq_len", "fwd_ms", "fwd_bwd_ms", "err_y", "err_dx", "err_dB", "err_dC", "err_ddt",
           "err_dA", "status"]
GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias")

SSD = Callable[..., torch.Tensor]  # (x, dt, A, B, C, D, dt_bias) -> y (b, l, h, p)


def inputs(cfg: ModelConfig, seq_len: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded SSD inputs at the preset's widths, distributed as the mixer makes them: x (1, l, h, p) and
    B, C (1, l, g, n) in `dtype`; raw dt (1, l, h) in `dtype`; A (h,) < 0, D (h,), dt_bias (h,) float32."""
    m, h = cfg.mamba, cfg.n_ssm_heads
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen)).to(device)

    dt_init = torch.exp(torch.rand(h, generator=gen) * (torch.log(torch.tensor(m.dt_max)) -
                                                          torch.log(torch.tensor(m.dt_min))) +
                        torch.log(torch.tensor(m.dt_min)))
    return {
        "x": rand(1, seq_len, h, m.headdim).to(dtype),
        "dt": rand(1, seq_len, h, scale=0.5).to(dtype),
        "A": -torch.empty(h).uniform_(*m.a_init_range, generator=gen).to(device),
        "B": rand(1, seq_len, m.n_groups, m.d_state, scale=m.d_state ** -0.5).to(dtype),
        "C": rand(1, seq_len, m.n_groups, m.d_state, scale=m.d_state ** -0.5).to(dtype),
        "D": torch.ones(h, device=device),
        "dt_bias": (dt_init + torch.log(-torch.expm1(-dt_init))).to(device),  # softplus^-1 of dt_init
    }


def reference(chunk: int) -> SSD:
    """The pure-PyTorch chunked SSD (model.ssd) in the inputs' own dtype."""
    def run(x, dt, A, B, C, D, dt_bias):
        return ssd_chunked(x, discretize_dt(dt, dt_bias), A, B, C, chunk, D=D)[0]
    return run


def mamba_ssm(chunk: int) -> SSD:
    """mamba_ssm's Triton SSD, softplus(dt + dt_bias) inside its first kernel."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    def run(x, dt, A, B, C, D, dt_bias):
        return mamba_chunk_scan_combined(x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True)
    return run


def fla(chunk: int) -> SSD:
    """fla's chunked simple GLA as the SSD: q = C, k = B (expanded from groups to heads), v = dt * x,
    g = dt * A (float32), scale 1; D * x added outside."""
    from fla.ops.simple_gla import chunk_simple_gla

    def run(x, dt, A, B, C, D, dt_bias):
        h = x.shape[2]
        dt = discretize_dt(dt, dt_bias)  # (b, l, h) float32
        v = (x * dt.unsqueeze(-1)).to(x.dtype)
        q = C.repeat_interleave(h // C.shape[2], dim=2)
        k = B.repeat_interleave(h // B.shape[2], dim=2)
        y, _ = chunk_simple_gla(q, k, v, g=dt * A, scale=1.0, chunk_size=chunk)
        return (y + x * D.view(1, 1, -1, 1).to(x.dtype)).to(x.dtype)
    return run


def fresh_leaves(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of the inputs as new leaves that require gradients."""
    return {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}


def run_and_grads(fn: SSD, tensors: dict[str, torch.Tensor], dy: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """y and the gradients of <y, dy> with respect to every input (fresh leaves, so nothing accumulates)."""
    leaves = fresh_leaves(tensors)
    y = fn(*(leaves[k] for k in GRAD_NAMES))
    y.backward(dy)
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def errors(y: torch.Tensor, grads: dict[str, torch.Tensor], y_ref: torch.Tensor,
           grads_ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative errors of the output and of the gradients that differ most between backends."""
    out = {"err_y": rel_err(y, y_ref)}
    for k, col in (("x", "err_dx"), ("B", "err_dB"), ("C", "err_dC"), ("dt", "err_ddt"), ("A", "err_dA")):
        out[col] = rel_err(grads[k], grads_ref[k])
    return out


def timings(fn: SSD, tensors: dict[str, torch.Tensor], dy: torch.Tensor, device: torch.device,
            iters: int) -> dict[str, float]:
    """Forward and forward+backward milliseconds (block_costs.time_part: graph replays on CUDA, eager on CPU)."""
    leaves = fresh_leaves(tensors)
    args = [leaves[k] for k in GRAD_NAMES]

    def forward() -> None:
        with torch.no_grad():
            fn(*args)

    def fwd_bwd() -> None:
        fn(*args).backward(dy)

    return {"fwd_ms": time_part(forward, [], args[0], device, iters),
            "fwd_bwd_ms": time_part(fwd_bwd, args[1:], args[0], device, iters)}


def backends(names: list[str], chunk: int, mamba_chunks: list[int], fla_chunks: list[int]
             ) -> list[tuple[str, Callable[[], SSD]]]:
    """(row name, builder) for each requested backend; builders import their package when called."""
    out: list[tuple[str, Callable[[], SSD]]] = []
    for n in names:
        if n == "fla":
            out += [(f"fla c{q}", lambda q=q: fla(q)) for q in fla_chunks]
        elif n == "mamba_ssm":
            out += [(f"mamba_ssm c{q}", lambda q=q: mamba_ssm(q)) for q in mamba_chunks]
        elif n == "reference":
            out.append((f"reference c{chunk}", lambda: reference(chunk)))
        else:
            raise SystemExit(f"--backends: unknown backend {n!r}; choose from mamba_ssm, fla, reference")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--seq-lens", default="8192,16384")
    ap.add_argument("--backends", default="mamba_ssm,fla,reference")
    ap.add_argument("--chunks", default=None, help="mamba_ssm's chunk sizes (default: the preset's)")
    ap.add_argument("--fla-chunks", default="64,128")
    add_run_options(ap, iters=20)
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    preset = "tiny" if args.smoke else args.preset
    cfg = ModelConfig(preset=preset)
    chunk = cfg.mamba.chunk_size
    mamba_chunks = [int(q) for q in args.chunks.split(",")] if args.chunks else [chunk]
    seq_lens = [2 * chunk] if args.smoke else [int(s) for s in args.seq_lens.split(",")]
    names = ["reference"] if args.smoke else args.backends.split(",")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    name = args.name or f"ssd_backends_{preset}{'_smoke' if args.smoke else ''}"
    meta = environment(device) | {"preset": preset, "dtype": str(dtype), "heads": cfg.n_ssm_heads,
                                  "headdim": cfg.mamba.headdim, "d_state": cfg.mamba.d_state,
                                  "n_groups": cfg.mamba.n_groups, "reference": "model.ssd.ssd_chunked, float64"}
    title = f"SSD scan backends ({preset} Mamba2 widths, batch 1, {dtype} in, forward / forward+backward)"
    rows: list[dict] = []
    for seq_len in seq_lens:
        tensors = inputs(cfg, seq_len, device, dtype)
        dy = torch.randn(tensors["x"].shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        y_ref, grads_ref = run_and_grads(reference(chunk), {k: v.double() for k, v in tensors.items()}, dy.double())
        for row_name, build in backends(names, chunk, mamba_chunks, [int(q) for q in args.fla_chunks.split(",")]):
            row: dict = {"backend": row_name, "seq_len": seq_len}
            try:
                fn = build()
                y, grads = run_and_grads(fn, tensors, dy)
                row |= errors(y, grads, y_ref, grads_ref) | timings(fn, tensors, dy, device, args.iters)
            except Exception as exc:  # a backend that does not import or run here: say so in its row
                row["status"] = f"{type(exc).__name__}: {exc}"[:200]
            rows.append(row)
            print(row, flush=True)
            write_results(name, rows, meta, COLUMNS, args.out, title=title)
        del y_ref, grads_ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
