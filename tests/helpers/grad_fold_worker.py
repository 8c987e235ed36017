"""One process of tests/train/test_grad_fold.py: `python tests/helpers/grad_fold_worker.py` (repo as cwd and on
PYTHONPATH). A world of one (gloo): bf16 ZeRO-1 engines from ds_configs/zero1.json on the same weights, one per
fold (deepspeed, copy_free, fused_wgrad, and copy_free without the boundary all-reduce that a world of one
does not need: train/reduction.py), 2 optimizer steps of 3 micro-batches of different data. The model: two
bias-free model.wgrad.Linear layers (main_grad takers) and a LayerNorm (its parameters fold in the hooks).
Prints one JSON line: the folds' float32 sums, gradient norms and master weights compared with DeepSpeed's.
"""

from __future__ import annotations

import json

import deepspeed
import torch
import torch.nn as nn

from config.base import deep_merge
from model.wgrad import Linear
from train.distributed import init_distributed
from train.ds_config import read_ds_json
from train.grad_fold import install_fold
from train.reduction import skip_lone_reduction


def model() -> nn.Sequential:
    """The same weights every call (seed 1): Linear 16 -> 64, GELU, LayerNorm, Linear 64 -> 16."""
    torch.manual_seed(1)
    return nn.Sequential(Linear(16, 64, bias=False), nn.GELU(), nn.LayerNorm(64), Linear(64, 16, bias=False))


def run(fold: str, config: dict, batches: list[torch.Tensor], alone: bool = False) -> dict:
    """Train the model under `fold` (`alone`: without the boundary all-reduce): the fold installed, each
    step's float32 sums and gradient norm, the final float32 master weights, how many matrices/vectors
    reached the hook with a gradient, how many boundary all-reduces ran."""
    net = model()
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config)
    installed = install_fold(engine, fold)
    skipped = skip_lone_reduction(engine) if alone else False
    reduces = []
    allreduce = engine.allreduce_gradients
    engine.allreduce_gradients = lambda *a, **k: (reduces.append(1), allreduce(*a, **k))[1]
    opt, hooked = engine.optimizer, []
    hook = opt.accumulate_hp_grads_and_remove_lp

    def count_and_fold(lp: torch.Tensor, i: int, j: int) -> None:
        # the hook runs for every parameter; a bound weight brings no gradient
        if lp.grad is not None:
            hooked.append(lp.dim())
        hook(lp, i, j)

    opt.accumulate_hp_grads_and_remove_lp = count_and_fold
    sums, norms = [], []
    for x in batches:
        engine.backward(engine(x.bfloat16()).float().pow(2).mean())
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary:
            sums.append(torch.cat([g.clone() for g in opt.fp32_groups_gradients_flat]))
        engine.step()
        if boundary:
            norms.append(float(engine.get_global_grad_norm()))
    weights = torch.cat([w.detach().clone() for w in opt.fp32_groups_flat_partition])  # float32 masters
    marked = all(all(flags) for flags in opt.fp32_groups_has_gradients)
    engine.destroy()
    return {"installed": installed, "sums": sums, "norms": norms, "weights": weights,
            "hooked_matrices": sum(d == 2 for d in hooked), "hooked_vectors": sum(d == 1 for d in hooked),
            "marked": marked, "skipped": skipped, "reduces": len(reduces)}


def main() -> None:
    init_distributed()
    config = deep_merge(read_ds_json("ds_configs/zero1.json"), {
        "bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3,
        "gradient_clipping": 1e9,
        # torch's AdamW, as train.ds_config gives a CPU-only run: DeepSpeed's FusedAdam would JIT-compile an op first
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})
    torch.manual_seed(0)
    batches = [torch.randn(2, 16) * (i + 1) for i in range(6)]
    ds, free, fused = (run(f, config, batches) for f in ("deepspeed", "copy_free", "fused_wgrad"))
    alone = run("copy_free", config, batches, alone=True)
    start = torch.cat([p.detach().bfloat16().float().flatten() for p in model().parameters()])

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    print(json.dumps({
        "installed": [ds["installed"], free["installed"], fused["installed"]],
        "copy_free_sums_equal": all(torch.equal(a, b) for a, b in zip(free["sums"], ds["sums"])),
        "copy_free_weights_equal": torch.equal(free["weights"], ds["weights"]),
        "sums_nonzero": all(bool(s.abs().sum() > 0) for s in ds["sums"]),
        "fused_sums_rel": max(rel(a, b) for a, b in zip(fused["sums"], ds["sums"])),
        "fused_norms_rel": max(abs(a - b) / b for a, b in zip(fused["norms"], ds["norms"])),
        "fused_weights_median": float((fused["weights"] - ds["weights"]).abs().median()),
        "moved_median": float((ds["weights"] - start).abs().median()),
        "hooked": {k: [r[k] for r in (ds, free, fused)] for k in ("hooked_matrices", "hooked_vectors")},
        "fused_marked": fused["marked"],
        "reduces": [ds["reduces"], alone["reduces"]],
        "alone_skipped": alone["skipped"],
        # DeepSpeed's reduce casts the float32 sums to its bf16 communication dtype and back, even alone
        "alone_sums_rounded_equal": all(torch.equal(a.bfloat16().float(), b)
                                        for a, b in zip(alone["sums"], free["sums"])),
        "alone_sums_unrounded": any(not torch.equal(a.bfloat16().float(), a) for a in alone["sums"]),
        "alone_weights_median": float((alone["weights"] - free["weights"]).abs().median()),
    }))


if __name__ == "__main__":
    main()
