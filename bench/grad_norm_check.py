"""Does the DeepSpeed step see the right gradients? The engine's global gradient norm after one
optimizer step over different micro-batches, for ds_configs/zero1.json and zero2.json (bf16 engines,
as training runs them), eager and with the training graphs, each with overlap_comm on and off,
against the norm of a float32 torch reference (the same model, weights and micro-batches, gradients of
the mean loss accumulated by autograd, no engine).

A graphed row equal to its eager row and to the reference says the graphs hand every micro-batch's
gradients to the engine under that setting; train.cuda_graph refuses the settings that failed here
(ZeRO-1 without bf16.immediate_grad_update: DeepSpeed's BF16_Optimizer then lets autograd add each
replay's gradient into `.grad`, which is the graph's own gradient buffer, so the sum doubles instead
of accumulating). On CPU the graphs are their eager stand-in (train.graph_step.EagerReplayGraphs).

    python bench/grad_norm_check.py --preset small      # CUDA (kernel path)
    python bench/grad_norm_check.py --smoke             # CPU: tiny preset
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from bench import peers  # noqa: E402
from bench.common import RESULTS, environment, write_results  # noqa: E402
from bench.step_overhead import install_graphs  # noqa: E402
from bench.train_step_throughput import ZERO_JSONS, build_engine, ds_config  # noqa: E402
from config.base import deep_merge  # noqa: E402
from model import ModelConfig  # noqa: E402
from train.grad_fold import DEFAULT_FOLD, FOLDS  # noqa: E402

COLUMNS = ["stage", "graphed", "overlap_comm", "grad_norm", "reference_norm", "rel_diff", "status"]


def reference_norm(cfg: ModelConfig, batches: list[torch.Tensor], device: torch.device) -> float:
    """||mean over micro-batches of the loss gradient||, float32 model, no engine."""
    torch.manual_seed(0)
    model = peers.build("ours", cfg, device, torch.float32)
    for ids in batches:
        (peers.train_loss("ours", model, ids) / len(batches)).backward()
    return float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters())))


def engine_norm(cfg: ModelConfig, batches: list[torch.Tensor], stage: int, graphed: bool, overlap: bool,
                device: torch.device, fold: str) -> float:
    """The engine's global gradient norm after one optimizer step over `batches` (same initial weights)."""
    micro_batch, seq = batches[0].shape[0], batches[0].shape[1] - 1
    config = deep_merge(ds_config(seq, micro_batch, len(batches), device.type == "cuda", ZERO_JSONS[stage]),
                        {"zero_optimization": {"overlap_comm": overlap}, "bf16": {"enabled": True}})
    torch.manual_seed(0)
    model, engine = build_engine("ours", cfg, device, config, fold)
    try:
        if graphed:
            install_graphs(model, batches[0])
        for ids in batches:
            engine.backward(engine(ids))
            engine.step()
        return float(engine.get_global_grad_norm())
    finally:
        engine.destroy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--fold", default=DEFAULT_FOLD, choices=FOLDS, help="ZeRO-1's gradient fold (train/grad_fold.py)")
    ap.add_argument("--smoke", action="store_true", help="tiny preset, 32 tokens, CPU")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset, args.seq_len = "tiny", 32
    from train.distributed import init_distributed

    device = init_distributed().device
    cfg = peers.fit_length(ModelConfig(preset=args.preset), args.seq_len)
    batches = [torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq_len + 1),
                             generator=torch.Generator().manual_seed(i)).to(device) for i in range(args.grad_accum)]
    ref = reference_norm(cfg, batches, device)
    meta = environment(device) | {"preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                                  "grad_accum": args.grad_accum, "reference": "float32 torch, no engine",
                                  "grad_fold": args.fold}
    name = args.name or f"grad_norm_check_{args.preset}" + ("_smoke" if args.smoke else "")
    rows = []
    with peers.startup_objects_frozen():  # the collections (ours, DeepSpeed's) walk only the rows' objects
        for stage in (1, 2):
            for graphed in (False, True):
                for overlap in (True, False):
                    row = {"stage": stage, "graphed": graphed, "overlap_comm": overlap, "reference_norm": ref}
                    got = peers.run_guarded(lambda: {"grad_norm": engine_norm(cfg, batches, stage, graphed, overlap,
                                                                               device, args.fold)}, device)
                    row |= got
                    if "grad_norm" in got:
                        row["rel_diff"] = abs(got["grad_norm"] - ref) / ref
                    rows.append(row)
                    print(row, flush=True)
                    write_results(name, rows, meta, COLUMNS, args.out, title=f"Engine gradient norm vs a float32 "
                                  f"reference ({args.preset}): {meta['device']}")
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
