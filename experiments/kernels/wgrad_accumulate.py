"""What does adding each weight gradient into its float32 accumulator cost: a bf16 weight-gradient GEMM
followed by the fold into float32 (ZeRO-1's path, train/grad_fold.py), or one GEMM whose float32 output
adds into the accumulator (model/wgrad.py, Megatron-LM's gradient-accumulation fusion)?

For every distinct weight shape of the preset's linear layers (the MLP's gate and up as the one
concatenated GEMM the kernel path runs; the LM head included) at `--tokens` tokens, GPU time
(bench/block_costs.time_part: a CUDA-graph replay) of
  gemm        dy^T @ x in bf16 (the weight-gradient GEMM the backward runs either way)
  gemm+fold   the same, then main_grad.add_(it) (float32 += bf16)
  fused       model.wgrad.accumulate_weight_grad: the GEMM with a float32 output added into main_grad
and, for the last two, the relative error of the updated accumulator against float64 (it starts from a
random earlier sum). The `total` rows weigh each shape by how many layers have it: the model's cost per
micro-batch of each path beyond the bf16 GEMMs, i.e. what the fusion saves.

    python experiments/kernels/wgrad_accumulate.py --preset 1.3b --tokens 8192
    python experiments/kernels/wgrad_accumulate.py --smoke     # CPU: the tiny preset, eager timing, the files
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repo's packages first

from bench.block_costs import time_part  # noqa: E402
from bench.common import add_run_options, environment, rel_err, sync, write_results  # noqa: E402
from model import HybridLM, ModelConfig  # noqa: E402
from model.wgrad import accumulate_weight_grad  # noqa: E402

COLUMNS = ["weight", "shape", "count", "gemm_ms", "gemm_fold_ms", "fused_ms", "fold_cost_ms", "fused_cost_ms",
           "err_fold", "err_fused"]


def weight_shapes(cfg: ModelConfig) -> Counter:
    """(kind, out, in) -> how many linear weights of the model have that GEMM shape (gate and up merged)."""
    with torch.device("meta"):
        model = HybridLM(cfg)
    shapes: Counter = Counter()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.endswith("up_proj"):
            continue
        out, inp = module.weight.shape
        kind = name.rsplit(".", 1)[-1]
        if kind == "gate_proj":
            kind, out = "gate_up_proj", 2 * out
        shapes[(kind, out, inp)] += 1
    return shapes


def measure(out: int, inp: int, tokens: int, device: torch.device, dtype: torch.dtype, iters: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    dy = torch.randn(tokens, out, generator=gen).to(device, dtype)
    x = torch.randn(tokens, inp, generator=gen).to(device, dtype)
    earlier = torch.randn(out, inp, generator=gen).to(device) * tokens ** 0.5  # a sum of earlier micro-batches
    expected = earlier.double() + dy.double().t() @ x.double()
    folded, fused = earlier.clone(), earlier.clone()
    folded.add_(dy.t() @ x)
    accumulate_weight_grad(fused, dy, x)
    row = {"err_fold": rel_err(folded, expected), "err_fused": rel_err(fused, expected)}
    del expected
    row["gemm_ms"] = time_part(lambda: dy.t() @ x, [], x, device, iters)
    row["gemm_fold_ms"] = time_part(lambda: folded.add_(dy.t() @ x), [], x, device, iters)
    row["fused_ms"] = time_part(lambda: accumulate_weight_grad(fused, dy, x), [], x, device, iters)
    row["fold_cost_ms"] = row["gemm_fold_ms"] - row["gemm_ms"]
    row["fused_cost_ms"] = row["fused_ms"] - row["gemm_ms"]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--tokens", type=int, default=8192)
    add_run_options(ap, iters=20)
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    preset = "tiny" if args.smoke else args.preset
    tokens = 64 if args.smoke else args.tokens
    dtype = torch.bfloat16
    name = args.name or f"wgrad_accumulate_{preset}{'_smoke' if args.smoke else ''}"
    meta = environment(device) | {"preset": preset, "tokens": tokens, "dtype": str(dtype)}
    title = f"Weight gradient into a float32 accumulator ({preset}, {tokens} tokens): bf16 GEMM + fold vs fused"
    rows: list[dict] = []
    totals = {"gemm_ms": 0.0, "gemm_fold_ms": 0.0, "fused_ms": 0.0, "fold_cost_ms": 0.0, "fused_cost_ms": 0.0}
    for (kind, out, inp), count in sorted(weight_shapes(ModelConfig(preset=preset)).items()):
        row = {"weight": kind, "shape": f"{out} x {inp}", "count": count}
        row |= measure(out, inp, tokens, device, dtype, args.iters)
        for k in totals:
            totals[k] += count * row[k]
        rows.append(row)
        print(row, flush=True)
        write_results(name, rows, meta, COLUMNS, args.out, title=title)
        sync(device)
    rows.append({"weight": "total per micro-batch", "count": sum(r["count"] for r in rows)} | totals)
    write_results(name, rows, meta, COLUMNS, args.out, title=title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
