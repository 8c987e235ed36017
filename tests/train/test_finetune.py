"""Fine-tuning (launch/finetune.py): records -> masked sequences, LoRA through peft, merge, bad input.

Unit tests run in process on the shared tiny bundle (tests/conftest.py); one launched 2-process
DeepSpeed run covers LoRA end to end: adapters in every checkpoint, base weights untouched, and a
resume from a step checkpoint that continues with the same losses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from config.loader import ConfigError
from config.sections import FinetuneConfig, LoraConfig
from model.bundle import load_bundle
from model.loss import IGNORE_INDEX, token_nll
from model.weights import load_weights
from model.wgrad import Linear
from train.finetune import checkpoint_tokenizer, merge_adapter
from train.finetune_data import FinetuneData, RecordEncoder, collate_padded
from train.lora import apply_lora, save_adapter, target_modules
from train.optim import param_groups

from .conftest import REPO, read_metrics, run_env

FINETUNE = REPO / "launch" / "finetune.py"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def qa_records(n: int = 12) -> list[dict]:
    return [{"prompt": f"def f{i}(x):\n", "response": f"    return x * {i}\n"} for i in range(n)]


@pytest.fixture()
def model(tiny_bundle_dir: Path):
    return load_weights(tiny_bundle_dir).float()


# ---- records -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bos", [False, True])
def test_loss_only_on_response_tokens_and_eos(tiny_bundle_dir: Path, model, bos: bool) -> None:
    encode = RecordEncoder(tiny_bundle_dir / "tokenizer.json", FinetuneConfig(bos=bos), seq_len=64)
    prompt, response = "def add(a, b):\n", "    return a + b\n"
    p = encode.tok.encode(prompt, add_special_tokens=False).ids
    r = encode.tok.encode(response, add_special_tokens=False).ids
    head = [encode.bos] * bos + p
    ex = encode(Path("x.jsonl"), 1, {"prompt": prompt, "response": response})
    assert ex.input_ids.tolist() == head + r
    assert ex.labels.tolist() == [IGNORE_INDEX] * (len(head) - 1) + r + [encode.eos]
    text = encode(Path("x.jsonl"), 2, {"text": prompt + response})
    whole = encode.tok.encode(prompt + response, add_special_tokens=False).ids
    assert text.labels.tolist() == (whole if bos else whole[1:]) + [encode.eos]  # every token scored

    batch = collate_padded([{"input_ids": ex.input_ids, "labels": ex.labels, "source": 0, "index": 0}], 64, encode.pad)
    assert (batch["labels"][0, len(ex.labels):] == IGNORE_INDEX).all()
    with torch.no_grad():
        logits = model.double()(batch["input_ids"])
    nll = token_nll(logits, batch["labels"], "reference")  # the trainer's per-target loss
    n = len(head) - 1
    assert (nll[0, :n] == 0).all() and (nll[0, len(ex.labels):] == 0).all()
    expected = F.cross_entropy(logits[0, n:len(ex.labels)], ex.labels[n:], reduction="none")
    torch.testing.assert_close(nll[0, n:len(ex.labels)].double(), expected, rtol=1e-6, atol=1e-6)


def test_records_split_and_order_is_a_function_of_the_sample(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    cfg = FinetuneConfig(data=str(write_jsonl(tmp_path / "d.jsonl", qa_records(20))), val_fraction=0.1)
    data = FinetuneData(cfg, tiny_bundle_dir / "tokenizer.json", seq_len=32, seed=3)
    assert (len(data.train), len(data.validation)) == (18, 2)
    first = [data.train[i]["input_ids"].tolist() for i in range(36)]
    assert sorted(map(tuple, first[:18])) == sorted(map(tuple, first[18:]))  # each epoch: every record once
    assert first[:18] != first[18:]  # reshuffled per epoch
    again = FinetuneData(cfg, tiny_bundle_dir / "tokenizer.json", seq_len=32, seed=3)
    assert [again.train[i]["input_ids"].tolist() for i in range(30, 36)] == first[30:]


# ---- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("records", "message"), [
    ([{"text": "a"}, {"question": "b"}], r"d.jsonl:2: the record has neither 'text' nor 'prompt' \+ 'response'"),
    ([], r"holds no record"),
    ([{"prompt": "x " * 80, "response": "y"}], r"d.jsonl:1: the prompt is \d+ tokens, train.seq_len is 32"),
    ([{"prompt": "x", "response": 3}], r"d.jsonl:1: 'response' is int, not a string"),
])
def test_bad_records_are_one_line_errors(tiny_bundle_dir: Path, tmp_path: Path, records: list, message: str) -> None:
    cfg = FinetuneConfig(data=str(write_jsonl(tmp_path / "d.jsonl", records)), val_fraction=0)
    with pytest.raises(ConfigError, match=message):
        FinetuneData(cfg, tiny_bundle_dir / "tokenizer.json", seq_len=32, seed=0)


def test_tokenizer_must_be_the_checkpoints(tiny_bundle_dir: Path, tmp_path: Path, corpus: Path) -> None:
    assert checkpoint_tokenizer(tiny_bundle_dir, str(tiny_bundle_dir / "tokenizer.json")).is_file()
    with pytest.raises(ConfigError, match="map tokens to different ids"):
        checkpoint_tokenizer(tiny_bundle_dir, str(corpus.parent / "tokenizer" / "tokenizer.json"))
    bare = shutil.copytree(tiny_bundle_dir, tmp_path / "bare", ignore=shutil.ignore_patterns("tokenizer.json"))
    with pytest.raises(ConfigError, match="has no tokenizer.json: fine-tuning tokenizes with the checkpoint's own"):
        checkpoint_tokenizer(bare)


def test_unknown_or_fused_targets_are_refused(model, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="unknown target 'ffn': choose among mamba_in, mamba_out, attention, mlp"):
        target_modules(model, ["ffn"])
    model.impl = "kernels"  # Mamba2's fused scan hands an adapted out_proj its output: accepted on both paths
    assert "layers.0.mixer.out_proj" in target_modules(model, ["mamba_out"])
    # a block type whose fused kernel read out_proj.weight itself would have its adapter ignored: refused
    monkeypatch.setattr(type(model.layers[0].mixer), "unquantized_linears", ("out_proj",))
    with pytest.raises(ConfigError, match="layers.0.mixer.out_proj is read directly by a fused kernel"):
        target_modules(model, ["mamba_out"])
    assert target_modules(model, ["mlp", "mamba_in"])


# ---- LoRA ------------------------------------------------------------------------------------------------
def steps(model: torch.nn.Module, n: int = 3) -> None:
    """n AdamW steps on a fixed batch with the trainer's parameter groups."""
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    ids = torch.randint(4, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    for _ in range(n):
        loss = token_nll(model(ids[:, :-1]), ids[:, 1:], "reference").mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_lora_trains_only_adapters_and_full_trains_everything(model) -> None:
    from peft.tuners.lora import Linear as LoraLinear

    before = {k: v.clone() for k, v in model.state_dict().items()}
    every = ["attention", "mamba_in", "mamba_out", "mlp"]
    targets = set(target_modules(model, every))
    wrapped = apply_lora(model, LoraConfig(targets=every))
    adapted = {n.removeprefix("base_model.model."): m for n, m in wrapped.named_modules() if isinstance(m, LoraLinear)}
    assert set(adapted) == targets and len(targets) == 2 * 4 + 2 * 2 + 4 * 3  # 2 A, 2 M blocks, 4 SwiGLUs
    assert {"layers.1.mixer.q_proj", "layers.0.mixer.out_proj", "layers.2.mlp.up_proj"} <= set(adapted)
    assert all(type(m.base_layer) is Linear for m in adapted.values())  # our Linear subclass, wrapped by peft
    layer = wrapped.base_model.model.layers[0].mlp
    layer.impl = "kernels"
    assert not layer.fused_gate_up()  # an adapted gate/up runs unfused on the kernel path: its adapter applies
    layer.impl = "reference"
    steps(wrapped)
    lora = {n: p for n, p in wrapped.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert all(not torch.equal(p, torch.zeros_like(p)) for n, p in lora.items() if "lora_B" in n)
    base = wrapped.get_base_model().state_dict()
    for name, tensor in before.items():
        key = name.replace(".weight", ".base_layer.weight") if name.removesuffix(".weight") in adapted else name
        assert torch.equal(base[key], tensor), name

    fresh = type(model)(model.cfg)
    fresh.load_state_dict(before)
    steps(fresh)
    unchanged = [n for n, p in fresh.state_dict().items() if torch.equal(p, before[n])]
    assert not unchanged, unchanged


def test_merged_bundle_matches_the_adapted_model(tiny_bundle_dir: Path, model, tmp_path: Path) -> None:
    wrapped = apply_lora(model, LoraConfig(r=4, targets=["attention", "mamba_in", "mamba_out", "mlp"]),
                         base=tiny_bundle_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)  # B = 0 at init would make the test pass without any merge
    state = {n: p.detach() for n, p in wrapped.named_parameters() if p.requires_grad}
    save_adapter(wrapped, state, tmp_path / "adapter")
    out = merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    ids = torch.randint(4, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = wrapped.eval()(ids)
        merged = load_bundle(out).model(ids)
        base = load_bundle(tiny_bundle_dir).model(ids)
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="exists: pass --force"):
        merge_adapter(tmp_path / "adapter", out)


@pytest.mark.slow
def test_cli_bad_input_exits_2_with_one_line(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"answer": "c"}])
    proc = subprocess.run([sys.executable, str(FINETUNE), "--checkpoint", str(tiny_bundle_dir), "--data", str(data),
                           "--set", f"train.output_dir={tmp_path / 'out'}", "--set", "train.wandb.mode=disabled"],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "d.jsonl:2: the record has neither" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_full_finetuning_exports_a_bundle_with_every_tensor_trained(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", qa_records(12))
    sets = ["finetune.method=full", "train.seq_len=32", "train.micro_batch_size=4", "train.global_batch_tokens=128",
            "train.max_steps=2", "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0",
            f"train.output_dir={tmp_path / 'out'}", "train.wandb.mode=disabled", "finetune.val_fraction=0"]
    proc = subprocess.run([sys.executable, str(FINETUNE), "--checkpoint", str(tiny_bundle_dir), "--data", str(data),
                           *[a for s in sets for a in ("--set", s)]],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tuned = load_bundle(tmp_path / "out" / "final")  # eval, export and generate read it as a pretrained one
    base = load_bundle(tiny_bundle_dir).model.state_dict()
    assert all(not torch.equal(t, base[k]) for k, t in tuned.model.state_dict().items())
    assert tuned.tokenizer.get_vocab() == load_bundle(tiny_bundle_dir).tokenizer.get_vocab()


# ---- one launched run: LoRA under DeepSpeed, checkpoints and resume ----------------------------------------
def launch(checkpoint: Path, data: Path, out: Path, resume: str) -> Path:
    """`deepspeed --num_gpus 2 launch/finetune.py` (two gloo processes): 4 LoRA steps, checkpoints at 2 and 4."""
    from bench.scale_runs import deepspeed_cmd

    sets = ["train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_tokens=128", "train.max_steps=4",
            "train.warmup_steps=0", "train.schedule=constant", "train.lr=1e-2", "train.eval_every=2",
            "train.eval_sequences=4", "train.save_every=2", "train.log_every=1", "train.precision=fp32",
            "train.wandb.mode=disabled", "finetune.val_fraction=0.2", "finetune.lora.dropout=0.1",
            "finetune.lora.targets=[attention,mamba_in,mamba_out,mlp]"]
    cmd = deepspeed_cmd(2, "finetune_tiny", sets, resume, out)
    cmd[cmd.index(str(REPO / "launch" / "pretrain.py"))] = str(FINETUNE)
    cmd += ["--checkpoint", str(checkpoint), "--data", str(data)]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out


@pytest.mark.slow
def test_launched_lora_run_checkpoints_adapters_and_resumes(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", qa_records(24))
    first = launch(tiny_bundle_dir, data, tmp_path / "a", "auto")
    for folder in (first / "checkpoints" / "step_00000002" / "adapter", first / "final"):
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    m = read_metrics(first)
    assert sorted(s for s in m if "loss" in m[s]) == [1, 2, 3, 4] and "val_loss" in m[4]
    # resumed from step 2 (dropout on: the RNG state is restored too): the same steps 3 and 4
    second = launch(tiny_bundle_dir, data, tmp_path / "b", str(first / "checkpoints" / "step_00000002"))
    again = read_metrics(second)
    assert sorted(again) == [3, 4]
    for step in (3, 4):
        assert again[step]["loss"] == pytest.approx(m[step]["loss"], rel=1e-5), step
    # the merged result differs from the base only in the adapted Linears
    merged = load_bundle(merge_adapter(first / "final", tmp_path / "merged")).model.state_dict()
    base = load_bundle(tiny_bundle_dir).model.state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    adapted = {f"{n}.weight" for n in target_modules(load_weights(tiny_bundle_dir), ["attention", "mamba_in",
                                                                                     "mamba_out", "mlp"])}
    assert changed and changed <= adapted
