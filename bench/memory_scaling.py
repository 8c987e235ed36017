"""Memory and time vs sequence length (batch 1) for training and for prefill: ours against its peers.

Target: the Mamba2 layers' prefill and training memory grows linearly with the sequence length.
For each model of --models (bench/peers.py; default ours, attention, hf_bamba), bf16 weights on the
device (float32 on CPU), its fastest path, and each mode:
  prefill  torch.no_grad forward of the sequence that builds the decoding cache: ours
           `model.prefill(ids)`, HF `model(ids, use_cache=True)` (both compute every position's logits)
  train    one forward + backward of bench.peers.train_loss, no optimizer, activation checkpointing
           off; --act-ckpt adds a series with it on for ours and attention. Gradients are allocated
           before the series (backward accumulates into them), so the baseline holds weights + grads.
Sequence lengths (--seq-lens) grow until a (model, mode) series runs out of memory, which ends it.
Each measurement: one untimed call (Triton autotuning, allocator warm-up at the new shape), then the
peak statistics are reset and --iters timed calls run.
  peak_mem_gb    peak allocated device memory over the timed calls, 1e9 bytes (GPU only)
  activation_gb  that peak minus the memory allocated just before the calls: activations, decoding
                 cache, logits and workspaces
  growth         activation_gb / activation_gb of the previous length in the same series
                 (2.0 = linear when the lengths double)
  step_s         median seconds per call; tokens_per_s = seq_len / step_s
Every row is printed and the results rewritten as soon as it is measured.

Writes <out>/<name>.{json,md,png}; --name defaults to memory_scaling_<preset>[_smoke].

    python bench/memory_scaling.py --preset 1.3b --act-ckpt           # H100: 2K ... 32K
    python bench/memory_scaling.py --smoke                            # tiny preset, 64/128/256 tokens
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from bench import peers  # noqa: E402
from bench.common import RESULTS, environment, median, pyplot, save_figure, sync, time_fn, write_results  # noqa: E402
from model import HybridLM, ModelConfig  # noqa: E402
from train.activation_checkpointing import apply_activation_checkpointing, remove_activation_checkpointing  # noqa: E402

NAME = "memory_scaling"
COLUMNS = ["model", "mode", "act_ckpt", "seq_len", "impl", "peak_mem_gb", "activation_gb", "growth", "step_s",
           "tokens_per_s", "status"]
MODES = ("prefill", "train")


def series(name: str, act_ckpt: bool) -> list[tuple[str, bool]]:
    """(mode, activation checkpointing) of one model in run order: prefill (weights only), training
    (weights + grads), then training with checkpointing where asked for and possible."""
    return [("prefill", False), ("train", False)] + ([("train", True)] if act_ckpt and name in peers.OURS else [])


def prefill_call(name: str, model: nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    """No-grad forward of ids (1, l) that builds the decoding cache."""
    @torch.no_grad()
    def call() -> object:
        if name in peers.OURS:
            return model.prefill(ids)
        return model(input_ids=ids, use_cache=True)

    return call


def train_call(name: str, model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """Forward + backward of ids (1, l+1); gradients accumulate into the preallocated .grad."""
    def call() -> None:
        peers.train_loss(name, model, ids).backward()

    return call


def measure(name: str, model: nn.Module, mode: str, seq: int, vocab: int, iters: int, device: torch.device) -> dict:
    """One row: untimed call, then peak memory and median time of `iters` calls on random ids < vocab."""
    ids = torch.randint(0, vocab, (1, seq + (mode == "train")), device=device)
    call = (train_call if mode == "train" else prefill_call)(name, model, ids)
    call()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    step_s = median(time_fn(call, device, warmup=0, iters=iters))
    row = {"step_s": step_s, "tokens_per_s": seq / step_s}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        row |= {"peak_mem_gb": peak / 1e9, "activation_gb": (peak - before) / 1e9}
    return row


def prepare(model: nn.Module, mode: str, act_ckpt: bool) -> None:
    """Mode switches: eval for prefill; train mode, checkpointing flag and allocated gradients for training."""
    model.train(mode == "train")
    if isinstance(model, HybridLM):  # the peers' own checkpointing is not measured
        remove_activation_checkpointing(model)
        apply_activation_checkpointing(model, "full" if act_ckpt else "none")
    for p in model.parameters():
        if mode == "train" and p.grad is None:
            p.grad = torch.zeros_like(p)


def add_growth(rows: list[dict]) -> None:
    """growth on every row whose series has an earlier measured activation_gb."""
    last: dict[tuple, float] = {}
    for r in rows:
        key = (r["model"], r["mode"], r["act_ckpt"])
        act = r.get("activation_gb")
        if act and last.get(key):
            r["growth"] = act / last[key]
        if act:
            last[key] = act


def plot(rows: list[dict], path: Path, title: str) -> None:
    """2 x 2 panels: (prefill, train) x (activation memory, seconds per call) vs sequence length, log-log."""
    plt = pyplot()

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for col, mode in enumerate(MODES):
        mine = [r for r in rows if r["mode"] == mode and r["status"] == "ok"]
        for key in dict.fromkeys((r["model"], r["act_ckpt"]) for r in mine):
            pts = [r for r in mine if (r["model"], r["act_ckpt"]) == key]
            label = key[0] + (" +ckpt" if key[1] else "")
            for ax, field in ((axes[0, col], "activation_gb"), (axes[1, col], "step_s")):
                xy = [(r["seq_len"], r[field]) for r in pts if r.get(field)]
                if xy:
                    ax.plot(*zip(*xy), marker="o", label=label)
        axes[0, col].set_title(f"{mode}: memory above the weights" + (" + grads" if mode == "train" else ""))
        axes[0, col].set_ylabel("activation memory (GB; GPU only)")
        axes[1, col].set_ylabel("seconds per call")
        axes[1, col].set_xlabel("sequence length (tokens)")
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title + " (log-log: slope 1 = linear)", fontsize=10)
    save_figure(fig, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--seq-lens", default="2048,4096,8192,16384,32768", help="comma-separated, increasing")
    ap.add_argument("--models", type=peers.model_list, default="ours,attention,hf_bamba", help=f"comma-separated, of {', '.join(peers.PEERS)}")
    ap.add_argument("--act-ckpt", action="store_true",
                    help="add training rows with activation checkpointing (ours, attention)")
    ap.add_argument("--iters", type=int, default=2, help="timed calls per row")
    ap.add_argument("--smoke", action="store_true", help="tiny preset, sequences 64/128/256, with --act-ckpt")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument("--name", help="results file name (default memory_scaling_<preset>[_smoke])")
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset, args.seq_lens, args.iters, args.act_ckpt = "tiny", "64,128,256", 1, True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    seqs = sorted(int(s) for s in args.seq_lens.split(","))
    cfg = peers.fit_length(ModelConfig(preset=args.preset), max(seqs) + 1)
    meta = environment(device) | {"preset": args.preset, "pattern": cfg.layer_pattern, "batch": 1,
                                  "dtype": str(dtype).removeprefix("torch."), "iters": args.iters}
    name = args.name or f"{NAME}_{args.preset}{'_smoke' if args.smoke else ''}"
    title = f"memory and time vs length, {args.preset}, batch 1: {meta['device']}"
    rows: list[dict] = []

    def record(row: dict) -> None:  # the tables after every row; the plot (slow to draw) after every model
        rows.append(row)
        add_growth(rows)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        write_results(name, rows, meta, COLUMNS, args.out, title=title)

    models = args.models
    with peers.startup_objects_frozen():  # each row's memory release collects only what the rows built
        for model_name in models:
            peers.release_memory(device)  # the previous model, or a failed build's leftovers
            try:
                model = peers.build(model_name, cfg, device, dtype)
            except Exception as exc:  # noqa: BLE001 - this model's rows fail, the others run
                record({"model": model_name, "mode": "build", "act_ckpt": False, "status": peers.failure(exc)})
                plot(rows, args.out / f"{name}.png", title)
                continue
            for mode, ckpt in series(model_name, args.act_ckpt):
                prepare(model, mode, ckpt)
                for seq in seqs:
                    row = {"model": model_name, "mode": mode, "act_ckpt": ckpt, "seq_len": seq,
                           "impl": peers.impl(model_name, model)}
                    row |= peers.run_guarded(
                        lambda: measure(model_name, model, mode, seq, cfg.vocab_size, args.iters, device), device)
                    record(row)
                    if row["status"] == "OOM":
                        break
            plot(rows, args.out / f"{name}.png", title)
            del model
    print(f"wrote {args.out / name}.json/.md/.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
