"""Training throughput, MFU and peak memory: forward + backward + optimizer step, DeepSpeed ZeRO-2 on one GPU
(or the ZeRO config of --ds-config).

For each sequence length, each model of bench/peers.py (ours, attention, hf_bamba, hf_llama) gets its
own DeepSpeed engine with the training run's DeepSpeed config (train.ds_config.build_ds_config over
ds_configs/zero2.json: ZeRO-2, bf16 weights with fp32 master copies and fp32 gradient accumulation,
clipping 1.0, AdamW lr 1e-4 = FusedAdam on GPU, torch AdamW on CPU) and train.optim.param_groups.
Models are built in float32 on the device and cast by DeepSpeed, as launch/pretrain.py does.

One optimizer step = --grad-accum micro-batches of (--micro-batch-tokens // seq) random sequences; the
loss is bench.peers.train_loss (float32 cross-entropy over the same b*l predicted tokens for every
model). --warmup-steps untimed steps come first; the first of them (Triton autotuning, compilation)
is reported apart as first_step_s. Then --steps timed steps: step_s is their median.
  tokens_per_s   micro_batch * seq * grad_accum / step_s
  mfu            tokens_per_s * model.sizing.train_flops_per_token(peers.flops_config(model, cfg), seq)
                 / the bf16 GEMM rate measured at start (bench.common.matmul_peak_tflops)
  peak_mem_gb    peak allocated device memory over the timed steps (weights, gradients, optimizer
                 states and activations), 1e9 bytes
  ours_over_peer ours' tokens/s over this model's at the same sequence length
With --cuda-graph, `ours` and `attention` get a second row each (`ours_graph`, `attention_graph`) whose
forward and backward replay CUDA graphs (train/graph_step.py, what train.cuda_graph does), and the
column ours_graph_over_peer compares `ours_graph` with every other row.
Every row is printed and the results rewritten as soon as it is measured; an out-of-memory or other
failure becomes the row's status and the run goes on.

Writes <out>/<name>.{json,md,png}; --name defaults to train_step_throughput_<preset>[_smoke].

    python bench/train_step_throughput.py --preset 1.3b                 # H100: 2K/4K/8K, 8192 tokens/micro-batch
    python bench/train_step_throughput.py --preset small --micro-batch-tokens 16384
    python bench/train_step_throughput.py --preset 1.3b --seq-lens 4096,8192 --cuda-graph
    python bench/train_step_throughput.py --smoke                       # tiny preset, tiny sizes (CPU without GPU)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

from bench import peers  # noqa: E402
from bench.block_costs import mamba_ssm_cb_grad  # noqa: E402
from bench.common import (  # noqa: E402
    RESULTS, environment, matmul_peak_tflops, median, pyplot, save_figure, sync, time_fn, write_results,
)
from model import ModelConfig, count_params, train_flops_per_token  # noqa: E402
from train.graph_step import graph_training_forward  # noqa: E402
from train.grad_fold import DEFAULT_FOLD, FOLDS, install_fold  # noqa: E402

NAME = "train_step_throughput"
COLUMNS = ["model", "impl", "params_m", "seq_len", "micro_batch", "grad_accum", "tokens_per_s", "mfu",
           "peak_mem_gb", "step_s", "first_step_s", "ours_over_peer", "ours_graph_over_peer", "status"]
GRAPHED = "_graph"  # row-name suffix of a CUDA-graph variant
LR, WEIGHT_DECAY = 1e-4, 0.1
DS_CONFIG = "ds_configs/zero2.json"  # what issue 7's suite measures (--ds-config for another)
ZERO_JSONS = {1: "ds_configs/zero1.json", 2: "ds_configs/zero2.json"}  # the shipped JSON of each stage


class LossModule(nn.Module):
    """What the engine runs: ids (b, l+1) -> peers.train_loss of the wrapped model."""

    def __init__(self, name: str, model: nn.Module) -> None:
        super().__init__()
        self.name, self.model = name, model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return peers.train_loss(self.name, self.model, ids)


def ds_config(seq: int, micro_batch: int, grad_accum: int, on_cuda: bool, base: str = DS_CONFIG) -> dict:
    """The DeepSpeed config launch/pretrain.py would build over `base` for this batch shape on one rank."""
    from config.sections import TrainConfig
    from train.ds_config import build_ds_config

    train = TrainConfig(seq_len=seq, micro_batch_size=micro_batch, global_batch_tokens=seq * micro_batch * grad_accum,
                        lr=LR, weight_decay=WEIGHT_DECAY, precision="bf16" if on_cuda else "fp32", ds_config=base)
    return build_ds_config(train, world_size=1, on_cuda=on_cuda)


def build_engine(name: str, cfg: ModelConfig, device: torch.device, config: dict,
                 fold: str = DEFAULT_FOLD) -> tuple[nn.Module, "DeepSpeedEngine"]:
    """(model, engine): the peer `name` built in float32 (DeepSpeed casts it to the config's precision)
    under a DeepSpeed engine with `config` and train.optim's parameter groups; with ZeRO-1's bf16 fold
    in the gradient hooks replaced by train.grad_fold's `fold`, as training does by default."""
    import deepspeed

    from train.optim import param_groups

    model = peers.build(name, cfg, device, torch.float32)
    engine, *_ = deepspeed.initialize(model=LossModule(name, model), model_parameters=param_groups(model, WEIGHT_DECAY),
                                      config=config)
    install_fold(engine, fold)
    return model, engine


def measure(name: str, cfg: ModelConfig, seq: int, micro_batch: int, graph: bool, args: argparse.Namespace,
            device: torch.device, peak_tflops: float) -> dict:
    """One (model, seq) row: build the engine, warm up, time optimizer steps, destroy the engine."""
    model, engine = build_engine(name, cfg, device, ds_config(seq, micro_batch, args.grad_accum,
                                                              device.type == "cuda", args.ds_config), args.fold)
    try:
        ids = torch.randint(0, cfg.vocab_size, (micro_batch, seq + 1), device=engine.device)
        if graph:  # after deepspeed.initialize: the graphs must see the parameters' final storage
            graph_training_forward(model, ids[:, :-1])

        def step() -> None:
            for _ in range(args.grad_accum):
                engine.backward(engine(ids))
                engine.step()

        t0 = time.perf_counter()
        step()
        sync(device)
        first = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step_s = median(time_fn(step, device, warmup=max(args.warmup_steps, 1) - 1, iters=args.steps))
        tokens_per_s = micro_batch * seq * args.grad_accum / step_s
        flops = train_flops_per_token(peers.flops_config(name, cfg), seq)
        row = {"impl": peers.impl(name, model), "tokens_per_s": tokens_per_s, "step_s": step_s,
               "first_step_s": first, "flops_per_token": flops, "mfu": tokens_per_s * flops / (peak_tflops * 1e12)}
        if device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        return row
    finally:
        engine.destroy()


def add_ratios(rows: list[dict]) -> None:
    """ours_over_peer (ours_graph_over_peer) on every other measured row whose sequence length has a
    measured `ours` (`ours_graph`) row."""
    for ref in ("ours", "ours" + GRAPHED):
        ours = {r["seq_len"]: r["tokens_per_s"] for r in rows if r["model"] == ref and r["status"] == "ok"}
        for r in rows:
            if r["model"] != ref and r["status"] == "ok" and r["seq_len"] in ours:
                r[f"{ref}_over_peer"] = ours[r["seq_len"]] / r["tokens_per_s"]


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Grouped bars: tokens/s per sequence length, one bar per model, MFU written on each bar."""
    plt = pyplot()

    seqs = sorted({r["seq_len"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(seqs), 4))
    for k, name in enumerate(models):
        ok = {r["seq_len"]: r for r in rows if r["model"] == name and r["status"] == "ok"}
        xs = [i + (k - (len(models) - 1) / 2) * width for i, s in enumerate(seqs) if s in ok]
        heights = [ok[s]["tokens_per_s"] for s in seqs if s in ok]
        bars = ax.bar(xs, heights, width, label=name)
        ax.bar_label(bars, labels=[f"{ok[s]['mfu']:.0%}" for s in seqs if s in ok], fontsize=7)
    ax.set_xticks(range(len(seqs)), [str(s) for s in seqs])
    ax.set_xlabel("sequence length (tokens); bar labels: MFU")
    ax.set_ylabel("training tokens/s")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--seq-lens", default="2048,4096,8192", help="comma-separated sequence lengths")
    ap.add_argument("--micro-batch-tokens", type=int, default=8192, help="micro-batch = this // seq (at least 1)")
    ap.add_argument("--grad-accum", type=int, default=8, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    ap.add_argument("--warmup-steps", type=int, default=1, help="untimed steps before (at least 1: the first)")
    ap.add_argument("--models", type=peers.model_list, default=",".join(peers.PEERS), help=f"comma-separated, of {', '.join(peers.PEERS)}")
    ap.add_argument("--cuda-graph", action="store_true", help="add CUDA-graph rows of ours and attention (CUDA only)")
    ap.add_argument("--graph-only", action="store_true", help="with --cuda-graph: only the graphed rows of ours and attention")
    ap.add_argument("--ds-config", default=DS_CONFIG, help="the DeepSpeed JSON every engine is built over")
    ap.add_argument("--fold", default=DEFAULT_FOLD, choices=FOLDS, help="ZeRO-1's gradient fold (train/grad_fold.py)")
    ap.add_argument("--ssd-cb-grad", default="ours", choices=("ours", "mamba_ssm"),
                    help="the Mamba2 backward's C.B and decay gradients: model/ssd_cb_grad.py's kernel, or "
                         "mamba_ssm's two (bench/block_costs.py's A/B variant)")
    ap.add_argument("--smoke", action="store_true", help="tiny preset, sequences 32/64, 64 tokens x 2, 1 step")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument("--name", help="results file name (default train_step_throughput_<preset>[_smoke])")
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset, args.seq_lens, args.micro_batch_tokens, args.grad_accum, args.steps = "tiny", "32,64", 64, 2, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from train.distributed import init_distributed
    from train.ds_config import read_ds_json, zero_stage

    device = init_distributed().device  # a world of one: NCCL on GPU, gloo on CPU
    torch.manual_seed(0)
    seqs = [int(s) for s in args.seq_lens.split(",")]
    cfg = peers.fit_length(ModelConfig(preset=args.preset), max(seqs))
    peak = matmul_peak_tflops(device, n=1024 if args.smoke else 8192)
    meta = environment(device) | {"matmul_peak_tflops": peak, "preset": args.preset, "pattern": cfg.layer_pattern,
                                  "grad_accum": args.grad_accum, "micro_batch_tokens": args.micro_batch_tokens,
                                  "steps": args.steps, "warmup_steps": args.warmup_steps, "lr": LR}
    name = args.name or f"{NAME}_{args.preset}{'_smoke' if args.smoke else ''}"
    stage = zero_stage(read_ds_json(args.ds_config))
    meta["ds_config"] = args.ds_config
    meta["grad_fold"] = args.fold
    meta["ssd_cb_grad"] = args.ssd_cb_grad
    title = f"train step (ZeRO-{stage}, 1 device), {args.preset}: {meta['device']}"
    print(f"matmul peak {peak:.1f} TFLOP/s on {meta['device']}", flush=True)
    rows: list[dict] = []
    with (mamba_ssm_cb_grad() if args.ssd_cb_grad == "mamba_ssm" else contextlib.nullcontext(),
          peers.startup_objects_frozen()):  # each row's memory release collects only what the rows built
        for seq in seqs:
            micro_batch = max(1, args.micro_batch_tokens // seq)
            variants = [(m, False) for m in args.models if not (args.graph_only and m in peers.OURS)]
            if args.cuda_graph:
                variants += [(m, True) for m in args.models if m in peers.OURS]
            for model, graph in variants:
                row = {"model": model + (GRAPHED if graph else ""), "seq_len": seq, "micro_batch": micro_batch,
                       "params_m": count_params(peers.flops_config(model, cfg)) / 1e6, "grad_accum": args.grad_accum}
                row |= peers.run_guarded(lambda: measure(model, cfg, seq, micro_batch, graph, args, device, peak),
                                         device)
                rows.append(row)
                add_ratios(rows)
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
                write_results(name, rows, meta, COLUMNS, args.out, title=title)
            plot(rows, args.out / f"{name}.png", title)  # slow to draw: once per length, the tables every row
    print(f"wrote {args.out / name}.json/.md/.png", flush=True)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
