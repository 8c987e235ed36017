"""What context parallelism costs on one rank: forward+backward of a preset through model/context_parallel.py
with a group of one rank, against the same model without it.

Rows (same weights, same packed batch: `--docs` documents per row, bf16 on CUDA), each on the fastest path
(kernels on CUDA) and on the reference path (PyTorch):
  plain                 the training path without context parallelism
  context parallel 1    train.context_parallel's code with a one-rank group: the collectives (on one rank, a
                        copy), the scan's entering-state term, the global document and position bookkeeping,
                        and what it runs in PyTorch on the kernel path (the Mamba2 conv, attention as masked
                        SDPA over the gathered keys instead of flash-attn)
`vs_plain` is a context-parallel row's step time over the plain row's on the same path (the overhead);
`loss_rel_err` compares its loss with that plain row's.

    python bench/context_parallel_overhead.py --preset small --seq-len 8192 --batch 2 --docs 4
    python bench/context_parallel_overhead.py --smoke      # CPU plumbing check on the tiny preset
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from bench.common import (  # noqa: E402
    add_run_options,
    bench_model,
    environment,
    median,
    time_fn,
    write_results,
)
from model import ModelConfig  # noqa: E402
from model.context_parallel import ContextParallel  # noqa: E402


def one_rank_group(device: torch.device) -> ContextParallel:
    """A process group of this process alone (NCCL on CUDA, gloo on CPU) as a context-parallel group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1, device_id=device if device.type == "cuda" else None)
    return ContextParallel(dist.group.WORLD, 0, 1)


def measure(cfg: ModelConfig, impl: str | None, cp: ContextParallel | None, batch: int, seq: int, docs: int,
            device: torch.device, warmup: int, iters: int) -> tuple[dict, float]:
    """One row: forward+backward time of `model.loss` on a packed batch; returns (row, loss)."""
    torch.manual_seed(0)
    model = bench_model(cfg, device)
    model.set_impl(impl)
    model.context_parallel = cp
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen).to(device)
    seq_idx = (torch.arange(seq) * docs // seq).expand(batch, seq).contiguous()  # `docs` equal documents a row
    losses = []

    def step() -> None:
        loss = model.loss(ids[:, :-1], ids[:, 1:], seq_idx=seq_idx)
        loss.backward()
        losses.append(float(loss.detach()))
        for p in model.parameters():
            p.grad = None

    t = median(time_fn(step, device, warmup=warmup, iters=iters))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
    row = {"impl": model.impl, "batch": batch, "seq_len": seq, "docs": docs, "step_ms": 1e3 * t,
           "tokens_per_s": batch * seq / t}
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return row, losses[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--docs", type=int, default=4, help="documents per row (packed, equal lengths)")
    add_run_options(ap, iters=5)
    args = ap.parse_args()
    # with its index: NCCL's device_id refuses a bare "cuda"
    device = torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())
    preset, seq, batch = ("tiny", 64, 1) if args.smoke else (args.preset, args.seq_len, args.batch)
    warmup, iters = (1, 1) if args.smoke else (2, args.iters)
    cfg = ModelConfig(preset=preset, **({"vocab_size": 512} if args.smoke else {}))
    name = (args.name or "context_parallel_overhead") + ("_smoke" if args.smoke else "")
    group = one_rank_group(device)
    print(f"process group up ({device}); measuring {preset} at {batch} x {seq}", flush=True)
    rows = []
    try:
        for impl in (None, "reference"):  # None: the fastest path on the device
            plain, plain_loss = measure(cfg, impl, None, batch, seq, args.docs, device, warmup, iters)
            print({"case": "plain", **plain}, flush=True)  # a run cut by its time limit still says how far it got
            split, split_loss = measure(cfg, impl, group, batch, seq, args.docs, device, warmup, iters)
            split |= {"vs_plain": split["step_ms"] / plain["step_ms"],
                      "loss_rel_err": abs(split_loss - plain_loss) / abs(plain_loss)}
            rows += [{"case": "plain", **plain}, {"case": "context parallel 1", **split}]
            print(rows[-1], flush=True)
            write_results(name, rows, environment(device) | {"preset": preset}, ["case", "impl", "batch", "seq_len",
                          "docs", "step_ms", "tokens_per_s", "vs_plain", "peak_mem_gb", "loss_rel_err"], args.out,
                          title=f"Context parallelism on one rank: overhead ({preset})")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
