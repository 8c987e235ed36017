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
from pathlib import Path

import pytest

from tests.conftest import repo_first_pythonpath

REPO = Path(__file__).resolve().parents[2]

# One process, a world of one: the three folds against each other (its docstring says how).
WORKER = REPO / "tests" / "helpers" / "grad_fold_worker.py"


@pytest.mark.slow
def test_folds_against_deepspeeds() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(WORKER)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env | {"PYTHONPATH": repo_first_pythonpath(), "OMP_NUM_THREADS": "1",
                                     "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"})  # gloo also on a GPU machine
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["installed"] == ["deepspeed", "copy_free", "fused_wgrad"], r
    assert r["copy_free_sums_equal"] and r["copy_free_weights_equal"] and r["sums_nonzero"], r
    # 6 micro-batches: 2 matrices + 2 LayerNorm vectors each folded in the hooks, except fused_wgrad's matrices
    assert r["hooked"] == {"hooked_matrices": [12, 12, 0], "hooked_vectors": [12, 12, 12]}, r
    assert r["fused_marked"], r
    assert r["fused_sums_rel"] < 1e-2 and r["fused_norms_rel"] < 1e-2, r
    assert r["fused_weights_median"] < 1e-2 * r["moved_median"], r
    # alone in the reduction group: the engine's reduce (called after each of the 6 backwards, reducing at the
    # 2 boundaries) is never called. Its only effect on one rank was to round the float32 sums to bf16 (the
    # communication dtype): the sums are DeepSpeed's before that rounding; the weights move as DeepSpeed's
    assert r["alone_skipped"] and r["reduces"] == [6, 0], r
    assert r["alone_sums_rounded_equal"] and r["alone_sums_unrounded"], r
    assert r["alone_weights_median"] < 1e-2 * r["moved_median"], r


def test_the_config_offers_every_fold_and_the_same_default() -> None:
    import typing

    from config.sections import TrainConfig
    from train.grad_fold import DEFAULT_FOLD, FOLDS

    field = TrainConfig.model_fields["grad_fold"]
    assert set(typing.get_args(field.annotation)) == set(FOLDS) and field.default == DEFAULT_FOLD
