"""Forward+backward throughput of a preset on the kernel path, activation checkpointing off and on.

bf16 weights and activations, loss = model.loss (fused-free cross-entropy in float32), no optimizer:
the model's own ceiling. MFU = model FLOPs per token (model.sizing.train_flops_per_token) x tokens/s
over the bf16 GEMM rate measured in the same run. The first steps at a new shape spend time in Triton
autotuning and compilation: they are timed apart (`warmup_s`) from the steady state.

With --cuda-graph every shape is measured twice, eagerly and with the forward and backward replayed
as CUDA graphs (train/graph_step.py); the graphed row also reports how far its loss and gradients
are from the eager step's on the same batch (`graph_loss_rel_err`, `graph_grad_rel_err`: relative
error of the loss and of all gradients concatenated).

    python bench/fwd_bwd_throughput.py --preset 1.3b --seq-len 4096 --batches 1,2,4
    python bench/fwd_bwd_throughput.py --preset 1.3b --seq-len 4096 --batches 1,2 --cuda-graph --act-ckpt off
    python bench/fwd_bwd_throughput.py --smoke        # CPU plumbing check on the tiny preset
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from bench.common import (  # noqa: E402
    bench_model,
    environment,
    matmul_peak_tflops,
    median,
    rel_err,
    sync,
    time_fn,
    write_results,
)
from bench.peers import attention_twin  # noqa: E402
from model import ModelConfig, train_flops_per_token  # noqa: E402
from train.activation_checkpointing import apply_activation_checkpointing  # noqa: E402
from train.graph_step import graph_training_forward  # noqa: E402


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One forward+backward: (loss, all gradients flattened into one float32 vector); grads cleared."""
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    for p in model.parameters():
        p.grad = None
    return float(loss.detach()), grads


def measure(cfg: ModelConfig, batch: int, seq: int, ckpt: bool, graph: bool, device: torch.device,
            iters: int) -> dict:
    model = bench_model(cfg, device)
    apply_activation_checkpointing(model, "full" if ckpt else "none")
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    row = {"preset": cfg.preset or "all-attention twin", "batch": batch, "seq_len": seq, "act_ckpt": ckpt,
           "cuda_graph": graph, "impl": model.impl}

    def step() -> None:
        loss_and_grads(model, ids)

    t0 = time.perf_counter()
    if graph:
        eager_loss, eager_grads = loss_and_grads(model, ids)
        graph_training_forward(model, ids[:, :-1])
        graphed_loss, graphed_grads = loss_and_grads(model, ids)
        row["graph_loss_rel_err"] = abs(graphed_loss - eager_loss) / abs(eager_loss)
        row["graph_grad_rel_err"] = rel_err(graphed_grads, eager_grads)
        del eager_grads, graphed_grads
    else:
        step()
    sync(device)
    warm = time.perf_counter() - t0
    if device.type == "cuda":  # the peak of the steady steps (not of the eager-vs-graph check above)
        torch.cuda.reset_peak_memory_stats(device)
    times = time_fn(step, device, warmup=2, iters=iters)
    t = median(times)
    row |= {"step_ms": 1e3 * t, "tokens_per_s": batch * seq / t, "first_step_s": warm,
            "flops_per_token": train_flops_per_token(cfg, seq)}
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    row |= block_statistics(model)
    del model
    return row


def block_statistics(model: torch.nn.Module) -> dict[str, float]:
    """The last step's block statistics (model.block_statistics: router fractions, gate means), each name's
    mean over the layers that report it; empty for patterns of M and A alone."""
    by_name: dict[str, list[float]] = {}
    for key, value in model.block_statistics().items():
        by_name.setdefault(key.rsplit(".", 1)[-1], []).append(value)
    return {name: sum(vs) / len(vs) for name, vs in by_name.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--pattern", default=None, help="override the layer pattern (e.g. all A)")
    ap.add_argument("--twin", action="store_true",
                    help="the preset's all-attention twin (bench/peers.attention_twin: same size, wider MLPs)")
    ap.add_argument("--act-ckpt", choices=("off", "on", "both"), default="both", help="activation checkpointing")
    ap.add_argument("--cuda-graph", action="store_true", help="also measure each shape with CUDA-graph replay")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--name", default="fwd_bwd_throughput")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    preset, seq, batches = ("tiny", 64, [1]) if args.smoke else (args.preset, args.seq_len,
                                                                   [int(b) for b in args.batches.split(",")])
    overrides = {"pattern": args.pattern, "n_layers": len(args.pattern)} if args.pattern else {}
    cfg = ModelConfig(preset=preset, **overrides)
    if args.twin:
        cfg = attention_twin(cfg)
    peak = matmul_peak_tflops(device, n=1024 if args.smoke else 8192)
    rows = []
    ckpts = {"off": (False,), "on": (True,), "both": (False, True)}[args.act_ckpt]
    graphs = (False, True) if args.cuda_graph else (False,)
    meta = environment(device) | {"matmul_peak_tflops": peak, "pattern": cfg.layer_pattern}
    rows = []
    for ckpt in ckpts:
        for b in batches:
            for graph in graphs:
                try:
                    row = measure(cfg, b, seq, ckpt, graph, device, 2 if args.smoke else args.iters)
                    row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / (peak * 1e12)
                except Exception as exc:  # OOM or a failed capture: the row says so, the run goes on
                    status = "OOM" if isinstance(exc, torch.OutOfMemoryError) else f"{type(exc).__name__}: {exc}"[:200]
                    row = {"preset": preset, "batch": b, "seq_len": seq, "act_ckpt": ckpt, "cuda_graph": graph,
                           "impl": status}
                rows.append(row)
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
                write_results(args.name + ("_smoke" if args.smoke else ""), rows, meta,
                              ["preset", "batch", "seq_len", "act_ckpt", "cuda_graph", "impl", "tokens_per_s", "mfu",
                               "step_ms", "peak_mem_gb", "first_step_s", "graph_loss_rel_err", "graph_grad_rel_err"],
                              args.out, title=f"Forward+backward throughput ({preset}, bf16, no optimizer)")
                if device.type == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
