"""One consolidated fp32 weights folder (a model.bundle) from a live engine or a saved checkpoint.

    <folder>/ model.safetensors  config.json  tokenizer.json  tokenizer.model  meta.json  run_config.yaml

The weights are the optimizer's fp32 master weights, gathered across ZeRO partitions:
  - from the live engine with DeepSpeed's `safe_get_full_fp32_param` (a collective: every rank
    calls it for every parameter in the same order; rank 0 keeps a CPU copy);
  - from a checkpoint on disk with DeepSpeed's zero_to_fp32 (`get_fp32_state_dict_from_zero_checkpoint`),
    which reads every rank's partition files.
Both give the same tensors. The folder is written under a temporary name and renamed into place,
so a reader never sees a half-written export. `model.weights.load_weights(folder)` (or
`model.bundle.load_bundle`) loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from config.atomic import staged_dir
from config.schema import RunConfig, save_run_config
from model.bundle import TOKENIZER_JSON, save_bundle
from model.hybrid import HybridLM
from model.weights import CheckpointError, check_state_dict
from train.provenance import provenance

RUN_CONFIG_NAME = "run_config.yaml"


def gather_fp32_state_dict(engine: Any, is_main: bool, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
    """Full fp32 master weights by parameter name on rank 0 (None elsewhere); `trainable_only`: those
    the optimizer holds (frozen parameters have no master copy). Collective."""
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] | None = {} if is_main else None
    for name, param in engine.module.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        full = safe_get_full_fp32_param(param)
        if full is None:
            raise CheckpointError(f"parameter {name} has no fp32 master copy: the engine must use a ZeRO optimizer")
        if out is not None:
            out[name] = full.detach().float().cpu()
    return out


def state_dict_from_checkpoint(step_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a saved step folder (any ZeRO stage, any world size)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)


def write_bundle(state_dict: dict[str, torch.Tensor], cfg: RunConfig, tokenizer_dir: Path, folder: Path,
                 meta: dict[str, Any]) -> Path:
    """Write the consolidated folder: weights + config, the tokenizer files of `tokenizer_dir` (the
    manifest's, or the fine-tuned checkpoint's), meta.json (meta + provenance), run_config.yaml."""
    with torch.device("meta"):
        model = HybridLM(cfg.model)
    check_state_dict(model, state_dict, "the consolidated training state")
    model.load_state_dict(state_dict, strict=True, assign=True)
    folder = Path(folder)
    with staged_dir(folder) as tmp:
        save_bundle(model, tokenizer_dir, tmp, {**meta, **provenance()})
        if not (tmp / TOKENIZER_JSON).is_file():
            raise CheckpointError(f"no {TOKENIZER_JSON} in {tokenizer_dir}: the tokenizer must be named "
                                  f"{TOKENIZER_JSON} (a manifest's: re-run pipeline/curate.py)")
        save_run_config(cfg, tmp / RUN_CONFIG_NAME)
    return folder
