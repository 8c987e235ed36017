"""train.grad_fold: ZeRO-1's copy-free gradient fold gives DeepSpeed's float32 sums bitwise."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# One process, a world of one (gloo): two bf16 ZeRO-1 engines from ds_configs/zero1.json on the same
# weights, one with DeepSpeed's fold and one with train.grad_fold's, 3 micro-batches of different data.
WORKER = textwrap.dedent("""
    import json, sys, torch, torch.nn as nn
    from train.distributed import init_distributed
    from train.ds_config import read_ds_json
    from train.grad_fold import fold_without_copy
    from model.config import deep_merge
    import deepspeed

    init_distributed()
    config = deep_merge(read_ds_json("ds_configs/zero1.json"), {
        "bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}})
    torch.manual_seed(0)
    batches = [torch.randn(2, 16) * (i + 1) for i in range(3)]

    def run(copy_free):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        installed = fold_without_copy(engine) if copy_free else False
        for x in batches:
            engine.backward(engine(x.bfloat16()).float().pow(2).mean())
            if engine.is_gradient_accumulation_boundary():
                sums = [g.clone() for g in engine.optimizer.fp32_groups_gradients_flat]
            engine.step()
        weights = [p.detach().float().clone() for p in model.parameters()]
        engine.destroy()
        return installed, sums, weights

    _, want_sums, want_weights = run(False)
    installed, sums, weights = run(True)
    print(json.dumps({
        "installed": installed,
        "sums_equal": all(torch.equal(a, b) for a, b in zip(sums, want_sums)),
        "sums_nonzero": all(bool(s.abs().sum() > 0) for s in sums),
        "weights_equal": all(torch.equal(a, b) for a, b in zip(weights, want_weights)),
    }))
""")


def test_copy_free_fold_equals_deepspeeds_bitwise() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", WORKER], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = proc.stdout.strip().splitlines()[-1]
    assert result == '{"installed": true, "sums_equal": true, "sums_nonzero": true, "weights_equal": true}', result
