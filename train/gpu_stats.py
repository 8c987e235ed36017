"""Live device statistics through NVML (nvidia-ml-py's `pynvml`), per rank, for metrics.jsonl and wandb.

Each rank reads its own GPU (found by UUID, so CUDA_VISIBLE_DEVICES remapping does not matter) at
every log interval; one all_gather brings the rows to rank 0, which logs
gpu_util_pct/<rank>, gpu_mem_used_gb/<rank>, gpu_mem_total_gb/<rank>, gpu_temp_c/<rank>, gpu_power_w/<rank>.
Without pynvml, on a CPU, or where the driver does not report a value, the field is left out: no error.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType

import torch

FIELDS = ("gpu_util_pct", "gpu_mem_used_gb", "gpu_mem_total_gb", "gpu_temp_c", "gpu_power_w")


def load_nvml() -> ModuleType | None:
    """pynvml, initialised; None when it is not installed or no driver answers."""
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError:
        return None
    try:
        nvml.nvmlInit()
    except Exception:  # noqa: BLE001 - pynvml raises NVMLError subclasses (no driver, no library)
        return None
    return nvml


class GpuStats:
    """Reads one GPU's utilisation, memory, temperature and power."""

    def __init__(self, nvml: ModuleType, uuid: str) -> None:
        self.nvml = nvml
        self.handle = nvml.nvmlDeviceGetHandleByUUID(uuid)

    def read(self) -> list[float]:
        """Values in FIELDS order (%, GB, GB, degrees C, W); NaN where NVML reports none."""
        n, h = self.nvml, self.handle
        queries = (
            lambda: n.nvmlDeviceGetUtilizationRates(h).gpu,
            lambda: n.nvmlDeviceGetMemoryInfo(h).used / 1e9,
            lambda: n.nvmlDeviceGetMemoryInfo(h).total / 1e9,
            lambda: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU),
            lambda: n.nvmlDeviceGetPowerUsage(h) / 1e3,  # milliwatts
        )
        values = []
        for query in queries:
            try:
                values.append(float(query()))
            except Exception:  # noqa: BLE001 - NVMLError_NotSupported etc.: this GPU does not report it
                values.append(math.nan)
        return values


def open_gpu_stats(device: torch.device) -> GpuStats | None:
    """NVML statistics of `device`, or None (CPU, pynvml absent, GPU unknown to NVML)."""
    if device.type != "cuda":
        return None
    nvml = load_nvml()
    if nvml is None:
        return None
    try:
        return GpuStats(nvml, f"GPU-{torch.cuda.get_device_properties(device).uuid}")
    except Exception:  # noqa: BLE001 - NVML does not know this device (e.g. a MIG slice's UUID form)
        return None


def per_rank_fields(rows: list[list[float]]) -> dict[str, float]:
    """{field/rank: value} of every rank's row, NaNs (not reported) left out."""
    return {f"{field}/{rank}": value for rank, row in enumerate(rows)
            for field, value in zip(FIELDS, row) if math.isfinite(value)}


def gather_gpu_stats(stats: GpuStats | None, device: torch.device) -> dict[str, float]:
    """Collective over all ranks (call it on every rank, with CUDA devices): each rank's row, as
    per_rank_fields on every rank (rank 0 logs them)."""
    row = torch.tensor(stats.read() if stats is not None else [math.nan] * len(FIELDS), dtype=torch.float64,
                       device=device)
    rows = [torch.empty_like(row) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(rows, row)
    return per_rank_fields([r.tolist() for r in rows])
