"""The hybrid wrapper of a pretrained transformer (adapt/): randomly initialised tiny Llama and Qwen2 bases,
built offline. At init the wrapped logits are the base's; a cached decode equals the full forward; only the added
parameters reach the optimizer and the added weights save and load alone; the adapt section of the run config and
its errors; launch/adapt.py trains under the deepspeed launcher, resumes exactly and generates."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from adapt.wrapper import AdaptedLM, load_adapted, wrap
from config.loader import ConfigError, load
from config.schema import RunConfig, load_run_config
from config.sections import AdaptConfig
from model.bundle import load_tokenizer
from tests.train.conftest import run_env
from train.metrics import read_metrics
from train.optim import param_groups

REPO = Path(__file__).resolve().parents[2]
ADAPT_SCRIPT = REPO / "launch" / "adapt.py"
INIT_TOL = 1e-6  # float32 abs: the gate is exactly zero, so the sum is the base's output
DECODE_TOL = 1e-5  # float32 abs, logits of magnitude ~1
ADAPT = AdaptConfig(layers=2, memory_slots=4, mamba={"d_state": 16, "headdim": 16, "chunk_size": 8})


def base_config(family: str):
    from transformers import LlamaConfig, Qwen2Config

    shapes = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config}[family](**shapes)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def base_dir(request, tmp_path_factory, test_tokenizer_dir) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    AutoModelForCausalLM.from_config(base_config(request.param)).save_pretrained(str(folder))
    load_tokenizer(test_tokenizer_dir).save_pretrained(str(folder))
    return folder


def randomize_gates(model: AdaptedLM) -> None:
    with torch.no_grad():
        for added in model.added:
            added.gate.normal_(0.0, 1.0)


def test_init_equals_base(base_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    model = wrap(base_dir, ADAPT)
    ids = torch.randint(4, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = base(ids).logits, model(ids)
    assert float((got - ref).abs().max()) <= INIT_TOL
    added, total = model.trainable_fraction()
    assert added == sum(p.numel() for p in model.parameters() if p.requires_grad) and 0 < added < total
    assert model.layer_indices == [2, 3]
    randomize_gates(model)  # the added paths do reach the logits once the gate opens
    with torch.no_grad():
        assert float((model(ids) - ref).abs().max()) > 1e-3


def test_decode_equals_full_forward(base_dir):
    model = wrap(base_dir, ADAPT)
    randomize_gates(model)
    ids = torch.randint(4, 512, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        logits, cache = model.prefill(ids[:, :9])
        errors = [float((logits - full[:, 8]).abs().max())]
        for j in range(9, ids.size(1)):
            errors.append(float((model.step(ids[:, j], cache) - full[:, j]).abs().max()))
        # A left-padded row decodes as it does alone (padding is its own document for Mamba2).
        short = ids[1:, :6]
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)
        mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(short)], dim=1)
        alone, _ = model.prefill(short)
        with_pad, _ = model.prefill(padded, mask)
    assert max(errors) <= DECODE_TOL, errors
    assert float((alone - with_pad).abs().max()) <= DECODE_TOL


@pytest.mark.parametrize("base_dir", ["llama"], indirect=True)  # the wrapper code is family-agnostic
def test_optimizer_gets_only_added_parameters_and_they_save_alone(base_dir, tmp_path):
    model = wrap(base_dir, ADAPT)
    groups = param_groups(model, weight_decay=0.1)  # what build_engine hands DeepSpeed's optimizer
    in_optimizer = [id(p) for g in groups for p in g["params"]]
    assert sorted(in_optimizer) == sorted(id(p) for p in model.added.parameters())
    assert not any(p.requires_grad for p in model.base.parameters() if id(p) not in set(in_optimizer))
    randomize_gates(model)
    assert set(model.block_statistics()) == {"layers.2.gate_abs_mean", "layers.3.gate_abs_mean"}

    model.save_added(tmp_path / "adapter")
    saved = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert saved == {"adapter.safetensors", "adapter_config.json"}
    back = load_adapted(tmp_path / "adapter")
    ids = torch.randint(4, 512, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back(ids), model.eval()(ids))
    # A trainer's master copies replace the module's values in the file.
    masters = {k: torch.full_like(v, 0.5) for k, v in model.added.state_dict().items()}
    model.save_added(tmp_path / "masters", masters)
    assert all(bool((v == 0.5).all()) for v in load_adapted(tmp_path / "masters").added.state_dict().values())


@pytest.fixture(scope="module")
def adapt_cli():
    spec = importlib.util.spec_from_file_location("launch_adapt", ADAPT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("base_dir", ["llama"], indirect=True)  # the wrapper code is family-agnostic
def test_flops_per_token_counts_the_weight_matmuls(base_dir):
    """Against torch's FLOP counter over one forward + backward: its matrix products (the weights'; the
    attention scores and the SSD are other ops) are at most the formula, which also counts the lowest adapted
    layer's attention input gradients that autograd skips, conv and elementwise weights: within 6%."""
    from torch.utils.flop_counter import FlopCounterMode

    from adapt.training import adapt_flops_per_token

    model = wrap(base_dir, ADAPT).train()
    ids = torch.randint(4, 512, (2, 9), generator=torch.Generator().manual_seed(3))
    with FlopCounterMode(display=False) as counter:
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
    matmuls = sum(c for op, c in counter.get_flop_counts()["Global"].items() if str(op) in ("aten.mm", "aten.addmm"))
    assert 1.0 <= adapt_flops_per_token(model) / (matmuls / ids[:, :-1].numel()) <= 1.06


# ---- the run config ---------------------------------------------------------------------------------------------
def test_adapt_is_a_section_of_the_run_config():
    cfg = load_run_config(None, ["adapt.base=/models/qwen", "adapt.layers=2", "adapt.mamba.d_state=16"])
    assert cfg.model is None and cfg.adapt.layers == 2 and cfg.adapt.mamba.d_state == 16
    assert load(RunConfig, None, [], defaults=cfg.model_dump(mode="json")) == cfg  # run_config.yaml loads back


@pytest.mark.parametrize("sets, key", [
    (["adapt.base=/b", "model.preset=tiny"], "model: adapt.base is set"),  # it would change nothing: refused
    (["adapt.base=/b", "train.cuda_graph=true"], "train.cuda_graph: not supported for a wrapped transformer"),
    (["adapt.base=/b", "train.precision=fp8"], "train.precision=fp8: not supported"),
    (["adapt.base=/b", "adapt.layers=0"], "adapt.layers"),
    (["train.lr=1e-3"], "model: required key is missing"),  # every other run still needs its architecture
])
def test_config_errors_name_the_key(sets, key):
    with pytest.raises(ConfigError, match=re.escape(key)) as info:
        load_run_config(None, sets)
    assert len(str(info.value).splitlines()) == 1


def test_cli_config_needs_the_base_and_takes_the_flags(adapt_cli, tmp_path):
    with pytest.raises(ConfigError, match=re.escape("adapt.base is not set: pass --base HF_DIR")):
        adapt_cli.run_config(adapt_cli.parse_args(["--data", "d.jsonl"]))
    cfg = adapt_cli.run_config(adapt_cli.parse_args(["--base", "/b", "--data", "d.jsonl", "--output", str(tmp_path),
                                                     "--set", "adapt.layers=3"]))
    assert (cfg.adapt.base, cfg.adapt.data, cfg.train.output_dir, cfg.adapt.layers) == ("/b", "d.jsonl", str(tmp_path), 3)


@pytest.mark.parametrize("base_dir", ["llama"], indirect=True)  # the wrapper code is family-agnostic
@pytest.mark.parametrize("sets, message", [
    (["adapt.layers=9"], "adapt.layers (9) is more than the base's 4 decoder layers"),
    (["adapt.mamba.headdim=48"], "adapt.mamba"),
    (["train.ds_config=ds_configs/zero3.json"], "train.ds_config: ZeRO-3 would partition the frozen base"),
])
def test_trainer_refuses_before_the_processes_start(base_dir, tmp_path, sets, message):
    from adapt.training import AdaptTrainer

    cfg = load_run_config(None, [f"adapt.base={base_dir}", f"adapt.data={tmp_path / 'd.jsonl'}", *sets])
    with pytest.raises(ConfigError, match=re.escape(message)):
        AdaptTrainer(cfg, "auto")


# ---- launched runs ------------------------------------------------------------------------------------------------
RUN_SETS = ["train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_tokens=128", "train.max_steps=4",
            "train.warmup_steps=0", "train.lr=1e-2", "train.precision=fp32", "train.eval_every=2",
            "train.eval_sequences=4", "train.save_every=2", "train.log_every=1", "train.wandb.mode=disabled",
            "adapt.layers=2", "adapt.memory_slots=4", "adapt.mamba.d_state=16", "adapt.mamba.headdim=16",
            "adapt.val_fraction=0.2"]


def write_text_records(path: Path, n: int = 60) -> Path:
    path.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n" for i in range(n)))
    return path


def adapt_cmd(base: Path, data: Path, out: Path, resume: str, processes: int) -> list[str]:
    """`deepspeed --num_gpus N launch/adapt.py ...` (gloo processes on CPU), or plain python for one process."""
    from bench.scale_runs import deepspeed_cmd

    if processes == 1:
        head = [sys.executable, str(ADAPT_SCRIPT)]
    else:
        ds = deepspeed_cmd(processes, "unused", [], resume, out)
        head = ds[: ds.index(str(REPO / "launch" / "pretrain.py"))] + [str(ADAPT_SCRIPT)]
    return [*head, "--base", str(base), "--data", str(data), "--output", str(out), "--resume", resume,
            *[a for s in RUN_SETS for a in ("--set", s)]]


@pytest.mark.parametrize("base_dir", ["llama"], indirect=True)  # the wrapper code is family-agnostic
@pytest.mark.slow
def test_launched_run_trains_only_added_resumes_on_one_process_and_generates(base_dir, tmp_path, adapt_cli, capsys):
    """Two gloo processes under the deepspeed launcher for 4 steps (checkpoints at 2 and 4); then one process
    resumed from step 2 (a universal checkpoint: the world size changed) repeats steps 3 and 4."""
    import subprocess

    data = write_text_records(tmp_path / "train.jsonl")
    first, second = tmp_path / "a", tmp_path / "b"
    for out, resume, processes in ((first, "auto", 2), (second, str(first / "checkpoints" / "step_00000002"), 1)):
        proc = subprocess.run(adapt_cmd(base_dir, data, out, resume, processes), cwd=REPO, env=run_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    m, again = read_metrics(first), read_metrics(second)
    assert sorted(s for s in m if "loss" in m[s]) == [1, 2, 3, 4] and "val_loss" in m[2] and m[4]["tokens_per_s"] > 0
    assert "blocks/layers.3.gate_abs_mean" in m[4]
    for step in (3, 4):  # the same optimisation up to float summation order (2 ranks -> 1)
        assert again[step]["loss"] == pytest.approx(m[step]["loss"], rel=1e-5), step

    state = torch.load(first / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["module"] and all(".added." in k or k.startswith("added.") for k in state["module"])  # no frozen base
    final = first / "final"
    assert {p.name for p in final.iterdir()} == {"adapter.safetensors", "adapter_config.json", "run_config.yaml",
                                                 "adapt_report.json", "meta.json"}
    report = json.loads((final / "adapt_report.json").read_text())
    assert report["steps"] == 4 and report["adapted layers"] == [2, 3] and 0 < report["trainable fraction"] < 0.2
    assert (report["first loss"], report["last loss"]) == (m[1]["loss"], m[4]["loss"])
    trained = load_adapted(first)  # the run folder: its final/ is read
    assert all(bool(added.gate.abs().max() > 0) for added in trained.added)  # the gates opened from zero
    capsys.readouterr()
    assert adapt_cli.main(["--adapter", str(first), "--prompt", "def f(x):", "--max-new-tokens", "5"]) == 0
    assert len(json.loads(capsys.readouterr().out)["completions"]) == 1


@pytest.mark.parametrize("base_dir", ["llama"], indirect=True)  # the wrapper code is family-agnostic
@pytest.mark.slow
def test_bad_records_are_one_line(base_dir, tmp_path):
    import subprocess

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "x"}) + "\n")
    proc = subprocess.run(adapt_cmd(base_dir, data, tmp_path / "o", "auto", 1), cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and 'must be an object with a "text" string' in err[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
