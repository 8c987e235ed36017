"""LoRA adapters on the model through peft (finetune.method=lora): targets, wrapping, saving, merging.

Targets are named by kind (finetune.lora.targets): each block type's mixer says which of its Linears
belong to a kind (`Mixer.adapter_targets`, e.g. attention -> q/k/v/o_proj, mamba_in -> in_proj), found
wherever such a mixer sits (also inside the gated and routed block types); `mlp` is every Linear of
each block's MLP, whatever its kind. peft receives the full module names, so nothing else matches.

peft wraps our `model.wgrad.Linear`: its LoRA dispatch (peft/tuners/lora/layer.py `dispatch_default`)
takes any `isinstance(base, nn.Linear)`, and the wrapper calls the base module's own forward.

The kernel path. A Linear whose `.weight` a fused kernel reads directly (listed in its mixer's
`unquantized_linears`) would run without its adapter there, so such a target is refused on the kernel
path (one line) rather than silently not adapted. Mamba2's fused scan hands an adapted out_proj its
output (model/mamba2.py), so `mamba_out` is adapted on both paths. The fused
SwiGLU concatenates gate and up only while both are plain Linears (`SwiGLU.fused_gate_up`): adapted,
they run as two GEMMs, so `mlp` is adapted on both paths.

Saved in peft's format (adapter_config.json + adapter_model.safetensors, `PeftModel.save_pretrained`);
`merge_adapter` folds an adapter into its base checkpoint's fp32 weights and writes a bundle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from config.loader import ConfigError
from config.sections import LoraConfig
from model.hybrid import HybridLM
from model.mixers import Mixer, block_types

ADAPTER_CONFIG = "adapter_config.json"
MLP_KIND = "mlp"


def adapter_kinds() -> list[str]:
    """Every target kind some registered block type (or the MLP) names."""
    kinds = {kind: None for cls in block_types().values() for kind in cls.adapter_targets}
    return [*kinds, MLP_KIND]


def target_modules(model: HybridLM, kinds: list[str]) -> list[str]:
    """Full names of the Linears of `kinds` in `model`; ConfigError for an unknown kind, a selection that
    matches nothing, or, on the kernel path, a Linear a fused kernel reads directly."""
    known = adapter_kinds()
    if unknown := [k for k in kinds if k not in known]:
        raise ConfigError(f"finetune.lora.targets: unknown target {unknown[0]!r}: choose among {', '.join(known)}")
    names: list[str] = []
    fused: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, Mixer):
            names += [f"{prefix}.{lin}" for kind in kinds for lin in module.adapter_targets.get(kind, ())]
            fused |= {f"{prefix}.{lin}" for lin in module.unquantized_linears}
    if MLP_KIND in kinds:
        names += [f"layers.{i}.mlp.{n}" for i, layer in enumerate(model.layers)
                  for n, m in layer.mlp.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError(f"finetune.lora.targets {kinds} match no Linear of this model (pattern "
                          f"{model.cfg.layer_pattern}): choose among {', '.join(known)}")
    if model.impl == "kernels" and (clash := sorted(fused.intersection(names))):
        raise ConfigError(f"finetune.lora.targets: {clash[0]} is read directly by a fused kernel on the kernel path, "
                          "so its adapter would be ignored: drop that target or set model.impl=reference")
    return names


def apply_lora(model: HybridLM, cfg: LoraConfig, base: str | Path | None = None) -> Any:
    """`model` wrapped by peft with fresh adapters (B = 0: the output is the base model's at first) on
    `cfg.targets`; every other parameter frozen. `base`: the checkpoint recorded in adapter_config.json."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                            target_modules=target_modules(model, cfg.targets))
    wrapped = get_peft_model(model, config)
    # get_peft_model takes the base's name from a transformers model's `name_or_path`; ours is a folder
    wrapped.peft_config["default"].base_model_name_or_path = str(Path(base).resolve()) if base is not None else None
    return wrapped


def trainable_fraction(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts (tied tensors once)."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_adapter(peft_model: Any, state: dict[str, torch.Tensor], folder: Path) -> None:
    """peft's adapter files of `state` (trainable parameters by the wrapped model's names, fp32) into `folder`."""
    peft_model.save_pretrained(str(folder), state_dict=state)


def adapter_base(adapter_dir: Path) -> Path:
    """The base checkpoint an adapter folder names (ConfigError when it is no adapter folder)."""
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise ConfigError(f"--merge {adapter_dir}: no {ADAPTER_CONFIG} there (pass a LoRA run's final/ or step folder's "
                          "adapter/)")
    base = json.loads(path.read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{path} names no base_model_name_or_path: pass --checkpoint BASE")
    return Path(base)


def merged_model(base: HybridLM, adapter_dir: Path) -> HybridLM:
    """`base` (fp32, modified in place) with the adapter in `adapter_dir` folded into its weights."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
