"""The files of a step checkpoint as data: never code, flushed to disk, checked before they are used.

Data only: a pickle can run any code when it is loaded (`__reduce__`), and DeepSpeed's own loaders
call `torch.load(..., weights_only=False)`. `enforce_data_only_loading` sets torch's
TORCH_FORCE_WEIGHTS_ONLY_LOAD for this process (torch reads it at every `torch.load`, also inside
DeepSpeed's engine, zero_to_fp32 and ds_to_universal) and allow-lists the few non-tensor classes our
checkpoints hold: DeepSpeed's ZeRO stage enum, loss scaler and fragment addresses, and the numpy
arrays of the RNG states. Anything else in a pickle stops the load with UnpicklingError.

Complete: every rank fsyncs the files it wrote (DeepSpeed's included) before the barrier after
which rank 0 writes COMPLETE, which lists every file of the folder with its size.
`checkpoint_problem` compares a folder with that list (or, for checkpoints written before the
list existed, looks for the model-states, every rank's optimizer and RNG files) without reading
the tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

FILES_KEY = "files"  # COMPLETE's JSON: {"tag": ..., "files": {relative path: bytes}}
_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def _safe_globals() -> list:
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    numpy_types = [np.ndarray, np.dtype, np._core.multiarray._reconstruct,
                   *{type(np.dtype(t)) for t in ("uint32", "float64", "int64")}]
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address, *numpy_types]


def enforce_data_only_loading() -> None:
    """From now on every torch.load of this process unpickles tensors and plain data only."""
    os.environ[_ENV] = "1"
    torch.serialization.add_safe_globals(_safe_globals())


def load_data(path: Path) -> object:
    """torch.load of a file that must hold only tensors and plain data (see the module doc)."""
    enforce_data_only_loading()
    return torch.load(path, map_location="cpu", weights_only=True)


def fsync_files(paths: list[Path]) -> None:
    """Flush these files and their folders to disk (a crash after this loses none of their bytes)."""
    for path in [*paths, *{p.parent for p in paths}]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rank_files(folder: Path, rank: int) -> list[Path]:
    """The files of `folder` that `rank` wrote: DeepSpeed names a rank's partitions zero_pp_rank_R_;
    rank 0 also writes the unpartitioned model states."""
    mine = [p for p in folder.glob("*.pt") if f"zero_pp_rank_{rank}_" in p.name]
    if rank == 0:
        mine += [p for p in folder.glob("*.pt") if "zero_pp_rank_" not in p.name]
    return mine


def file_sizes(folder: Path) -> dict[str, int]:
    """Every file under `folder` by relative path -> bytes (temporary files and COMPLETE left out)."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.name != "COMPLETE"}


def complete_record(tag: str, folder: Path) -> bytes:
    return (json.dumps({"tag": tag, FILES_KEY: file_sizes(folder)}, indent=1, sort_keys=True) + "\n").encode()


def checkpoint_problem(folder: Path, world_size: int | None) -> str | None:
    """What is missing or damaged in the complete step `folder` (None: intact). `world_size` is the one
    it was saved with (None when its trainer_state.json is unreadable: then that is the problem)."""
    if world_size is None:
        return "trainer_state.json is missing or unreadable"
    try:
        listed = json.loads((folder / "COMPLETE").read_text()).get(FILES_KEY)
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        listed = None  # the older COMPLETE: just the tag
    if listed is not None:
        for name, size in listed.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} were written"
        return None
    if not any(folder.glob("*model_states.pt")):
        return "no model-states file"
    for rank in range(world_size):
        if not any(folder.glob(f"*zero_pp_rank_{rank}_*optim_states.pt")):
            return f"the optimizer states of rank {rank} are missing"
        if not (folder / "rng" / f"rank_{rank:05d}.pt").is_file():
            return f"the RNG states of rank {rank} are missing"
    return None
