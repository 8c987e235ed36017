"""Weights on disk: `model.safetensors` + `config.json` (the resolved ModelConfig) in one folder.

Writes are atomic (temporary file in the same folder, then rename), so an interrupted save never
leaves a half-written file under the final name. Loading is strict: missing or unexpected tensor
names, shape mismatches, or a config that does not match the file are errors that say what to do.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from config.atomic import FILE_MODE, atomic_write_json
from config.base import format_validation_error
from model.config import ModelConfig
from model.hybrid import HybridLM

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class CheckpointError(RuntimeError):
    """A weights folder that cannot be loaded as asked."""


def save_weights(model: HybridLM, folder: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Save `model` (weights cast to their current dtype, contiguous) and its resolved config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{WEIGHTS_NAME}.", suffix=".tmp")
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})
        os.replace(tmp, folder / WEIGHTS_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_json(folder / CONFIG_NAME, model.cfg.model_dump(mode="json"))
    return folder


def load_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in {folder}: pass a folder written by save_weights or the trainer's export")
    try:
        return ModelConfig.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}): re-export the checkpoint") from None
    except ValidationError as exc:
        raise CheckpointError(f"{path} is not a valid model config: {format_validation_error(exc)}") from None


def load_weights(
    folder: str | Path,
    cfg: ModelConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> HybridLM:
    """Build the model from the folder's config (or check `cfg` equals it) and load the tensors."""
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    saved = load_config(folder)
    if cfg is not None and (diff := arch_diff(cfg, saved)):
        raise CheckpointError(f"config does not match {folder}/{CONFIG_NAME} at: {', '.join(diff)}")
    wfile = folder / WEIGHTS_NAME
    if not wfile.is_file():
        raise CheckpointError(f"no {WEIGHTS_NAME} in {folder}")
    with torch.device("meta"):
        model = HybridLM(saved)
    state = load_file(str(wfile), device=str(device))
    check_state_dict(model, state, str(wfile))
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model.to(dtype)
    model.set_impl()
    return model


def _arch(cfg: ModelConfig) -> dict:
    """Config fields that change tensors or math (not the execution-path switches)."""
    return cfg.model_dump(mode="json", exclude={"preset", "impl", "attn_backend", "max_seq_len"})


def arch_diff(a: ModelConfig, b: ModelConfig) -> list[str]:
    """The model.* keys (sorted) where `a` and `b` build different tensors or math."""
    left, right = _arch(a), _arch(b)
    return sorted(k for k in left if left[k] != right[k])


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming missing/unexpected/mis-shaped tensors."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s) e.g. {unexpected[:3]}")
    if shapes:
        k = shapes[0]
        problems.append(f"shape mismatch at {k}: file {tuple(state[k].shape)} vs model {expected[k]}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))
