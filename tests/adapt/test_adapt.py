"""The hybrid wrapper of a pretrained transformer (adapt/): randomly initialised tiny Llama and Qwen2 bases,
built offline. At init the wrapped logits are the base's; a cached decode equals the full forward; training
changes only the added parameters; the added weights save and load alone; launch/adapt.py trains and generates."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from adapt.training import train_added
from adapt.wrapper import AdaptedLM, load_adapted, wrap
from config.sections import AdaptConfig, TrainConfig
from model.bundle import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
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
def test_training_changes_only_added_parameters_and_they_save_alone(base_dir, tmp_path):
    model = wrap(base_dir, ADAPT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.randint(4, 512, (8, 17), generator=torch.Generator().manual_seed(2))
    cfg = TrainConfig(seq_len=16, micro_batch_size=2, max_steps=3, lr=1e-2, warmup_steps=0)
    records = train_added(model, lambda i: windows[i % 8], cfg)
    assert [r["step"] for r in records] == [1, 2, 3]
    after = model.state_dict()
    added_keys = {k for k in after if ".added." in k or k.startswith("added.")}
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and changed <= added_keys  # the base never moves
    assert any(k.endswith("gate") for k in changed) and any("mamba.in_proj" in k for k in changed)

    model.save_added(tmp_path / "adapter")
    saved = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert saved == {"adapter.safetensors", "adapter_config.json"}
    back = load_adapted(tmp_path / "adapter")
    ids = windows[:2, :12]
    with torch.no_grad():
        assert torch.equal(back(ids), model.eval()(ids))


@pytest.fixture(scope="module")
def adapt_cli():
    spec = importlib.util.spec_from_file_location("launch_adapt", REPO / "launch" / "adapt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("base_dir", ["llama"], indirect=True)  # the wrapper code is family-agnostic
@pytest.mark.slow
def test_cli_trains_then_generates(base_dir, tmp_path, adapt_cli, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n" for i in range(40)))
    out = tmp_path / "out"
    sets = ["train.seq_len=32", "train.micro_batch_size=2", "train.max_steps=2", "train.warmup_steps=0",
            "adapt.layers=1", "adapt.mamba.d_state=16", "adapt.mamba.headdim=16"]
    rc = adapt_cli.main(["--base", str(base_dir), "--data", str(data), "--output", str(out),
                         *[a for s in sets for a in ("--set", s)]])
    assert rc == 0
    report = json.loads((out / "adapt_report.json").read_text())
    assert 0 < report["trainable fraction"] < 0.2 and report["adapted layers"] == [3]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()
    assert adapt_cli.main(["--adapter", str(out), "--prompt", "def f(x):", "--max-new-tokens", "5"]) == 0
    assert len(json.loads(capsys.readouterr().out)["completions"]) == 1


@pytest.mark.parametrize("base_dir", ["llama"], indirect=True)  # the wrapper code is family-agnostic
@pytest.mark.parametrize("problem, message", [
    ("no_text", 'must be an object with a "text" string'),
    ("too_many_layers", "adapt.layers (9) is more than the base's 4 decoder layers"),
])
def test_bad_input_is_one_line(problem, message, base_dir, tmp_path, adapt_cli, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "x"} if problem == "no_text" else {"text": "x " * 200}) + "\n")
    rc = adapt_cli.main(["--base", str(base_dir), "--data", str(data), "--output", str(tmp_path / "o"),
                         "--set", f"adapt.layers={9 if problem == 'too_many_layers' else 1}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()
