"""Weight-only quantization of the block Linears: int8 / NF4 (bitsandbytes), int8 / int4 (torchao).

What is quantized: every nn.Linear inside `model.layers` (Mamba2 in_proj and out_proj, attention q/k/v/o,
SwiGLU gate/up/down) except those a mixer names in `unquantized_linears` (the routed block's router).
A quantized Mamba2 out_proj runs its own forward on the fused scan's output (model/mamba2.py). The
embedding, the (untied) LM head, norms, conv and dt/A/D stay in the checkpoint's dtype.

Methods (what runs where with bitsandbytes 0.50.2 and torchao 0.18):
    bnb-int8      bitsandbytes LLM.int8 (Linear8bitLt, threshold 0: pure int8 weights, per-row
                  scales)                                   CPU and CUDA
    bnb-nf4       bitsandbytes NF4 (Linear4bit, double-quantized absmax per `group_size` block)
                                                            CPU and CUDA
    torchao-int8  torchao Int8WeightOnlyConfig (Int8Tensor, per-row scales)   CPU and CUDA
    torchao-int4  torchao Int4WeightOnlyConfig, tinygemm tile-packed int4 groups, bfloat16
                  activations                              CUDA only (tinygemm kernel); the plain
                  packing format needs the `mslk` package, which has no CPU build here

On disk (the folder `save_quantized` writes, `load_quantized` reads) is a Hugging Face Bamba folder
whose config.json carries transformers' own quantization config, so
`AutoModelForCausalLM.from_pretrained(folder)` loads it through transformers' bitsandbytes / torchao
quantizers (tensor names are Bamba's, export/hf.py):
    model.safetensors    bitsandbytes: the modules' own state-dict tensors (int8 weight + SCB, or
                         packed uint8 NF4 weight + weight.absmax/quant_map/nested_*/quant_state.*),
                         the layout transformers' Bnb8Bit/Bnb4BitHfQuantizer read back;
                         torchao: the tensor subclasses flattened by torchao.prototype.safetensors
                         (`<module>._weight_<attr>` tensors, the subclass type and attributes in the
                         safetensors header metadata), which TorchAoHfQuantizer reads back
    config.json          BambaConfig + quantization_config (BitsAndBytesConfig / TorchAoConfig, the
                         unquantized Linears in its skip list)
    hybrid_lm_config.json  the resolved ModelConfig
    quantization.json    {"method", "group_size", "dtype", "modules": [...quantized names...], versions}
"""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from config.atomic import atomic_write_json
from export import ExportError
from export.hf import OUR_CONFIG_NAME, bamba_config, check_exportable, hf_key, our_key
from model.config import ModelConfig
from model.hybrid import HybridLM
from model.weights import WEIGHTS_NAME

QUANT_CONFIG = "quantization.json"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantMethod:
    name: str
    library: str
    bits: int
    cuda_only: bool
    summary: str


METHODS = {m.name: m for m in (
    QuantMethod("bnb-int8", "bitsandbytes", 8, False, "bitsandbytes LLM.int8 weights (Linear8bitLt, threshold 0)"),
    QuantMethod("bnb-nf4", "bitsandbytes", 4, False, "bitsandbytes NF4 weights (Linear4bit, double-quantized scales)"),
    QuantMethod("torchao-int8", "torchao", 8, False, "torchao int8 weight-only (Int8Tensor, per-row scales)"),
    QuantMethod("torchao-int4", "torchao", 4, True, "torchao int4 weight-only (tinygemm tile-packed groups, bf16)"),
)}


def resolve_method(fmt: str, int8_backend: str = "torchao") -> QuantMethod:
    """--format int8|nf4|int4 -> the method that implements it."""
    if fmt == "int8":
        return METHODS["bnb-int8" if int8_backend == "bitsandbytes" else "torchao-int8"]
    if fmt == "nf4":
        return METHODS["bnb-nf4"]
    if fmt == "int4":
        return METHODS["torchao-int4"]
    raise ExportError(f"unknown quantization format {fmt!r}; choose int8, nf4 or int4")


def check_runnable(method: QuantMethod, device: torch.device) -> None:
    """ExportError (one line) when `method` cannot run on `device`."""
    if method.cuda_only and device.type != "cuda":
        raise ExportError(
            f"{method.name} needs CUDA (torchao's int4 tinygemm kernel has no CPU build here); "
            "run it on a GPU machine, or use --format nf4 / int8 on CPU"
        )


def quantizable_linears(model: HybridLM) -> list[str]:
    """Names of the Linears that get quantized (see the module docstring for the one exception)."""
    names, raw = [], _unquantized_linears(model)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith("layers.") and name not in raw:
            names.append(name)
    return names


def _unquantized_linears(model: HybridLM) -> set[str]:
    """Linears each mixer keeps unquantized (`Mixer.unquantized_linears`, e.g. the routed block's router)."""
    return {f"layers.{i}.mixer.{n}" for i, layer in enumerate(model.layers) for n in layer.mixer.unquantized_linears}


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _bnb_module(method: QuantMethod, linear: nn.Linear, group_size: int, device: torch.device) -> nn.Module:
    """A bitsandbytes Linear holding `linear`'s weight, quantized on the move to `device`."""
    import bitsandbytes as bnb

    w = linear.weight.detach().cpu()
    if method.name == "bnb-int8":
        mod = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False,
                                  has_fp16_weights=False, threshold=0.0)
        mod.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        mod = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=w.dtype,
                                quant_type="nf4", compress_statistics=True)
        mod.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=group_size, quant_type="nf4",
                                       compress_statistics=True, module=mod)
        _cpu_packing_guard(mod)
    return mod.to(device)


def _cpu_packing_guard(mod: nn.Module) -> None:
    """bitsandbytes' AVX512-bf16 CPU repacking asserts out_features % 32 == 0 (the Mamba2 in_proj's
    [z, x, B, C, dt] width often is not): such layers take its generic dequantize-and-matmul path."""
    mod.support_avx512bf16_for_cpu = mod.support_avx512bf16_for_cpu and mod.out_features % 32 == 0


def _torchao_config(method: QuantMethod, group_size: int):
    import torchao.quantization as tq

    if method.name == "torchao-int8":
        return tq.Int8WeightOnlyConfig(version=2)  # Int8Tensor; torchao 0.17 defaults to version 1 (not savable)
    return tq.Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")


@torch.no_grad()
def quantize_model(model: HybridLM, method: QuantMethod, group_size: int, device: torch.device) -> HybridLM:
    """Quantize `model`'s block Linears in place (on `device`) and return it in eval mode."""
    check_runnable(method, device)
    names = quantizable_linears(model)
    for name in names:
        in_features = model.get_submodule(name).in_features
        if method.bits == 4 and in_features % group_size:
            raise ExportError(f"export.quant_group_size={group_size} does not divide {name}'s {in_features} "
                              "input features; choose 32, 64, 128 or 256 that does")
    model.to(device)
    if method.name == "torchao-int4":
        model.to(torch.bfloat16)  # tinygemm runs bf16 activations only
    if method.library == "bitsandbytes":
        for name in names:
            _swap(model, name, _bnb_module(method, model.get_submodule(name), group_size, device))
    else:
        from torchao.quantization import quantize_

        keep = set(names)
        quantize_(model, _torchao_config(method, group_size), filter_fn=lambda m, fqn: fqn in keep)
    return model.eval()


def hf_quantization_config(model: HybridLM, method: QuantMethod, group_size: int) -> dict:
    """transformers' own quantization config of `method` (config.json's quantization_config); its skip
    list names the Linears left in float (the head, any a mixer keeps) under Bamba's names."""
    from transformers import BitsAndBytesConfig, TorchAoConfig

    quantized = set(quantizable_linears(model))
    pattern = model.cfg.layer_pattern
    skip = ["lm_head"] + [hf_key(f"{name}.weight", pattern).removesuffix(".weight")
                          for name, mod in model.named_modules()
                          if isinstance(mod, nn.Linear) and name.startswith("layers.") and name not in quantized]
    if method.name == "bnb-int8":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0, llm_int8_skip_modules=skip)
    elif method.name == "bnb-nf4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=model.embed.weight.dtype, llm_int8_skip_modules=skip)
    else:
        config = TorchAoConfig(_torchao_config(method, group_size), modules_to_not_convert=skip)
    return config.to_dict()


def save_quantized(model: HybridLM, method: QuantMethod, group_size: int, out_dir: str | Path,
                   special_ids: dict[str, int | None] | None = None) -> Path:
    """Write model.safetensors + config.json + hybrid_lm_config.json + quantization.json (format: module
    docstring); `special_ids` (pad/bos/eos_token_id) go into the Bamba config."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pattern = model.cfg.layer_pattern
    state = {hf_key(k, pattern): v.detach().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": "pt"}
    if method.library == "torchao":
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        state, metadata = flatten_tensor_state_dict(state)
        metadata = {"format": "pt", **metadata}
    tmp = out / f".{WEIGHTS_NAME}.tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    tmp.replace(out / WEIGHTS_NAME)
    ours = model.cfg.model_dump(mode="json")
    try:
        check_exportable(model.cfg)
    except ExportError as exc:  # e.g. qk_norm: Bamba cannot hold the model, so config.json is ours
        log.warning("%s; this quantized folder loads here only", str(exc).split(";")[0])
        atomic_write_json(out / "config.json", ours)
    else:
        hf_cfg = bamba_config(model.cfg, model.embed.weight.dtype, special_ids or {})
        hf_cfg.quantization_config = hf_quantization_config(model, method, group_size)
        hf_cfg.save_pretrained(str(out))
    atomic_write_json(out / OUR_CONFIG_NAME, ours)
    atomic_write_json(out / QUANT_CONFIG, {
        "method": method.name,
        "bits": method.bits,
        "group_size": group_size,
        "dtype": str(model.embed.weight.dtype).removeprefix("torch."),
        "modules": quantizable_linears(model),
        "versions": {pkg: md.version(pkg) for pkg in ("torch", method.library)},
    })
    return out


def is_quantized_folder(folder: str | Path) -> bool:
    return (Path(folder) / QUANT_CONFIG).is_file()


@torch.no_grad()
def load_quantized(folder: str | Path, device: torch.device) -> HybridLM:
    """Rebuild a model written by `save_quantized` on `device` (eval mode, execution path chosen)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    info = json.loads((folder / QUANT_CONFIG).read_text())
    if info.get("method") not in METHODS:
        raise ExportError(f"{folder}/{QUANT_CONFIG}: unknown method {info.get('method')!r}")
    method = METHODS[info["method"]]
    check_runnable(method, device)
    cfg = ModelConfig.model_validate(json.loads((folder / OUR_CONFIG_NAME).read_text()))
    path = str(folder / WEIGHTS_NAME)
    state = load_file(path, device=str(device))
    with torch.device("meta"):
        model = HybridLM(cfg)
    model.to(getattr(torch, info["dtype"]))
    if method.library == "torchao":
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        with safe_open(path, framework="pt") as fh:
            state, leftover = unflatten_tensor_state_dict(state, fh.metadata())
        if leftover:
            raise ExportError(f"{path}: tensors without torchao metadata, e.g. {sorted(leftover)[:3]}")
    state = {our_key(k): v for k, v in state.items()}
    expected_missing: set[str] = set()
    if method.library == "bitsandbytes":  # plain tensors first, then the modules built from their own tensors
        owned = [k for k in state if any(k.startswith(f"{name}.") for name in info["modules"])]
        quantized = {k: state.pop(k) for k in owned}
        expected_missing = {f"{name}.weight" for name in info["modules"]}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if set(missing) != expected_missing or unexpected:
        raise ExportError(f"{path} does not fit its config: missing {sorted(set(missing) - expected_missing)[:3]}, "
                          f"unexpected {unexpected[:3]}")
    if method.library == "bitsandbytes":
        for name in info["modules"]:
            _swap(model, name, _load_bnb_module(method, quantized, name, device))
    model.set_impl()
    return model.eval()


def _load_bnb_module(method: QuantMethod, state: dict[str, torch.Tensor], name: str, device: torch.device) -> nn.Module:
    """A bitsandbytes Linear from its saved (already quantized) tensors."""
    import bitsandbytes as bnb

    weight = state[f"{name}.weight"]
    if method.name == "bnb-int8":
        out_f, in_f = weight.shape
        mod = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False, threshold=0.0, device="meta")
        mod.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False, CB=weight,
                                       SCB=state[f"{name}.SCB"])
        return mod
    prefix = f"{name}.weight."
    stats = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    mod = bnb.nn.Linear4bit(1, 1, bias=False, quant_type="nf4", device="meta")
    mod.weight = bnb.nn.Params4bit.from_prequantized(weight, stats, device=device, module=mod)
    out_f, in_f = mod.weight.quant_state.shape
    mod.in_features, mod.out_features = in_f, out_f
    mod.compute_dtype = mod.weight.quant_state.dtype
    mod.compute_type_is_set = True
    _cpu_packing_guard(mod)
    return mod
