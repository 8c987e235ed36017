"""Hardware ceilings of the device: dense GEMM rate and memory bandwidth, the yardsticks of MFU and of
memory-bound kernels.

  gemm     TFLOP/s of an n x n @ n x n matmul (2 n^3 FLOPs) for each n of --gemm-sizes, bf16 on GPU
           (float32 on CPU): bench.common.matmul_peak_tflops; spec_fraction = that over the
           datasheet dense bf16 peak (train.metrics.device_peak_flops) where the GPU is known
  copy     GB/s of a device-to-device copy of a --gib GiB float32 tensor: bytes read + written
           (2 x size) / time
  reduce   GB/s of x.sum() over a --gib GiB float32 tensor: bytes read / time
Each value is the median of --iters timed calls after 3 untimed ones. Every row is printed and the
results rewritten as soon as it is measured; a failure (e.g. out of memory) becomes the row's status.

Writes <out>/hw_ceilings[_smoke].{json,md}.

    python bench/hw_ceilings.py                 # GPU: GEMM 4096/8192/16384, 4 GiB copy and reduction
    python bench/hw_ceilings.py --smoke         # small sizes (CPU without GPU)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from bench import peers  # noqa: E402
from bench.common import RESULTS, environment, matmul_peak_tflops, median, time_fn, write_results  # noqa: E402

NAME = "hw_ceilings"
COLUMNS = ["kind", "size", "value", "unit", "spec_fraction", "status"]


def gemm_row(n: int, iters: int, device: torch.device) -> dict:
    """Measured GEMM TFLOP/s at n x n x n, with its share of the datasheet peak where known."""
    from train.metrics import device_peak_flops

    tflops = matmul_peak_tflops(device, n=n, iters=iters)
    spec = device_peak_flops(device, None)
    return {"value": tflops} | ({"spec_fraction": tflops * 1e12 / spec} if spec else {})


def copy_row(nbytes: int, iters: int, device: torch.device) -> dict:
    """GB/s of dst.copy_(src), counting the bytes read and written."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = median(time_fn(lambda: dst.copy_(src), device, warmup=3, iters=iters))
    return {"value": 2 * src.nbytes / t / 1e9}


def reduce_row(nbytes: int, iters: int, device: torch.device) -> dict:
    """GB/s of x.sum(), counting the bytes read."""
    x = torch.rand(nbytes // 4, device=device)
    t = median(time_fn(lambda: x.sum(), device, warmup=3, iters=iters))
    return {"value": x.nbytes / t / 1e9}


def device_facts(device: torch.device) -> dict:
    """Memory size and SM count of a GPU (empty on CPU)."""
    if device.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(device)
    return {"total_memory_gb": props.total_memory / 1e9, "multiprocessors": props.multi_processor_count}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gemm-sizes", default="4096,8192,16384", help="comma-separated n of the n^3 GEMMs")
    ap.add_argument("--gib", type=float, default=4.0, help="GiB of the copied / reduced tensor (>= 2 for HBM)")
    ap.add_argument("--iters", type=int, default=20, help="timed calls per row")
    ap.add_argument("--smoke", action="store_true", help="GEMM 256/512, 64 MiB tensors, 3 calls")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = ap.parse_args(argv)
    if args.smoke:
        args.gemm_sizes, args.gib, args.iters = "256,512", 1 / 16, 3
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bf16" if device.type == "cuda" else "float32"
    nbytes = int(args.gib * 2**30)
    meta = environment(device) | device_facts(device) | {"gemm_dtype": dtype, "iters": args.iters}
    name = f"{NAME}{'_smoke' if args.smoke else ''}"
    cases = [(f"gemm {dtype}", f"{n}^3", "TFLOP/s", lambda n=n: gemm_row(n, args.iters, device))
             for n in (int(s) for s in args.gemm_sizes.split(","))]
    cases += [("copy (read+write)", f"{args.gib:g} GiB", "GB/s", lambda: copy_row(nbytes, args.iters, device)),
              ("reduce sum (read)", f"{args.gib:g} GiB", "GB/s", lambda: reduce_row(nbytes, args.iters, device))]
    rows: list[dict] = []
    for kind, size, unit, measure in cases:
        rows.append({"kind": kind, "size": size, "unit": unit} | peers.run_guarded(measure, device))
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
        write_results(name, rows, meta, COLUMNS, args.out, title=f"hardware ceilings: {meta['device']}")
    print(f"wrote {args.out / name}.json/.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
