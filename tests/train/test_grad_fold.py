"""train.grad_fold: ZeRO-1's gradient folds against DeepSpeed's own.

copy_free must give DeepSpeed's float32 sums and updated weights bitwise. fused_wgrad (the linear
layers add their weight gradients into the float32 buffers themselves, model/wgrad.py) skips the bf16
rounding of those gradients, so it is compared with a tolerance: 1e-2 relative on the sums and the
gradient norm (DeepSpeed's path rounds each gradient to bf16, ~4e-3 per element); after two AdamW
steps the float32 master weights differ from DeepSpeed's by less than 1% of how far they moved (median
over weights: AdamW's update of a weight whose gradient is near zero can differ in sign, so no maximum).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import repo_first_pythonpath

REPO = Path(__file__).resolve().parents[2]

# One process, a world of one (gloo): bf16 ZeRO-1 engines from ds_configs/zero1.json on the same
# weights, one per fold, 2 optimizer steps of 3 micro-batches of different data. The model: two
# bias-free model.wgrad.Linear layers (main_grad takers) and a LayerNorm (its parameters fold in the hooks).
WORKER = textwrap.dedent("""
    import json, sys, torch, torch.nn as nn
    from train.distributed import init_distributed
    from train.ds_config import read_ds_json
    from train.grad_fold import install_fold
    from config.base import deep_merge
    from model.wgrad import Linear
    import deepspeed

    init_distributed()
    config = deep_merge(read_ds_json("ds_configs/zero1.json"), {
        "bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3,
        "gradient_clipping": 1e9, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    torch.manual_seed(0)
    batches = [torch.randn(2, 16) * (i + 1) for i in range(6)]

    def run(fold):
        torch.manual_seed(1)
        model = nn.Sequential(Linear(16, 64, bias=False), nn.GELU(), nn.LayerNorm(64), Linear(64, 16, bias=False))
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        installed = install_fold(engine, fold)
        opt, hooked = engine.optimizer, []
        hook = opt.accumulate_hp_grads_and_remove_lp
        def count_and_fold(lp, i, j):  # the hook runs for every parameter; a bound weight brings no gradient
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
                "marked": marked}

    ds, free, fused = run("deepspeed"), run("copy_free"), run("fused_wgrad")
    torch.manual_seed(1)
    start = torch.cat([p.detach().bfloat16().float().flatten() for p in nn.Sequential(
        Linear(16, 64, bias=False), nn.GELU(), nn.LayerNorm(64), Linear(64, 16, bias=False)).parameters()])
    rel = lambda a, b: float((a - b).norm() / b.norm())
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
    }))
""")


@pytest.mark.slow
def test_folds_against_deepspeeds() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", WORKER], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env | {"PYTHONPATH": repo_first_pythonpath(), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["installed"] == ["deepspeed", "copy_free", "fused_wgrad"], r
    assert r["copy_free_sums_equal"] and r["copy_free_weights_equal"] and r["sums_nonzero"], r
    # 6 micro-batches: 2 matrices + 2 LayerNorm vectors each folded in the hooks, except fused_wgrad's matrices
    assert r["hooked"] == {"hooked_matrices": [12, 12, 0], "hooked_vectors": [12, 12, 12]}, r
    assert r["fused_marked"], r
    assert r["fused_sums_rel"] < 1e-2 and r["fused_norms_rel"] < 1e-2, r
    assert r["fused_weights_median"] < 1e-2 * r["moved_median"], r


def test_the_config_offers_every_fold_and_the_same_default() -> None:
    import typing

    from config.sections import TrainConfig
    from train.grad_fold import DEFAULT_FOLD, FOLDS

    field = TrainConfig.model_fields["grad_fold"]
    assert set(typing.get_args(field.annotation)) == set(FOLDS) and field.default == DEFAULT_FOLD
