"""Float8 training (train/fp8.py) on CPU: config validation, which Linears the rule converts, the refusals,
the checkpoint layout, and the composition with fused_wgrad, CUDA graphs and the fused SwiGLU.

CPUs have no float8 GEMM: torchao's `emulate` runs the same casts and scales with the products in
float32, which checks everything around the GEMMs. The float8 numerics and speed are measured on a GPU
(bench/fp8_train.py)."""

from __future__ import annotations

import collections
import contextlib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from config.loader import ConfigError
from config.schema import RunConfig, load_run_config
from config.sections import FP8Config, TrainConfig
from model import HybridLM, ModelConfig
from train.ds_config import build_ds_config
from train.fp8 import check_fp8_device, check_fp8_zero_stage, convert_to_fp8, fp8_plan, step_weights
from train.fp8_linear import E4M3, cast
from train.graph_step import EagerReplayGraphs, GraphedLM, graph_training_forward
from train.trainer import Trainer, build_model

from .conftest import PRETRAIN, REPO, run_env


def small_config(ffn_hidden: int = 1040) -> ModelConfig:
    """Toy widths, but a SwiGLU hidden size (1040 > 1024) that passes torchao's tensorwise rule: gate and up
    of blocks 1 and 2 train in float8 (every other Linear of this model is too small)."""
    return ModelConfig(vocab_size=61, d_model=32, n_layers=4, pattern="MAMA", ffn_hidden=ffn_hidden,
                       attention={"n_heads": 4, "n_kv_heads": 2}, tie_embeddings=False, impl="reference",
                       mamba={"d_state": 8, "headdim": 8, "expand": 2, "n_groups": 2, "d_conv": 4, "chunk_size": 4})


STEP_CASTS = FP8Config(casts="once", weight_casts="step")
FLOAT8 = ["layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.2.mlp.gate_proj", "layers.2.mlp.up_proj"]


def small_model(cls: type[HybridLM] = HybridLM, dtype: torch.dtype = torch.float32) -> HybridLM:
    torch.manual_seed(0)
    model = cls(small_config()).to(dtype).train()
    model.set_impl("reference")
    return model


def meta_model(preset: str) -> HybridLM:
    with torch.device("meta"):
        return HybridLM(ModelConfig(preset=preset))


def dequant(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return data.to(torch.float64) / scale.to(torch.float64)


def kinds(names: list[str]) -> dict[str, int]:
    return dict(collections.Counter(n.split(".", 2)[2] for n in names))


# ---- config -------------------------------------------------------------------------------------------
def test_config_fp8_runs_deepspeed_in_bf16_and_rejects_bad_settings() -> None:
    cfg = load_run_config("tiny", ["train.precision=fp8", "train.fp8.recipe=rowwise", "train.fp8.bf16_last_blocks=2"])
    assert (cfg.train.fp8.recipe, cfg.train.fp8.bf16_first_blocks, cfg.train.fp8.bf16_last_blocks) == ("rowwise", 1, 2)
    assert build_ds_config(cfg.train, 1, on_cuda=True)["bf16"]["enabled"] is True  # bf16 weights, fp32 master copy
    with pytest.raises(ConfigError, match="train.fp8.recipe"):
        load_run_config("tiny", ["train.precision=fp8", "train.fp8.recipe=delayed"])
    with pytest.raises(ConfigError, match="keeps all 6 blocks in bf16"):
        load_run_config("tiny", ["train.precision=fp8", "train.fp8.bf16_first_blocks=3",
                                 "train.fp8.bf16_last_blocks=3"])
    assert load_run_config("tiny", ["train.precision=fp8", "train.fp8.casts=once"]).train.fp8.casts == "once"
    with pytest.raises(ConfigError, match="train.fp8: casts=once implements the tensorwise recipe only"):
        load_run_config("tiny", ["train.precision=fp8", "train.fp8.casts=once", "train.fp8.recipe=rowwise"])
    with pytest.raises(ConfigError, match="train.fp8: weight_casts=step needs casts=once"):
        load_run_config("tiny", ["train.precision=fp8", "train.fp8.weight_casts=step"])


# ---- the conversion rule --------------------------------------------------------------------------------
def test_plan_1_3b_tensorwise_and_rowwise() -> None:
    """1.3B (24 blocks, 18 Mamba2 + 6 attention, SwiGLU 2048 -> 5120): blocks 1-22; attention k/v (2048 -> 512,
    too small for tensorwise), the embedding and the LM head stay bf16; rowwise also keeps the N = 2048
    outputs (q, o, down, Mamba2 out_proj) in bf16."""
    model = meta_model("1.3b")
    tensorwise = fp8_plan(model, FP8Config())
    assert sorted({int(n.split(".")[1]) for n in tensorwise}) == list(range(1, 23))
    assert kinds(tensorwise) == {"mlp.gate_proj": 22, "mlp.up_proj": 22, "mlp.down_proj": 22,
                                 "mixer.in_proj": 18, "mixer.out_proj": 18, "mixer.q_proj": 4, "mixer.o_proj": 4}
    assert kinds(fp8_plan(model, FP8Config(recipe="rowwise"))) == {"mlp.gate_proj": 22, "mlp.up_proj": 22,
                                                                   "mixer.in_proj": 18}


def test_plan_follows_the_bf16_blocks_settings() -> None:
    model = meta_model("2.7b")
    names = fp8_plan(model, FP8Config(bf16_first_blocks=0, bf16_last_blocks=3))
    assert sorted({int(n.split(".")[1]) for n in names}) == list(range(29))
    assert not any("lm_head" in n for n in names)


def test_a_model_with_nothing_to_convert_is_refused() -> None:
    narrow = HybridLM(small_config(ffn_hidden=48))
    assert fp8_plan(narrow, FP8Config()) == []
    with pytest.raises(ConfigError, match="no linear layer of this model passes the float8 rule"):
        convert_to_fp8(narrow, FP8Config(), emulate=True)


@pytest.mark.slow
def test_the_trainer_builds_the_float8_model() -> None:
    """train.precision=fp8: the trainer's model has the plan's Linears swapped (with CUDA graphs, in the
    GraphedLM); bf16 builds plain Linears."""
    fp8 = RunConfig(model=small_config(), train=TrainConfig(precision="fp8", cuda_graph=True))
    model = build_model(fp8, torch.device("cpu"))
    assert isinstance(model, GraphedLM)
    assert [n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"] == FLOAT8
    plain = build_model(RunConfig(model=small_config()), torch.device("cpu"))
    assert not any(type(m).__name__ == "Float8Linear" for m in plain.modules())


# ---- refusals -------------------------------------------------------------------------------------------
def test_refused_without_float8_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="this run is on cpu: set train.precision=bf16"):
        check_fp8_device(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ConfigError, match="A100-SXM4-80GB has 8.0"):
        check_fp8_device(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_device(torch.device("cuda", 0))  # Hopper
    with pytest.raises(ConfigError, match="needs ZeRO stage 1 or 2"):
        check_fp8_zero_stage(3)


@pytest.mark.slow
def test_launch_on_cpu_stops_with_one_line(corpus: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(PRETRAIN), "--config", "tiny", "--dry-run",
                           "--set", f"data.manifest={corpus}", "--set", "model.vocab_size=512",
                           "--set", "train.precision=fp8", "--set", f"train.output_dir={tmp_path}",
                           "--set", "train.wandb.mode=disabled"],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "train.precision=fp8 needs an NVIDIA GPU" in last and "Traceback" not in proc.stderr


# ---- checkpoints ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("casts", ["torchao", "once"])
def test_checkpoint_layout_is_a_bf16_runs(casts: str) -> None:
    """The converted model holds the same Parameters: state_dict keys, dtypes and values are the bf16
    model's, and each loads the other's strictly (a float8 run resumes in bf16 and back)."""
    plain = small_model(dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    params = {id(p) for p in plain.parameters()}
    assert convert_to_fp8(plain, FP8Config(casts=casts), emulate=True) == FLOAT8
    swapped = {"torchao": "Float8Linear", "once": "Float8CastOnceLinear"}[casts]
    assert all(type(plain.get_submodule(n)).__name__ == swapped for n in FLOAT8)
    assert {id(p) for p in plain.parameters()} == params
    after = plain.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    fresh = small_model(dtype=torch.bfloat16)
    fresh.load_state_dict(after, strict=True)
    plain.load_state_dict(fresh.state_dict(), strict=True)


# ---- composition ----------------------------------------------------------------------------------------
def loss_of(model: HybridLM, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())


@pytest.mark.parametrize("casts", ["torchao", "once"])
def test_emulated_float8_step_is_close_to_bf16(casts: str) -> None:
    """The converted layers compute in float8 (not bf16: the outputs differ) with bf16-level accuracy: loss
    within 1% and the converted weights' gradients within 15% of the bf16 model's. A weight gradient is
    x (e4m3, 3 mantissa bits) times grad_output (e5m2, 2 bits: ~7% rms rounding error per element), so ~8% is
    expected: 0.092-0.103 measured (torch 2.13 on CPU, torch 2.11 on the H100 image); a wrong scale gives ~100%."""
    ids = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(1))
    ref, fp8 = small_model(dtype=torch.bfloat16), small_model(dtype=torch.bfloat16)
    convert_to_fp8(fp8, FP8Config(casts=casts), emulate=True)
    want, got = loss_of(ref, ids), loss_of(fp8, ids)
    want.backward()
    got.backward()
    assert got.item() != want.item()
    assert abs(got.item() - want.item()) < 0.01 * want.item()
    for name in FLOAT8:
        g, r = fp8.get_submodule(name).weight.grad.double(), ref.get_submodule(name).weight.grad.double()
        assert ((g - r).norm() / r.norm()).item() < 0.15, name


@pytest.mark.parametrize("casts", ["torchao", "once"])
def test_fused_wgrad_fold_gets_each_gradient_once(casts: str) -> None:
    """train.grad_fold=fused_wgrad binds a float32 main_grad on every parameter (train/grad_fold.py): the bf16
    layers add their weight gradients there; torchao's float8 layers hand theirs to autograd (folded by the
    hook), casts=once's add theirs to main_grad too. Each weight's gradient arrives by exactly one of the two,
    and their sum is the unbound gradient."""
    ids = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(2))
    model = small_model()
    convert_to_fp8(model, FP8Config(casts=casts), emulate=True)
    want = torch.autograd.grad(loss_of(model, ids), list(model.parameters()))
    for p in model.parameters():
        p.main_grad = torch.zeros_like(p, dtype=torch.float32)
    loss_of(model, ids).backward()
    for (name, p), w in zip(model.named_parameters(), want):
        module = name.rsplit(".", 1)[0]
        if module in FLOAT8 and casts == "torchao":
            assert p.grad is not None and not p.main_grad.any(), name
        elif name.endswith("proj.weight") or name == "lm_head.weight":
            assert p.grad is None and p.main_grad.any(), name
        got = p.main_grad + (p.grad if p.grad is not None else 0)
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fp8", [FP8Config(), FP8Config(casts="once"), STEP_CASTS], ids=["torchao", "once", "step"])
def test_cuda_graph_replays_float8_steps(fp8: FP8Config) -> None:
    """train.cuda_graph over float8 layers (the graph plumbing, with EagerReplayGraphs standing in for CUDA
    graphs): the replayed step's loss and gradients equal the eager float8 step's (weight_casts=step: captured
    and replayed inside a step, as the trainer does)."""
    model = small_model(GraphedLM)
    convert_to_fp8(model, fp8, emulate=True)
    steps = step_weights(model)
    gen = torch.Generator().manual_seed(3)
    ops = EagerReplayGraphs()
    with steps.step() if steps is not None else contextlib.nullcontext():
        graph_training_forward(model, torch.randint(0, 61, (2, 16), generator=gen), ops=ops, warmup=1)
        ids = torch.randint(0, 61, (2, 17), generator=gen)
        logits = HybridLM.forward(model, ids[:, :-1])
        want_loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        want = torch.autograd.grad(want_loss, list(model.parameters()))
        loss = loss_of(model, ids)
        loss.backward()
    assert (steps is not None) == (fp8.weight_casts == "step") and (steps is None or len(steps.entries) == 4)
    assert ops.replays == 2 and model.graphs.replays == 1
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("casts", ["torchao", "once"])
def test_float8_swiglu_keeps_the_fused_activation(casts: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the kernel path, float8 gate/up run their own GEMMs (torchao: two; casts=once: one over the joined
    weights with one scale) and mamba_ssm's fused SwiGLU takes their concatenated outputs (the activation's
    memory and kernels stay those of the bf16 path)."""
    model = small_model()
    convert_to_fp8(model, FP8Config(casts=casts), emulate=True)
    mlp = model.layers[1].mlp
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    if casts == "torchao":
        want = mlp(x)  # reference path: eager silu(gate) * up, each layer its own float8 GEMM
    else:  # the float64 product of x and the joined weights, each cast with one scale
        joined = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
        gate_up = dequant(*cast(x.reshape(-1, 32), E4M3)) @ dequant(*cast(joined, E4M3)).t()
        gate, up = gate_up.float().reshape(2, 5, -1).chunk(2, dim=-1)
        want = mlp.down_proj(F.silu(gate) * up)
    calls = []

    def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
        calls.append(gate_up.shape)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    monkeypatch.setattr("model.layers.mamba_ops", lambda: SimpleNamespace(swiglu=swiglu))
    mlp.impl = "kernels"
    assert not mlp.fused_gate_up() and mlp.swapped_gate_up()
    # float32 outputs: torchao's emulated GEMM is the reference path's own; casts=once's against float64
    torch.testing.assert_close(mlp(x), want, rtol=1e-6 if casts == "torchao" else 1e-5, atol=1e-6)
    assert calls == [torch.Size([2, 5, 2 * 1040])]


# ---- weights cast once per optimizer step (train.fp8.weight_casts=step) --------------------------------------
class FakeEngine:
    """What Trainer.step asks of DeepSpeed's engine: the model's forward, backward, and a step that updates
    the weights at the accumulation boundary (each call records whether the step's float8 copies were open)."""

    def __init__(self, model: HybridLM, accumulation: int) -> None:
        self.module, self.accumulation, self.calls = model, accumulation, []
        self.steps = step_weights(model)

    def __call__(self, input_ids: torch.Tensor, **inputs) -> torch.Tensor:
        self.calls.append(("forward", self.steps.open))
        return self.module(input_ids)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.calls.append(("backward", self.steps.open))

    def step(self) -> None:
        self.calls.append(("step", self.steps.open))
        if sum(c[0] == "step" for c in self.calls) % self.accumulation == 0:
            with torch.no_grad():
                for p in self.module.parameters():
                    p.add_(0.01 * p.grad if p.grad is not None else 0.0)
                    p.grad = None


def test_trainer_step_opens_the_step_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trainer.step recasts the float8 weights before a step's first micro-batch and keeps the copies open
    through its last backward and optimizer step; after it the layers cast per call again, and the next step's
    copies are of the updated weights."""
    model = small_model(dtype=torch.bfloat16)
    convert_to_fp8(model, STEP_CASTS, emulate=True)
    trainer = Trainer.__new__(Trainer)
    trainer.cfg = RunConfig(model=small_config(), train=TrainConfig(precision="fp8", fp8=STEP_CASTS))
    trainer.env = SimpleNamespace(device=torch.device("cpu"), world_size=1, rank=0)
    trainer.cp, trainer.accumulation, trainer.stop = SimpleNamespace(replicas=1), 2, SimpleNamespace(requested=False)
    trainer.engine, trainer.graph, trainer.fp8_weights = FakeEngine(model, 2), None, step_weights(model)
    monkeypatch.setattr("train.trainer.all_reduce_sum", lambda values: values)
    gen = torch.Generator().manual_seed(5)
    ids = [torch.randint(0, 61, (2, 17), generator=gen) for _ in range(2)]
    micro = [{"input_ids": i[:, :-1], "labels": i[:, 1:]} for i in ids]
    trainer.step(micro)
    assert trainer.engine.calls == [("forward", True), ("backward", True), ("step", True)] * 2
    assert not trainer.fp8_weights.open and len(trainer.fp8_weights.entries) == 4  # reference path: 4 layers
    gate = model.layers[1].mlp.gate_proj
    layers, cached = trainer.fp8_weights.entries[(id(gate),)]
    first = cached.data.clone()
    updated, _ = cast(gate.weight.detach(), E4M3)  # the weights the second step starts from
    trainer.step(micro)
    assert layers == (gate,) and not torch.equal(first.view(torch.uint8), updated.view(torch.uint8))
    assert torch.equal(cached.data.view(torch.uint8), updated.view(torch.uint8))
