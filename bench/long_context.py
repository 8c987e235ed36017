"""Training at 32K-128K tokens per sequence on one GPU: ours vs the all-attention twin, per length the
activation-checkpointing mode that fits with the least recomputation.

For each model and length, one sequence (batch 1) runs forward + backward with the LM head and loss
in chunks (train.loss_chunk_tokens, model/loss.py) under each mode of train/activation_checkpointing.py
in the order of --modes (default none, mlp, attention, full: least recomputation first) until one fits;
the rows before it are the OOMs. `--all-modes` measures every mode instead. offload is not in the
default list: at 128K tokens the 1.3B's saved activations would not fit the host's memory either. Reported:
seconds per step, tokens/s, model TFLOP/s and MFU by the model's own FLOP count (model/sizing.py,
attention included, recomputation not counted) over the measured bf16 GEMM peak (bench/common.py),
peak memory. Gradients are preallocated, as a training step holds them.

    python bench/long_context.py --out $OUT                 # 1.3b at 32K, 64K, 128K (GPU)
    python bench/long_context.py --smoke --out /tmp/lc      # tiny preset at 256/512 tokens (CPU check)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import peers  # noqa: E402
from bench.common import (  # noqa: E402
    RESULTS,
    add_run_options,
    bench_model,
    environment,
    matmul_peak_tflops,
    median,
    sync,
    time_fn,
    write_results,
)
from model import ModelConfig, train_flops_per_token  # noqa: E402
from train.activation_checkpointing import apply_activation_checkpointing, remove_activation_checkpointing  # noqa: E402

NAME = "long_context"
COLUMNS = ["model", "seq_len", "mode", "status", "chosen", "step_s", "tokens_per_s", "model_tflops", "mfu",
           "peak_mem_gb"]


def step_fn(model: torch.nn.Module, ids: torch.Tensor, chunk: int):
    def step() -> None:
        model.loss(ids[:, :-1], ids[:, 1:], loss_chunk_tokens=chunk).backward()

    return step


def measure(model: torch.nn.Module, cfg: ModelConfig, seq: int, chunk: int, iters: int, peak_tflops: float,
            device: torch.device) -> dict:
    """One row: an untimed step, then the median of `iters` timed steps and the peak memory."""
    ids = torch.randint(0, cfg.vocab_size, (1, seq + 1), device=device)
    step = step_fn(model, ids, chunk)
    step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = median(time_fn(step, device, warmup=0, iters=iters))
    tflops = train_flops_per_token(cfg, seq) * seq / step_s / 1e12
    row = {"step_s": step_s, "tokens_per_s": seq / step_s, "model_tflops": tflops, "mfu": tflops / peak_tflops}
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--seq-lens", default="32768,65536,131072", help="comma-separated")
    ap.add_argument("--models", type=peers.model_list, default="ours,attention", help="ours and/or attention")
    ap.add_argument("--loss-chunk-tokens", type=int, default=8192, help="train.loss_chunk_tokens of every row")
    ap.add_argument("--modes", default="none,mlp,attention,full",
                    help="activation-checkpointing modes to try, in order (train/activation_checkpointing.py)")
    ap.add_argument("--all-modes", action="store_true", help="measure every mode, not only up to the first that fits")
    add_run_options(ap, iters=2)
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset, args.seq_lens, args.iters, args.loss_chunk_tokens = "tiny", "64,128", 1, 100
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    seqs = [int(s) for s in args.seq_lens.split(",")]
    base = peers.fit_length(ModelConfig(preset=args.preset), max(seqs) + 1)
    peak = matmul_peak_tflops(device, n=8192 if device.type == "cuda" else 512, iters=20 if device.type == "cuda" else 3)
    meta = environment(device) | {"preset": args.preset, "batch": 1, "loss_chunk_tokens": args.loss_chunk_tokens,
                                  "measured_peak_tflops": peak, "iters": args.iters}
    name = args.name or f"{NAME}_{args.preset}{'_smoke' if args.smoke else ''}"
    out = args.out or RESULTS
    title = f"long-context training step, {args.preset}, batch 1: {meta['device']}"
    rows: list[dict] = []
    for model_name in args.models:
        if model_name not in peers.OURS:
            raise SystemExit(f"--models: {model_name} is not a HybridLM (ours, attention)")
        cfg = peers.flops_config(model_name, base)
        peers.release_memory(device)
        model = bench_model(cfg, device)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        for seq in seqs:
            for mode in args.modes.split(","):
                remove_activation_checkpointing(model)
                apply_activation_checkpointing(model, mode)
                row = {"model": model_name, "seq_len": seq, "mode": mode}
                row |= peers.run_guarded(lambda: measure(model, cfg, seq, args.loss_chunk_tokens, args.iters, peak,
                                                         device), device)
                fits = row["status"] == "ok"
                row["chosen"] = fits and not any(r["chosen"] for r in rows if r["model"] == model_name
                                                 and r["seq_len"] == seq)
                rows.append(row)
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
                write_results(name, rows, meta, COLUMNS, out, title=title)
                if fits and not args.all_modes:
                    break
        del model
    print(f"wrote {out / name}.json/.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
