"""Shared helpers of the benchmark scripts: device facts, timing, the matmul ceiling, result files.

Every script writes `<results>/<name>.json` (rows + device, date, versions, exact command) and a
markdown table beside it; scripts that plot add a PNG. <results> is --out where a script has it, else
$BENCH_RESULTS (bench/run.sh sets it to its output folder), else bench/results.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

if TYPE_CHECKING:
    from model import HybridLM, ModelConfig

COMMITTED = Path(__file__).resolve().parent / "results"  # the committed result files the docs' tables are read from
RESULTS = Path(os.environ.get("BENCH_RESULTS") or COMMITTED)  # where a run writes


def bench_model(cfg: "ModelConfig", device: torch.device) -> "HybridLM":
    """A freshly initialised model for timing: bf16 on CUDA (float32 on CPU), train mode, its fastest
    execution path on `device` (kernels on CUDA). A GraphedLM: HybridLM until a bench captures its
    training graphs (train/graph_step.py)."""
    from train.graph_step import GraphedLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = GraphedLM(cfg).to(device=device, dtype=dtype).train()
    model.set_impl()
    return model


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    """Device, date and versions recorded with every result."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "mamba_ssm", "causal_conv1d", "flash_attn", "deepspeed", "transformers", "triton"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {
        "device": device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "versions": versions,
        "command": " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1], *sys.argv]),
    }


def add_run_options(ap: argparse.ArgumentParser, iters: int) -> None:
    """The options the timing benches share: --iters (timed calls per row), --smoke (the CPU check on the
    tiny preset), --out (results folder; default bench/results), --name (results file name)."""
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--name", default=None)


def hf_torch_path(device: torch.device) -> contextlib.AbstractContextManager:
    """transformers' Bamba and Granite pick causal_conv1d / mamba_ssm by what imports, not by the tensors'
    device: on the CPU (of a machine that has them) run their PyTorch code (export.hf.hf_torch_ops)."""
    from export.hf import hf_torch_ops

    return hf_torch_ops() if device.type == "cpu" else contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds per call of `fn` for `iters` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def matmul_peak_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """Measured bf16 GEMM rate (TFLOP/s) on random data: the MFU denominator."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = median(time_fn(lambda: a @ b, device, warmup=3, iters=iters))
    return 2 * n**3 / t / 1e12


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (benchmarks write PNGs, never open windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write `fig` to `path` as a PNG (tight layout, 120 dpi) and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def write_results(name: str, rows: list[dict], meta: dict, columns: Sequence[str], out_dir: Path | None = None,
                  title: str | None = None) -> Path:
    """Write <name>.json and <name>.md (a table of `columns`) under out_dir (default bench/results)."""
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# {title or name}", "", f"Device: {meta.get('device')}; date: {meta.get('date')}; "
             f"command: `{meta.get('command')}`", ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    return out_dir / f"{name}.json"


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 1e-2 else f"{v:.4g}"
    return str(v)
