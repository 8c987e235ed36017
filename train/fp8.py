"""Float8 training (train.precision=fp8): torchao's Float8Linear swapped in for the model's large linear
layers, from outside the model, as torchtitan applies it (torchtitan/components/quantization/float8.py).

A converted layer keeps its bf16 weight (the same Parameter: DeepSpeed's float32 master copy, optimizer
and checkpoint see no change; state_dict keys and dtypes are a bf16 run's) and, each forward and backward,
casts its input, weight and output gradient to float8 with scales computed on the device from the tensor
(dynamic scaling: no amax history, no host sync), then runs the GEMMs in float8 (torch._scaled_mm).

Which Linears train in float8 (`fp8_plan`), all of the following:
  1. inside a block that is neither among the first `train.fp8.bf16_first_blocks` nor the last
     `bf16_last_blocks` (Nemotron-H's recipe, arXiv:2504.03624 sec. 2.4, keeps the first and last GEMMs of
     the network in BF16; Megatron-LM's --first-last-layers-bf16 default is one layer at each end);
     the embedding and LM head are outside the blocks and always stay bf16;
  2. not among the mixer's `unquantized_linears` (a fused kernel reads the weight directly, or it is too small
     to gain); Mamba2's out_proj is converted: its fused scan then returns the normed output for the
     Float8Linear to project (model/mamba2.py);
  3. a shape float8 serves and where torchao's filter expects it to beat bf16: both dimensions multiples of 16
     (the float8 GEMM's requirement) and, by torchao's `_auto_filter_for_recipe` (weight (N, K) = (out, in)),
     tensorwise: not (K <= 4096 and N <= 1024); rowwise: N > 2048, K > 1024 and not (N <= 4096 and K <= 2048).
For the 1.3B (tensorwise; tests/train/test_fp8.py checks it): Mamba2 in_proj and out_proj, attention q and
o, SwiGLU gate, up and down of blocks 1-22; attention k and v (2048 -> 512) stay bf16.

With torchao's layers the converted SwiGLU's gate and up run as two float8 GEMMs whose concatenated outputs
feed the fused SwiGLU kernel (the concatenated GEMM of model/layers.py applies to plain Linears only). torchao's
Float8Linear hands its weight gradient to autograd as a bf16 tensor: with train.grad_fold=fused_wgrad those
weights fold like copy_free (their `main_grad` is unused), the bf16 layers keep the fused weight-gradient
GEMM. train.fp8.casts=once swaps in train/fp8_linear.py's layers instead (each tensor cast once, gate and up
as one GEMM, their weight gradients into a bound `main_grad` like the bf16 layers'; with
train.fp8.weight_casts=step each weight cast once per optimizer step: `step_weights`).

torch.compile: torchao's casts are several elementwise passes each in eager mode; compiled (per converted
Linear, train.fp8.compile) they fuse into one read and one write. The compiled code is captured by CUDA
graphs like the rest of the step (train/graph_step.py warms up before capturing, so compilation happens
outside the capture).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn

from config.loader import ConfigError
from train.fp8_linear import Casts, Float8CastOnceLinear, StepWeights

if TYPE_CHECKING:
    from config.sections import FP8Config
    from model.config import ModelConfig
    from model.hybrid import HybridLM

log = logging.getLogger(__name__)

MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9) and Hopper (9.0) onward
BLOCK = re.compile(r"^layers\.(\d+)\.")


def check_fp8_device(device: torch.device) -> None:
    """One-line ConfigError unless `device` has float8 GEMMs (CUDA, compute capability >= 8.9): no silent
    bf16 fallback."""
    if device.type != "cuda":
        raise ConfigError(f"train.precision=fp8 needs an NVIDIA GPU with float8 tensor cores (compute capability "
                          f">= 8.9: Ada, Hopper or newer); this run is on {device.type}: set train.precision=bf16")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ConfigError(f"train.precision=fp8 needs compute capability >= 8.9 (float8 tensor cores: Ada, Hopper or "
                          f"newer); {torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: "
                          "set train.precision=bf16")


def check_fp8_zero_stage(stage: int) -> None:
    """Float8 is run with ZeRO-1 and ZeRO-2 only: ZeRO-3 gathers each module's weights around its forward,
    and the float8 casts of gathered weights have never been run here (torchao supports FSDP2 instead)."""
    if stage == 3:
        raise ConfigError("train.precision=fp8 needs ZeRO stage 1 or 2 (train.ds_config is stage 3, never run with "
                          "float8): use ds_configs/zero1.json or zero2.json, or set train.precision=bf16")


def shape_filter(recipe: str) -> Callable[[nn.Module, str], bool]:
    """torchao's rule for (module, name): whether float8 can serve its shape and pays off (rule 3)."""
    from torchao.float8 import _auto_filter_for_recipe

    return _auto_filter_for_recipe(recipe, filter_fqns=[])


def fp8_plan(model: "HybridLM", fp8: "FP8Config") -> list[str]:
    """Names of the model's Linears that train in float8, by the module docstring's rule (no float8
    arithmetic: it runs on any device, and on a model built on the meta device)."""
    n_blocks = len(model.layers)
    kept = {f"layers.{i}.mixer.{name}" for i, layer in enumerate(model.layers)
            for name in layer.mixer.unquantized_linears}
    fits = shape_filter(fp8.recipe)
    names = []
    for name, mod in model.named_modules():
        block = BLOCK.match(name)
        if not isinstance(mod, nn.Linear) or block is None or name in kept:
            continue
        if fp8.bf16_first_blocks <= int(block.group(1)) < n_blocks - fp8.bf16_last_blocks and fits(mod, name):
            names.append(name)
    return names


def step_weight_params(model_cfg: "ModelConfig", fp8: "FP8Config") -> int:
    """Parameters whose float8 copies train.fp8.weight_casts=step keeps through each step (those of `fp8_plan`;
    0 with weight_casts=call), from a model on the meta device."""
    from model.hybrid import HybridLM

    if fp8.weight_casts != "step":
        return 0
    with torch.device("meta"):
        model = HybridLM(model_cfg)
    return sum(model.get_submodule(name).weight.numel() for name in fp8_plan(model, fp8))


def torchao_config(recipe: str, emulate: bool = False):  # -> torchao.float8.Float8LinearConfig
    """torchao's Float8LinearConfig of `recipe`; `emulate` runs the float8 GEMMs in float32 (any device:
    the CPU tests)."""
    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, emulate=True) if emulate else config


def convert_to_fp8(model: "HybridLM", fp8: "FP8Config", emulate: bool = False) -> list[str]:
    """Swap the Linears of `fp8_plan` in place (same Parameters) for torchao Float8Linears, compiled when
    train.fp8.compile (and not emulating), or with train.fp8.casts=once for train/fp8_linear.py's layers.
    Returns their names; ConfigError when the rule leaves none."""
    from torchao.float8 import convert_to_float8_training

    names = fp8_plan(model, fp8)
    if not names:
        raise ConfigError(f"train.precision=fp8: no linear layer of this model passes the float8 rule for "
                          f"train.fp8.recipe={fp8.recipe} (docs/fp8.md: too small, or all in the bf16 first/last "
                          "blocks); set train.precision=bf16")
    if fp8.casts == "once":
        # CPU runs torch's own float8 GEMM here: no emulation needed; emulate only keeps the casts eager
        casts = Casts(compile=fp8.compile and not emulate)
        if casts.compiled:
            _allow_recompiles(model, names)
        steps = StepWeights(casts) if fp8.weight_casts == "step" else None
        for name in names:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent)
            setattr(owner, child, Float8CastOnceLinear.swap(getattr(owner, child), casts, steps))
        return names
    chosen = set(names)
    convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: fqn in chosen,
                               config=torchao_config(fp8.recipe, emulate))
    if fp8.compile and not emulate:
        _compile(model, names, fp8.recipe)
    return names


def step_weights(model: nn.Module) -> StepWeights | None:
    """The per-step float8 weight cache of a model converted with train.fp8.weight_casts=step (the trainer opens
    its `step()` around each optimizer step's micro-batches), else None."""
    return next((m.step_weights for m in model.modules()
                 if isinstance(m, Float8CastOnceLinear) and m.step_weights is not None), None)


def _compile(model: "HybridLM", names: list[str], recipe: str) -> None:
    """torch.compile each converted Linear at fixed shapes."""
    if recipe == "rowwise":
        # torchtitan's setting for rowwise float8 (pytorch/pytorch#150859: inductor's casts must round
        # as eager's do, or the scales differ)
        import torch._inductor.config as inductor_config

        inductor_config.emulate_precision_casts = True
    _allow_recompiles(model, names)
    for name in names:
        model.get_submodule(name).compile(dynamic=False)


def _allow_recompiles(model: "HybridLM", names: list[str]) -> None:
    """Every converted layer shares the same compiled code (torchao's forward, or train/fp8_linear.py's cast
    functions), whose versions dynamo keys by its guards (shapes, dtypes, grad mode): the limit is raised to
    hold one per distinct weight shape in training and evaluation, so none falls back to eager casts."""
    import torch._dynamo.config as dynamo_config

    shapes = {tuple(model.get_submodule(n).weight.shape) for n in names}
    # x2: casts=once also casts SwiGLU's joined gate/up weights, one more shape per distinct gate shape
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 8 * len(shapes) + 8)
