"""The memory/throughput planner (train/plan.py): its memory terms against DeepSpeed's own estimators and a
measured CPU optimizer step, its predictions against every committed GPU run, the launch check, bad input."""

from __future__ import annotations

import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from config.loader import ConfigError
from config.schema import load_run_config
from model.config import ModelConfig
from model.sizing import block_params, count_params
from train.plan import fitting_settings, parse_args, plan, plan_from_args, preflight
from train.plan_memory import (
    CONTEXT_BYTES,
    ZeroSetup,
    activations,
    block_activation_bytes,
    largest_leaf_params,
    model_states,
)
from train.plan_runs import (
    MEMORY_BOUND,
    SPEED_BOUND,
    activation_runs,
    committed_runs,
    compare,
    oom_context_bytes,
)

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30


@pytest.mark.parametrize("preset", ["1.3b", "13b"])
@pytest.mark.parametrize("gpus", [1, 4, 64])
def test_zero2_states_match_deepspeed_estimator(preset: str, gpus: int) -> None:
    """DeepSpeed's ZeRO-2 estimate is 2P + 18P/D: its 18 holds a bf16 gradient partition (2P/D) that the
    planner counts as the reduce bucket instead (comm_buffers, left out here); otherwise term for term equal.
    With optimizer offload: 2P on the GPU, and its host figure (16P x its additional_buffer_factor 1.5, where
    max(4 D, 16) = 16) is the planner's per-node host bytes."""
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs,
    )

    cfg = ModelConfig(preset=preset)
    p = count_params(cfg)
    s = model_states(cfg, ZeroSetup(stage=2), gpus)
    _, ds_gpu = estimate_zero2_model_states_mem_needs(p, gpus, 1, cpu_offload=False)
    assert s["params"] + s["gradients"] + s["optimizer"] + 2 * p / gpus == pytest.approx(ds_gpu, rel=1e-9)
    off = model_states(cfg, ZeroSetup(stage=2, offload_optimizer=True), gpus)
    ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(p, gpus, 1, cpu_offload=True)
    assert off["params"] + off["gradients"] + off["optimizer"] == pytest.approx(ds_gpu, rel=1e-9)
    if gpus <= 4:
        assert off["host"] * gpus == pytest.approx(ds_cpu, rel=1e-9)


@pytest.mark.parametrize("offload", ["none", "optimizer", "optimizer+params"])
def test_zero3_states_match_deepspeed_estimator(offload: str) -> None:
    """DeepSpeed's ZeRO-3 estimate: 4 x largest layer (two bf16 copies: in use and prefetched) + 18P/D,
    2P/D with the optimizer offloaded, the layer alone with parameters offloaded too; the planner adds the
    prefetch bucket to the gathered parameters and counts the reduce buckets, which DeepSpeed leaves out. Host: 16P
    (18P with parameters) per node x 1.5, as the planner counts it."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cfg, gpus = ModelConfig(preset="13b"), 8
    p, largest = count_params(cfg), largest_leaf_params(cfg)
    zero = ZeroSetup(stage=3, offload_optimizer=offload != "none", offload_params=offload == "optimizer+params")
    s = model_states(cfg, zero, gpus)
    ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
        p, largest, gpus, 1, cpu_offload=offload != "none", cpu_offload_params=offload == "optimizer+params")
    buckets = 2 * zero.prefetch_bucket + 2 * 2 * zero.reduce_bucket  # bf16; two reduce buckets (overlap_comm)
    ours = s["params"] + s["gradients"] + s["optimizer"] + s["comm_buffers"] - buckets
    assert ours == pytest.approx(ds_gpu, rel=1e-9)
    if offload != "none":
        assert s["host"] * gpus == pytest.approx(ds_cpu, rel=1e-9)


@pytest.mark.slow  # ~3 s alone; builds and steps a model
def test_model_states_match_a_measured_cpu_optimizer_step() -> None:
    """float32 training of the tiny model with torch's AdamW (what one CPU rank holds under ZeRO-1/2): the
    bytes of its parameters, gradients and optimizer state after one step vs the planner (0.1%: AdamW's
    per-parameter step counters)."""
    from model.hybrid import HybridLM

    cfg = ModelConfig(preset="tiny", vocab_size=512, n_layers=3)
    model = HybridLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (1, 33))
    logits = model(ids[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    measured = {
        "params": nbytes(model.parameters()),
        "gradients": nbytes(p.grad for p in model.parameters()),
        "optimizer": nbytes(t for st in opt.state.values() for t in st.values()),
    }
    s = model_states(cfg, ZeroSetup(stage=1), 1, precision="fp32")
    for term, value in measured.items():
        assert s[term] == pytest.approx(value, rel=1e-3), term


def test_checkpointing_modes_order_the_activations() -> None:
    """Each mode keeps less than none; full keeps block inputs + one block; offload keeps no block's tensors
    between its forward and backward (two blocks' worth in the backward) and puts all of them, weights too, on
    the host."""
    cfg = ModelConfig(preset="1.3b")
    gpu = {m: sum(v for k, v in activations(cfg, 8192, m).items() if k != "host")
           for m in ("none", "mlp", "attention", "full", "offload")}
    assert gpu["none"] > gpu["mlp"] > gpu["full"] > gpu["offload"]
    assert gpu["none"] > gpu["attention"] > gpu["full"]
    host = sum(sum(block_activation_bytes(cfg, k).values()) * 8192 + 2 * block_params(cfg, k) for k in cfg.layer_pattern)
    assert activations(cfg, 8192, "offload")["host"] == pytest.approx(host)


# Runs whose memory the planner is not expected to match: they ran ZeRO-1 with DeepSpeed's or the
# copy-free gradient fold before train.grad_fold existed (the former bench/gpu_runs.sh: fold=deepspeed / copy_free;
# their commands carry no grad_fold), which keeps the bf16 weight gradients: 2.8 GB more
# (docs/pretraining.md). The planner models today's default, fused_wgrad.
OLDER_FOLD = {"pretrain_1.3b_zero1_graph_h100_2026-11-24",
              "pretrain_1.3b_zero1_graph_before_immediate_grad_update_h100_2026-11-24",
              "pretrain_1.3b_zero1_fold_graph_h100_2026-11-24"}


def test_planner_matches_every_committed_run() -> None:
    """bench/results' pretrain runs: tokens/s within 15%, peak memory within 10% (first-step memory too,
    except graphed ZeRO-2 runs, whose capture did not happen in step 1); memory_scaling's activations
    within 10%. The table in docs/planner.md is `python -m train.plan --check`."""
    runs = committed_runs()
    assert len(runs) >= 17
    for run in runs:
        c = compare(run)
        assert abs(c["rate_err"]) <= SPEED_BOUND, (run.name, c)
        if run.name in OLDER_FOLD:
            continue
        assert abs(c["mem_err"]) <= MEMORY_BOUND, (run.name, c)
        graphed_zero2 = "train.cuda_graph=true" in run.overrides and "zero1" not in " ".join(run.overrides)
        if not graphed_zero2:
            assert abs(c["first_err"]) <= MEMORY_BOUND, (run.name, c)
    acts = activation_runs()
    assert acts and all(abs(a["err"]) <= MEMORY_BOUND for a in acts), acts


def test_context_allowance_is_the_measured_one(tmp_path: Path) -> None:
    """CONTEXT_BYTES is the non-PyTorch memory of the committed out-of-memory report (to its 0.01 GiB)."""
    log = REPO / "bench" / "results" / "pretrain_2.7b_mb2_oom_h100_2026-12-07_log.txt"
    assert oom_context_bytes(log) == pytest.approx(CONTEXT_BYTES, abs=0.01 * GIB)
    (tmp_path / "ok.txt").write_text("step 1/20 | loss 9.19\n")
    with pytest.raises(ValueError, match="no CUDA out-of-memory report"):
        oom_context_bytes(tmp_path / "ok.txt")


def test_zero1_bf16_reduce_cast_only_with_company() -> None:
    """ZeRO-1 bf16: the boundary all-reduce's bf16 cast of the float32 sums (2P) on more than one rank only."""
    cfg = ModelConfig(preset="1.3b")
    zero = ZeroSetup(stage=1)
    one, two = (model_states(cfg, zero, g)["comm_buffers"] for g in (1, 2))
    assert one == 0 and two == 2 * count_params(cfg)


def test_fp8_plans_bf16_states_and_the_out_proj_input() -> None:
    """train.precision=fp8 keeps bf16 weights and DeepSpeed's bf16 optimizer: the states of a bf16 run; its
    activations add each Mamba2 block's normed scan output (d_inner, bf16) that the float8 out_proj keeps."""
    cfg = load_run_config("1.3b")
    bf16 = plan(cfg, gpu="h100")
    cfg.train.precision = "fp8"
    fp8 = plan(cfg, gpu="h100")
    for term in ("params", "gradients", "optimizer", "comm_buffers"):
        assert fp8.memory[term] == bf16.memory[term], term
    tokens = cfg.train.micro_batch_size * cfg.train.seq_len
    n_mamba = cfg.model.layer_pattern.count("M")
    assert fp8.memory["activations"] - bf16.memory["activations"] == 2 * cfg.model.d_inner * tokens * n_mamba


def test_speed_needs_the_measurements(tmp_path: Path) -> None:
    """Without the committed per-layer costs there is no tokens/s (and a message naming the file)."""
    from train.plan_speed import MissingMeasurement, predict

    with pytest.raises(MissingMeasurement, match="block_costs"):
        predict(ModelConfig(preset="1.3b"), 4096, 2, 8, ZeroSetup(stage=1), 1, "none", results=tmp_path)


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    """torch.cuda reporting one GPU of the given size (bytes), and DeepSpeed's accelerator CUDA (on a CPU
    machine it is the CPU: train.distributed.training_on_cuda)."""
    props = types.SimpleNamespace(total_memory=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: props)
    monkeypatch.setattr("train.distributed.training_on_cuda", lambda: True)
    return props


def test_preflight_stops_with_settings_that_fit(fake_gpu, capsys) -> None:
    """2.7B at micro-batch 4 x 4096 does not fit 80 GB: one ConfigError naming settings the planner
    says fit; train.plan_check=false only prints the estimate."""
    fake_gpu.total_memory = 85_017_755_648
    sets = ["train.micro_batch_size=4", "train.seq_len=4096", "train.activation_checkpointing=false"]
    cfg = load_run_config("2.7b", sets)
    with pytest.raises(ConfigError, match="train.micro_batch_size=2") as err:
        preflight(cfg)
    assert "\n" not in str(err.value) and "train.plan_check=false" in str(err.value)
    assert "does NOT fit" in capsys.readouterr().out
    for option in fitting_settings(cfg, 1, fake_gpu.total_memory):
        alt = load_run_config("2.7b", sets + [s.removeprefix("--set ") for s in option.split(" --set ")])
        assert plan(alt, 1).total <= fake_gpu.total_memory
    preflight(load_run_config("2.7b", sets + ["train.plan_check=false"]))


def test_preflight_checks_host_memory_of_offload(fake_gpu, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """6.7B with the optimizer offloaded fits an H200 but puts ~133 GiB in host memory: the lent GPU machines'
    125 GiB stops the launch (the run that started there anyway died of host OOM in its first optimizer step:
    bench/results/pretrain_6.7b_offload_h100_2026-12-07), a 256 GiB one does not."""
    import train.plan as planner

    fake_gpu.total_memory = 150_754_820_096
    run_sets = ["train.ds_config=ds_configs/zero2_offload.json", "train.seq_len=4096", "train.micro_batch_size=2",
                "train.activation_checkpointing=false"]
    monkeypatch.setattr(planner, "host_memory_bytes", lambda: 125 * GIB)
    for vocab in ([], ["model.vocab_size=8192"]):  # the preset's, and the measured run's
        with pytest.raises(ConfigError, match=r"offloaded state needs .*optimizer state ~1\d\d\.\d GiB\)"):
            preflight(load_run_config("6.7b", run_sets + vocab))
    monkeypatch.setattr(planner, "host_memory_bytes", lambda: 256 * GIB)
    preflight(load_run_config("6.7b", run_sets))
    assert "; host 133.0 GiB per GPU" in capsys.readouterr().out  # 16 bytes x 1.5 x 5.95B parameters


def test_preflight_checks_host_memory_of_offloaded_activations(fake_gpu, monkeypatch: pytest.MonkeyPatch,
                                                               capsys) -> None:
    """Activation checkpointing mode offload puts every block's saved tensors and weights in host memory: the
    1.3B at micro-batch 4 x 4096 on an H100 holds 33.65 GiB there (no optimizer offload), which preflight
    counts against the machine's memory like offloaded optimizer state."""
    import train.plan as planner

    fake_gpu.total_memory = 85_017_755_648
    cfg = load_run_config("1.3b", ["train.activation_checkpointing=offload", "train.micro_batch_size=4",
                                   "train.seq_len=4096"])
    p = plan(cfg, 1)
    m = cfg.model
    by_hand = sum(sum(block_activation_bytes(m, k).values()) * 4 * 4096 + 2 * block_params(m, k)
                  for k in m.layer_pattern)
    assert p.host == p.host_activations == pytest.approx(by_hand) and by_hand / GIB == pytest.approx(33.65, abs=0.01)
    monkeypatch.setattr(planner, "host_memory_bytes", lambda: 32 * GIB)
    with pytest.raises(ConfigError, match=r"offloaded state needs ~33\.6 GiB .*\(all its ranks: activations ~33\.6 GiB\)"):
        preflight(cfg)
    monkeypatch.setattr(planner, "host_memory_bytes", lambda: 64 * GIB)
    preflight(cfg)
    assert "; host 33.6 GiB per GPU" in capsys.readouterr().out


def test_preflight_skips_cpu(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    preflight(load_run_config("13b", []))
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("argv, message", [
    (["--config", "13b", "--set", "model.preset=nosuch"], "preset 'nosuch' is unknown"),
    (["--config", "13b", "--gpus", "0"], "--gpus must be >= 1"),
    (["--config", "13b", "--zero", "4"], "--zero must be 1, 2 or 3"),
    (["--config", "13b", "--activation-checkpointing", "some"], "activation checkpointing 'some' is unknown"),
    (["--config", "13b", "--offload", "optimizer+params", "--zero", "2"], "needs --zero 3"),
    (["--config", "13b", "--gpu", "a100"], "--gpu a100 is unknown"),
])
def test_bad_input_is_one_config_error(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        plan_from_args(parse_args(argv))
    assert "\n" not in str(err.value)


@pytest.mark.slow  # a python process importing torch
def test_cli_bad_input_exits_2_with_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "train.plan", "--config", "nosuch", "--gpus", "2"], cwd=REPO,
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "nosuch" in proc.stderr, proc.stderr


def test_cli_prints_memory_speed_and_budget() -> None:
    p = plan_from_args(parse_args(["--config", "13b", "--gpus", "64", "--zero", "3", "--tokens", "100e9"]))
    assert p.zero.stage == 3 and p.gpus == 64 and p.fits
    assert p.speed is not None and p.hours(100e9) == pytest.approx(100e9 / (p.speed.tokens_per_s * 64) / 3600)
    one = plan(load_run_config("13b", []), 1, gpu="h200")
    assert not one.fits  # 10.6B x 16 bytes of training state fit no single GPU


FAKE_DEEPSPEED = """#!/bin/bash
out=$(echo "$*" | grep -o 'train.output_dir=[^ ]*' | cut -d= -f2)
mkdir -p "$out"
for s in 1 2 3; do echo "{\\"step\\": $s, \\"tokens_per_s\\": 5000, \\"mem_gb\\": 40}" >> "$out/metrics.jsonl"; done
[[ "$*" == *2.7b*micro_batch_size=2* ]] && exit 2   # as when the planner check refuses micro-batch 2
[[ "$*" == *6.7b* && "$*" != *activation_checkpointing=mlp* ]] && exit 1   # as when the GPU runs out of memory
exit 0
"""


def test_preset_stages_write_runs_the_planner_reads(tmp_path: Path) -> None:
    """bench/run.sh's presets suite (with stand-ins for deepspeed and nvidia-smi): each part writes the
    .md + metrics that train.plan_runs ingests; the 2.7B stage falls back to micro-batch 1 when 2 fails (and the
    6.7B to recomputed MLPs), and the failed attempt is left out."""
    import json
    import os

    from train.plan_runs import committed_runs

    bins = tmp_path / "bin"
    bins.mkdir()
    (bins / "deepspeed").write_text(FAKE_DEEPSPEED)
    (bins / "nvidia-smi").write_text("#!/bin/bash\necho 'NVIDIA H200'\n")
    for b in bins.iterdir():
        b.chmod(0o755)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"tokenizer": {"vocab_size": 8192}}))
    env = {**os.environ, "PATH": f"{bins}:{os.environ['PATH']}", "CHECK_ONLY": "1", "DATA": str(manifest)}
    proc = subprocess.run(["bash", "bench/run.sh", "presets", str(tmp_path / "out")], cwd=REPO, env=env,
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # result names are <question>_<hardware>_<date> (bench/README.md)
    runs = {re.sub(r"_\d{4}-\d{2}-\d{2}$", "", r.name): r for r in committed_runs(tmp_path / "out" / "results")}
    assert set(runs) == {"pretrain_2.7b_mb1_h200", "pretrain_6.7b_mlp_h200", "pretrain_13b_reduced_h200"}
    assert runs["pretrain_13b_reduced_h200"].device == "NVIDIA H200"
    assert "model.n_layers=16" in runs["pretrain_13b_reduced_h200"].overrides
    assert all(compare(r)["rate_meas"] == 5000 for r in runs.values())


def test_docs_tables_are_the_planners_output() -> None:
    """docs/cluster.md's 100B-token plan and docs/planner.md's check table are the commands' output as
    written there (regenerate them with those commands when a result or the planner changes)."""
    from train.plan import cluster_table
    from train.plan_runs import check_table

    cluster = (REPO / "docs" / "cluster.md").read_text()
    assert "python -m train.plan --cluster 1.3b,2.7b,6.7b,13b --gpus-list 8,32,64,128 --tokens 100e9" in cluster
    assert cluster_table(["1.3b", "2.7b", "6.7b", "13b"], [8, 32, 64, 128], 100e9, "h100") in cluster
    assert check_table() in (REPO / "docs" / "planner.md").read_text()


@pytest.mark.parametrize("tie", [False, True])
def test_fused_wgrad_keeps_bf16_gradients_outside_the_linears_only(tie: bool) -> None:
    """ZeRO-1 bf16 with train.grad_fold=fused_wgrad: every parameter bound to a float32 `main_grad` (as
    train/grad_fold.py binds them), one backward of the tiny model, bf16 weights: the bf16 .grad autograd
    still writes is the planner's embedding matrix plus the norms, conv and SSM scalars it leaves out
    (0.4% of this 3-layer tiny model's parameters, less in the presets'); the deepspeed fold's is every parameter's."""
    from model.hybrid import HybridLM

    cfg = ModelConfig(preset="tiny", vocab_size=512, n_layers=3, tie_embeddings=tie)
    model = HybridLM(cfg).to(torch.bfloat16)
    for p in model.parameters():
        p.main_grad = torch.zeros_like(p, dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (1, 33), generator=torch.Generator().manual_seed(0))
    model(ids[:, :-1]).float().logsumexp(-1).sum().backward()
    measured = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    p_total = count_params(cfg)
    zero = ZeroSetup(stage=1)
    fused = model_states(cfg, zero, 1, grad_fold="fused_wgrad")["gradients"] - 4 * p_total
    assert fused == 2 * cfg.padded_vocab_size * cfg.d_model
    assert fused <= measured <= fused + 2 * 0.005 * p_total
    assert model_states(cfg, zero, 1, grad_fold="deepspeed")["gradients"] - 4 * p_total == 2 * p_total
    assert model_states(cfg, zero, 1, precision="fp8")["gradients"] - 4 * p_total == 2 * p_total
    # train.fp8.casts=once adds the float8 layers' gradients to the float32 buffers, as bf16's fused_wgrad
    assert model_states(cfg, zero, 1, precision="fp8", fp8_casts="once")["gradients"] - 4 * p_total == fused


def test_step_weight_casts_count_their_float8_copies() -> None:
    """train.fp8.weight_casts=step keeps each float8 layer's weight in two 1-byte layouts through the step: the
    planner adds 2 bytes per parameter of fp8_plan (the 1.3B: its 110 float8 Linears of blocks 1-22), measured
    against the copies StepWeights makes for a small model's float8 layers."""
    from model.hybrid import HybridLM
    from train.fp8 import convert_to_fp8, fp8_plan, step_weight_params, step_weights

    cfg = load_run_config("1.3b", ["train.precision=fp8", "train.fp8.casts=once", "train.fp8.weight_casts=step"])
    with torch.device("meta"):
        model = HybridLM(cfg.model)
    names = fp8_plan(model, cfg.train.fp8)
    copies = step_weight_params(cfg.model, cfg.train.fp8)
    assert len(names) == 110 and copies == sum(model.get_submodule(n).weight.numel() for n in names)
    call = load_run_config("1.3b", ["train.precision=fp8", "train.fp8.casts=once"])
    assert step_weight_params(call.model, call.train.fp8) == 0
    assert plan(cfg).memory["params"] - plan(call).memory["params"] == 2 * copies

    small = ModelConfig(vocab_size=61, d_model=32, n_layers=4, pattern="MAMA", ffn_hidden=1040,
                        attention={"n_heads": 4, "n_kv_heads": 2}, mamba={"d_state": 8, "headdim": 8, "expand": 2})
    net = HybridLM(small).to(torch.bfloat16).train()
    convert_to_fp8(net, cfg.train.fp8, emulate=True)
    steps = step_weights(net)
    with steps.step():
        net(torch.randint(0, 61, (1, 16))).float().sum().backward()
    assert steps.bytes() == 2 * step_weight_params(small, cfg.train.fp8) > 0
