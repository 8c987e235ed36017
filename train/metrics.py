"""Training metrics: the console (rank 0), <output_dir>/metrics.jsonl and wandb.

One JSON line per optimizer step:
  step, loss (mean next-token NLL over the step's targets, all ranks), lr (of that step),
  grad_norm (global, before clipping; inf on a skipped step), skipped, tokens (consumed so far),
  step_time_s, tokens_per_s (this step, all ranks), tokens_per_s_avg (steady state), mfu (this
  step), mem_gb (rank 0's peak), eta_s, max_steps; on GPUs with nvidia-ml-py, at every log interval,
  each rank's gpu_util_pct/<rank>, gpu_mem_used_gb/<rank>, gpu_mem_total_gb/<rank>, gpu_temp_c/<rank>,
  gpu_power_w/<rank> (train/gpu_stats.py; left out where NVML is absent or does not report one)
and one per validation pass: step, val_loss, val_ppl, val_loss/<source>.
At close, rank 0 draws <output_dir>/loss.png from the file (train/plot.py).

MFU = tokens/s x model FLOPs per token (model.sizing.train_flops_per_token: 3 x forward, attention and
SSD counted per layer type) / (world size x the device's dense bf16 peak). The peak comes from
`train.peak_tflops` or a table by GPU name; on a CPU MFU is left out. Throughput and ETA average
the steps after the first two, so start-up (Triton autotuning, kernel compilation) does not skew
them; the first steps' own times are in the JSON lines.
"""

from __future__ import annotations

import importlib.util
import json
import math
import resource
import secrets
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from config.loader import ConfigError
from config.schema import RunConfig

# Dense bf16 tensor-core peaks (TFLOP/s) by GPU name substring; first match wins.
PEAK_BF16_TFLOPS = (
    ("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),
    ("H800", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1),
    ("A10G", 70.0), ("MI300X", 1307.4),
)
WARMUP_STEPS = 2


def device_peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """Dense bf16 peak FLOP/s of one device, or None when unknown (then no MFU)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def memory_gb(device: torch.device) -> float:
    """Peak allocated device memory since the last call (GPU) or the peak RSS (CPU), in GB."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def read_metrics(out_dir: Path) -> dict[int, dict]:
    """Per step: the train record merged with the validation record of that step ({} without a file;
    a line torn by a crash mid-write is skipped)."""
    steps: dict[int, dict] = {}
    path = Path(out_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
            steps.setdefault(rec["step"], {}).update(rec)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return steps


def keep_steps_upto(path: Path, last_step: int) -> None:
    """Drop JSON lines of steps after `last_step` (a resumed run redoes them), atomically."""
    from config.atomic import atomic_write_bytes

    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by a crash mid-write
    atomic_write_bytes(path, "".join(kept).encode())


class MetricsLogger:
    """Writes metrics on rank 0 only; every method is a no-op elsewhere."""

    def __init__(self, cfg: RunConfig, out_dir: Path, is_main: bool, start_step: int,
                 flops_per_token: float, peak_flops: float | None, world_size: int) -> None:
        self.enabled = is_main
        self.total = cfg.train.max_steps
        self.log_every = cfg.train.log_every
        self.flops_per_token, self.peak_flops, self.world = flops_per_token, peak_flops, world_size
        self.start_step = start_step
        self._timed_steps, self._timed_seconds, self._timed_tokens = 0, 0.0, 0
        self.run = None
        if not self.enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = out_dir / "metrics.jsonl"
        keep_steps_upto(self.jsonl_path, start_step)
        self.jsonl = open(self.jsonl_path, "a")
        self._start_progress()
        if cfg.train.wandb.mode != "disabled":
            self.run = self._start_wandb(cfg, out_dir)

    def _start_progress(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(file=sys.stdout)
        self.progress = Progress(
            TextColumn("step"), MofNCompleteColumn(), BarColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"), console=console, disable=not console.is_terminal,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=self.total, completed=self.start_step, status="")

    @staticmethod
    def check_wandb(cfg: RunConfig) -> None:
        """One-line ConfigError before any work when train.wandb.mode needs the wandb package and it is missing."""
        mode = cfg.train.wandb.mode
        if mode != "disabled" and importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"train.wandb.mode={mode} needs the wandb package, which is not installed here: "
                              "pip install wandb (requirements.txt lists it), or set train.wandb.mode=disabled")

    @staticmethod
    def _start_wandb(cfg: RunConfig, out_dir: Path) -> Any:
        import wandb  # lazy: only when enabled

        id_file = out_dir / "wandb_run_id"  # one wandb run across resumes
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        w = cfg.train.wandb
        return wandb.init(project=w.project, entity=w.entity, name=w.name or out_dir.name, mode=w.mode, id=run_id,
                          resume="allow", dir=str(out_dir), config=cfg.model_dump(mode="json"))

    def _emit(self, record: dict[str, Any]) -> None:
        # strict JSON: a non-finite loss or grad norm is null (the step says skipped / the log says why)
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])

    def print(self, message: str) -> None:
        if self.enabled:
            self.progress.console.print(message, highlight=False, markup=False, soft_wrap=True)

    def log_step(self, step: int, loss: float, lr: float, grad_norm: float | None, skipped: bool,
                 consumed_tokens: int, step_tokens: int, step_time: float, mem_gb: float,
                 gpu: dict[str, float] | None = None) -> None:
        """Record optimizer step `step` (1-based count of steps done); `gpu`: the per-rank device fields
        (train/gpu_stats.py), at log intervals."""
        if not self.enabled:
            return
        if step - self.start_step > WARMUP_STEPS:
            self._timed_steps += 1
            self._timed_seconds += step_time
            self._timed_tokens += step_tokens
        rate = step_tokens / step_time
        mean_step = self._timed_seconds / self._timed_steps if self._timed_steps else step_time
        mfu = rate * self.flops_per_token / (self.world * self.peak_flops) if self.peak_flops else None
        record = {
            "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped": skipped,
            "tokens": consumed_tokens, "step_time_s": step_time, "tokens_per_s": rate,
            "tokens_per_s_avg": self._timed_tokens / self._timed_seconds if self._timed_seconds else None,
            "mfu": mfu, "mem_gb": mem_gb, "eta_s": mean_step * (self.total - step), "max_steps": self.total,
            **(gpu or {}),
        }
        self._emit(record)
        self.progress.update(self.task, completed=step, status=f"loss {loss:.4f}")
        if step % self.log_every == 0 or step == self.total:
            gn = f"{grad_norm:.3f}" if grad_norm is not None else "-"
            parts = [f"step {step}/{self.total}", f"loss {loss:.4f}", f"lr {lr:.3e}", f"gnorm {gn}",
                     f"{rate / 1e3:.1f}k tok/s", f"mem {mem_gb:.1f} GB", f"ETA {_duration(record['eta_s'])}"]
            if mfu is not None:
                parts.insert(5, f"MFU {100 * mfu:.1f}%")
            if skipped:
                parts.append("SKIPPED")
            self.print(" | ".join(parts))

    def log_blocks(self, step: int, statistics: Callable[[], dict[str, float]]) -> None:
        """At log steps, what the block types measured on the step's last micro-batch (router fractions,
        gate means: `HybridLM.block_statistics`), as `blocks/layers.{i}.{name}`. A callable, so that the
        device-to-host reads happen only at the steps that log."""
        if not self.enabled or (step % self.log_every and step != self.total):
            return
        stats = statistics()
        if stats:
            self._emit({"step": step, **{f"blocks/{k}": v for k, v in stats.items()}})

    def log_eval(self, step: int, val_loss: float, per_source: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
                  **{f"val_loss/{name}": v for name, v in per_source.items()}}
        self._emit(record)
        self.print(f"step {step}: val_loss {val_loss:.4f} (ppl {record['val_ppl']:.2f})")

    def close(self) -> None:
        if not self.enabled:
            return
        self.progress.stop()
        self.jsonl.close()
        if self.run is not None:
            self.run.finish()
        from train.plot import write_run_plot  # lazy: matplotlib only where a run ends

        write_run_plot(self.jsonl_path.parent)
