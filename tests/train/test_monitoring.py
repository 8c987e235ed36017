"""Live monitoring without a GPU: NVML through a fake pynvml, the GPU fields in metrics.jsonl, the loss
plot written when a run's metrics close, and `python -m train.watch` / `python -m train.plot`."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from config.schema import load_run_config
from train import gpu_stats
from train.metrics import MetricsLogger, read_metrics
from train.watch import render

from .conftest import REPO


class FakeNvml:
    """The pynvml calls GpuStats makes, for one GPU; power is 'not supported'."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self) -> None:
        self.inited = False

    def nvmlInit(self) -> None:
        self.inited = True

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        assert uuid.startswith("GPU-")
        return uuid

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(used=30e9, total=80e9, free=50e9)

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        return 61

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        raise RuntimeError("NVMLError_NotSupported")


def test_nvml_stats_from_a_fake_module(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    nvml = gpu_stats.load_nvml()
    assert nvml is fake and fake.inited
    row = gpu_stats.GpuStats(nvml, "GPU-1234").read()
    assert row[:4] == [87.0, 30.0, 80.0, 61.0] and math.isnan(row[4])
    assert gpu_stats.per_rank_fields([row, [50.0, 1.0, 80.0, 40.0, 300.0]]) == {
        "gpu_util_pct/0": 87.0, "gpu_mem_used_gb/0": 30.0, "gpu_mem_total_gb/0": 80.0, "gpu_temp_c/0": 61.0,
        "gpu_util_pct/1": 50.0, "gpu_mem_used_gb/1": 1.0, "gpu_mem_total_gb/1": 80.0, "gpu_temp_c/1": 40.0,
        "gpu_power_w/1": 300.0}


def test_no_nvml_no_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert gpu_stats.load_nvml() is None
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    assert gpu_stats.open_gpu_stats(torch.device("cpu")) is None


def log_run(out: Path, steps: int = 6, gpu: dict | None = None) -> None:
    cfg = load_run_config("tiny", [f"train.max_steps={steps}", "train.warmup_steps=1", "train.log_every=2", "train.wandb.mode=disabled"])
    m = MetricsLogger(cfg, out, True, 0, flops_per_token=1e6, peak_flops=None, world_size=1)
    for step in range(1, steps + 1):
        m.log_step(step, 5.0 - 0.5 * step, 1e-3, 1.0, False, step * 4096, 4096, 0.5, 1.5,
                   gpu if step % 2 == 0 else None)
        if step % 3 == 0:
            m.log_eval(step, 4.8 - 0.5 * step, {"a": 4.0})
    m.close()


def test_metrics_carry_gpu_fields_and_close_draws_the_plot(tmp_path: Path) -> None:
    gpu = gpu_stats.per_rank_fields([[87.0, 30.0, 80.0, 61.0, math.nan]])
    log_run(tmp_path, gpu=gpu)
    m = read_metrics(tmp_path)
    assert m[2]["gpu_util_pct/0"] == 87.0 and "gpu_power_w/0" not in m[2] and "gpu_util_pct/0" not in m[3]
    assert m[6]["max_steps"] == 6 and m[6]["val_loss"] == pytest.approx(1.8)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_watch_shows_progress_loss_and_gpus(tmp_path: Path) -> None:
    log_run(tmp_path, steps=6, gpu=gpu_stats.per_rank_fields([[87.0, 30.0, 80.0, 61.0, 250.0]] * 2))
    console = Console(record=True, width=120)
    console.print(render(tmp_path))
    text = console.export_text()
    assert "step 6/6 (100.0%), finished" in text and "loss" in text and "2.0000" in text
    assert "loss 1.8000" in text and "8,192" in text  # validation at step 6; tokens/s = 4096 / 0.5
    gpu_lines = [line.replace("│", " ").split() for line in text.splitlines() if line.startswith("│")]
    assert gpu_lines == [[r, "87", "30.0", "/", "80.0", "61", "250"] for r in "01"]


@pytest.mark.slow
def test_watch_follow_on_a_finished_run_returns_and_plot_cli(tmp_path: Path) -> None:
    log_run(tmp_path, steps=4)
    (tmp_path / "loss.png").unlink()
    env_cmd = [sys.executable, "-m"]
    watch = subprocess.run([*env_cmd, "train.watch", str(tmp_path), "--follow"], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    assert watch.returncode == 0 and "finished" in watch.stdout
    plot = subprocess.run([*env_cmd, "train.plot", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert plot.returncode == 0 and (tmp_path / "loss.png").is_file()
    for module in ("train.watch", "train.plot"):
        bad = subprocess.run([*env_cmd, module, str(tmp_path / "nope")], cwd=REPO, capture_output=True, text=True,
                             timeout=60)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "metrics.jsonl does not exist" in bad.stderr


def test_missing_wandb_is_one_config_error_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """train.wandb.mode offline/online without the wandb package stops at the trainer's first check, not when
    the first step's logger starts (after the engine is built); disabled passes."""
    import importlib.util

    from config.loader import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    for mode in ("offline", "online"):
        with pytest.raises(ConfigError, match=f"train.wandb.mode={mode} needs the wandb package"):
            MetricsLogger.check_wandb(load_run_config("tiny", [f"train.wandb.mode={mode}"]))
    MetricsLogger.check_wandb(load_run_config("tiny", ["train.wandb.mode=disabled"]))
