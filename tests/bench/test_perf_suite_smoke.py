"""The comparison benchmarks (train step, memory scaling, hardware ceilings) run with --smoke and write
complete results; the peer models have the parameter counts the benchmarks report.

No timing is asserted. train_step_throughput runs in a subprocess: its DeepSpeed set-up creates a
process group, sets RANK/WORLD_SIZE and reconfigures logging for the whole process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench import hw_ceilings, memory_scaling, peers, step_overhead, train_step_throughput
from model import ModelConfig, count_params

pytestmark = pytest.mark.slow  # launched runs / long exports: the full tier only (README, "Tests")

REPO = Path(__file__).resolve().parents[2]


def _results(path: Path, png: bool = True) -> list[dict]:
    data = json.loads(path.read_text())
    for key in ("device", "date", "command", "versions"):
        assert data["meta"].get(key), f"{path.name} lacks meta.{key}"
    assert path.with_suffix(".md").read_text().startswith("# ")
    assert not png or path.with_suffix(".png").stat().st_size > 0
    assert data["rows"] and all(r["status"] == "ok" for r in data["rows"]), data["rows"]
    return data["rows"]


def _positive(row: dict, *keys: str) -> None:
    for key in keys:
        assert isinstance(row.get(key), (int, float)) and math.isfinite(row[key]) and row[key] > 0, (key, row)


def test_train_step_throughput_smoke(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "train_step_throughput.py"), "--smoke", "--out",
                           str(tmp_path)], cwd=REPO, env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _results(tmp_path / "train_step_throughput_tiny_smoke.json")
    assert [(r["seq_len"], r["model"]) for r in rows] == [(s, m) for s in (32, 64) for m in peers.PEERS]
    for r in rows:
        _positive(r, "params_m", "tokens_per_s", "mfu", "step_s", "first_step_s", "flops_per_token")
        assert r["micro_batch"] * r["seq_len"] == 64 and r["grad_accum"] == 2
        if r["model"] != "ours":
            _positive(r, "ours_over_peer")


def test_step_overhead_smoke(tmp_path: Path) -> None:
    """The floor row and one row per engine variant, each with both kinds of micro-batch timed; the
    profile of the first engine variant lists ops; a malformed variant is refused before any work."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "step_overhead.py"), "--smoke", "--profile",
                           "--variants",
                           "zero2,zero2 overlap_comm=false,zero1 bf16.check_grad_overflow=false deepspeed_fold",
                           "--out", str(tmp_path)],
                          cwd=REPO, env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _results(tmp_path / "step_overhead_tiny_smoke.json", png=False)
    assert [r["variant"] for r in rows] == ["fwd_bwd", "zero2", "zero2 overlap_comm=false",
                                                "zero1 bf16.check_grad_overflow=false deepspeed_fold"]
    for r in rows:
        _positive(r, "micro_ms", "boundary_ms", "tokens_per_s")
    assert all("overhead_ms" in r for r in rows[1:]) and "overhead_ms" not in rows[0]
    assert rows[1]["profile"]["by_host"] and rows[1]["profile_step"]["by_device"]
    assert all("profile" not in r for r in rows[2:])
    assert step_overhead.parse_variant("zero2 overlap_comm=false reduce_bucket_size=5e8") == (
        2, {"zero_optimization": {"overlap_comm": False, "reduce_bucket_size": 500_000_000}}, "fused_wgrad")
    assert step_overhead.parse_variant("zero1 bf16.check_grad_overflow=false data_types.grad_accum_dtype=bf16") == (
        1, {"zero_optimization": {}, "bf16": {"check_grad_overflow": False},
            "data_types": {"grad_accum_dtype": "bf16"}}, "fused_wgrad")
    assert step_overhead.parse_variant("zero1 deepspeed_fold") == (1, {"zero_optimization": {}}, "deepspeed")
    assert step_overhead.parse_variant("zero1 copy_free_fold") == (1, {"zero_optimization": {}}, "copy_free")
    for bad in ("zero3", "zero2 overlap_comm", "zero1 copy_free_fold deepspeed_fold"):
        with pytest.raises(argparse.ArgumentTypeError):
            step_overhead.parse_variant(bad)


def test_grad_norm_check_smoke(tmp_path: Path) -> None:
    """Different batches per micro-batch, bf16 engines on the shipped ZeRO-1 and ZeRO-2 JSONs: eager and
    graphed, every engine reports the float32 reference's gradient norm (1e-3: bf16 weights and
    gradients; a gradient lost, doubled or overwritten moves the norm by tens of percent)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "grad_norm_check.py"), "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _results(tmp_path / "grad_norm_check_tiny_smoke.json", png=False)
    assert [(r["stage"], r["graphed"], r["overlap_comm"]) for r in rows] == [
        (s, g, o) for s in (1, 2) for g in (False, True) for o in (True, False)]
    assert all(r["rel_diff"] < 1e-3 for r in rows), rows


def test_memory_scaling_smoke(tmp_path: Path) -> None:
    assert memory_scaling.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = _results(tmp_path / "memory_scaling_tiny_smoke.json")
    series = {(r["model"], r["mode"], r["act_ckpt"]): [] for r in rows}
    for r in rows:
        series[(r["model"], r["mode"], r["act_ckpt"])].append(r["seq_len"])
        _positive(r, "step_s", "tokens_per_s")
    assert set(series) == {("ours", "prefill", False), ("ours", "train", False), ("ours", "train", True),
                           ("attention", "prefill", False), ("attention", "train", False),
                           ("attention", "train", True), ("hf_bamba", "prefill", False), ("hf_bamba", "train", False)}
    assert all(lengths == [64, 128, 256] for lengths in series.values())


def test_hw_ceilings_smoke(tmp_path: Path) -> None:
    assert hw_ceilings.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = _results(tmp_path / "hw_ceilings_smoke.json", png=False)
    assert [r["unit"] for r in rows] == ["TFLOP/s", "TFLOP/s", "GB/s", "GB/s"]
    for r in rows:
        _positive(r, "value")


@pytest.mark.parametrize("name", peers.PEERS)
def test_peer_parameter_counts(name: str) -> None:
    """Built on the meta device: the analytic count of flops_config is exact, and within 5% of ours."""
    cfg = ModelConfig(preset="small")
    model = peers.build(name, cfg, torch.device("meta"), torch.float32)
    built = sum(p.numel() for p in model.parameters())
    assert built == count_params(peers.flops_config(name, cfg))
    assert abs(built / count_params(cfg) - 1) < 0.05


def test_llama_twin_is_the_closest_layer_count() -> None:
    cfg = ModelConfig(preset="1.3b")
    twin = peers.llama_twin(cfg)
    assert set(twin.layer_pattern) == {"A"} and (twin.d_model, twin.ffn_hidden) == (cfg.d_model, cfg.ffn_hidden)
    gaps = [abs(count_params(twin.model_copy(update={"n_layers": n, "pattern": "A" * n})) - count_params(cfg))
            for n in (twin.n_layers - 1, twin.n_layers, twin.n_layers + 1)]
    assert gaps[1] == min(gaps)


def test_train_loss_predicts_the_same_tokens_for_every_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """ids (b, l+1): HF peers score the same b*l targets as ours (not l-1 after a second shift)."""
    cfg = ModelConfig(preset="tiny", n_layers=2, pattern="MA")
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    cross_entropy, scored = F.cross_entropy, []

    def counting(logits: torch.Tensor, labels: torch.Tensor, **kw) -> torch.Tensor:
        scored.append(labels.numel())
        return cross_entropy(logits, labels, **kw)

    monkeypatch.setattr(F, "cross_entropy", counting)
    for name in peers.PEERS:
        scored.clear()
        loss = peers.train_loss(name, peers.build(name, cfg, torch.device("cpu"), torch.float32), ids)
        assert scored == [2 * 16] and math.isfinite(loss.item()), name


def test_growth_ratios_and_failures() -> None:
    rows = [{"model": "ours", "mode": "train", "act_ckpt": False, "activation_gb": a} for a in (1.0, 2.1, None)]
    memory_scaling.add_growth(rows)
    assert "growth" not in rows[0] and rows[1]["growth"] == pytest.approx(2.1) and "growth" not in rows[2]
    steps = [{"model": m, "seq_len": 8, "status": s, "tokens_per_s": t}
             for m, s, t in (("ours", "ok", 300.0), ("hf_llama", "ok", 100.0), ("hf_bamba", "OOM", None))]
    train_step_throughput.add_ratios(steps)
    assert steps[1]["ours_over_peer"] == 3.0 and "ours_over_peer" not in steps[2]

    def oom() -> dict:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def broken() -> dict:
        raise ValueError("shapes differ\nsecond line")

    cpu = torch.device("cpu")
    assert peers.run_guarded(oom, cpu) == {"status": "OOM"}
    assert peers.run_guarded(broken, cpu) == {"status": "ValueError: shapes differ"}
    assert peers.run_guarded(lambda: {"x": 1}, cpu) == {"x": 1, "status": "ok"}
