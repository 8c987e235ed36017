"""What both entrypoints do first: resolve the run config, the device and the checkpoint.

A checkpoint is one of
    a bundle          model.safetensors + config.json (+ tokenizer.json, meta.json, run_config.yaml)
    a quantized export  the same plus quantization.json (export.quantize)
    a Hugging Face folder  a Bamba or GraniteMoeHybrid config.json (model_type) + safetensors, imported on
                       load (export.hf, export.granite)
The run config is the checkpoint's run_config.yaml (when present; never its USER_ONLY_KEYS: where
files go, whether code runs) <- --config <- the checkpoint's model section (the weights define the
model) <- --set overrides. Overriding architecture keys of
`model` is an error; `model.impl` / `model.attn_backend` choose the execution path.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from config.base import deep_merge
from config.loader import ConfigError, apply_overrides, read_yaml, validate
from config.schema import RunConfig, resolve_run_path, without_user_only
from export import ExportError
from export.onnx_export import ONNX_CONFIG
from model.bundle import Bundle, load_bundle, load_tokenizer
from model.config import ModelConfig
from model.weights import CONFIG_NAME, CheckpointError

RUN_CONFIG_NAME = "run_config.yaml"
_PATH_KEYS = {"preset", "impl", "attn_backend", "max_seq_len"}  # may differ from the checkpoint's


def is_hf_folder(folder: Path) -> bool:
    path = folder / CONFIG_NAME
    return path.is_file() and "model_type" in json.loads(path.read_text())


def checkpoint_model_config(folder: str | Path) -> ModelConfig:
    """The ModelConfig of any supported checkpoint folder (ExportError if there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"checkpoint {folder} does not exist (pass the folder holding model.safetensors)")
    path = folder / CONFIG_NAME
    if not path.is_file():
        if (folder / ONNX_CONFIG).is_file():
            raise ExportError(f"{folder} is an ONNX export: run it with export.onnx_runtime.OnnxLM, not as a checkpoint")
        raise ExportError(f"no {CONFIG_NAME} in {folder}: pass a consolidated checkpoint, a quantized export "
                          "or a Hugging Face (Bamba, GraniteMoeHybrid) folder")
    if is_hf_folder(folder):
        from export.hf import OUR_CONFIG_NAME, model_config_from_hf, read_hf_config

        ours = folder / OUR_CONFIG_NAME
        return ModelConfig.model_validate(json.loads(ours.read_text())) if ours.is_file() else \
            model_config_from_hf(read_hf_config(folder))
    return validate(ModelConfig, json.loads(path.read_text()), prefix=f"{path}: model.")


def resolve_run_config(model_cfg: ModelConfig, checkpoint: Path | None, config: str | None,
                       overrides: Sequence[str]) -> RunConfig:
    """checkpoint run_config.yaml <- --config <- checkpoint model section <- overrides, validated."""
    data: dict = {}
    if checkpoint is not None and (checkpoint / RUN_CONFIG_NAME).is_file():
        data = without_user_only(read_yaml(checkpoint / RUN_CONFIG_NAME))  # the user's own settings decide those
    if config is not None:
        data = deep_merge(data, read_yaml(resolve_run_path(config)))
    data["model"] = model_cfg.model_dump(mode="json")
    cfg = validate(RunConfig, apply_overrides(data, overrides))
    ours, theirs = (c.model_dump(mode="json", exclude=_PATH_KEYS) for c in (model_cfg, cfg.model))
    changed = sorted(k for k in ours if ours[k] != theirs[k])
    if changed:
        raise ConfigError(f"model.{changed[0]}: the architecture comes from the checkpoint; only "
                          "model.impl and model.attn_backend may be overridden")
    return cfg


def pick_device(spec: str) -> torch.device:
    """auto -> cuda when available, else cpu; asking for cuda without it is an ExportError."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExportError(f"export.device={spec} but CUDA is not available here; use export.device=cpu")
    return device


def pick_dtype(spec: str) -> torch.dtype | None:
    return None if spec == "auto" else getattr(torch, spec)


def load_checkpoint(folder: str | Path, device: torch.device, dtype: torch.dtype | None = None,
                    impl: str | None = None) -> Bundle:
    """Load any supported checkpoint for inference (eval mode, execution path chosen and logged)."""
    from export.quantize import is_quantized_folder, load_quantized

    folder = Path(folder)
    checkpoint_model_config(folder)  # existence and config checks, one-line errors
    if is_quantized_folder(folder):
        if dtype is not None:
            raise ExportError("a quantized checkpoint keeps its own dtype: leave export.dtype=auto")
        model = load_quantized(folder, device)
        bundle = Bundle(model=model, tokenizer=load_tokenizer(folder), folder=folder)
    elif is_hf_folder(folder):
        from export.hf import import_hf

        model = import_hf(folder).to(device=device, dtype=dtype)
        bundle = Bundle(model=model, tokenizer=load_tokenizer(folder), folder=folder)
    else:
        bundle = load_bundle(folder, device=device, dtype=dtype)
    meta_path = folder / "meta.json"
    bundle.meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    bundle.model.set_impl(impl)
    return bundle


def cli_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Entrypoint wrapper: known errors become one stderr line and exit code 2 (no traceback)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except (ExportError, ConfigError, CheckpointError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except FileNotFoundError as exc:
            print(f"error: {exc.filename or exc}: no such file", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper
