"""Every GPU benchmark script runs on CPU with --smoke and writes valid result files (so they do not rot).

No timing is asserted: only that the rows and the metadata (device, date, command) are there and
that the numbers are finite where the smoke run defines them.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import (
    block_costs,
    block_types,
    context_parallel_overhead,
    fwd_bwd_throughput,
    kernel_parity,
    packing_throughput,
    profile_compare,
    profile_step,
)


def _run(monkeypatch: pytest.MonkeyPatch, module, args: list[str]) -> None:
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *args])
    module.main()


def _load(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert data["rows"], f"{path.name} has no rows"
    for key in ("device", "date", "command"):
        assert data["meta"].get(key), f"{path.name} lacks meta.{key}"
    assert path.with_suffix(".md").read_text().startswith("# ")
    return data


def test_kernel_parity_smoke(monkeypatch, tmp_path):
    _run(monkeypatch, kernel_parity, ["--smoke", "--out", str(tmp_path)])
    data = _load(tmp_path / "kernel_parity_smoke.json")
    rows = {r["case"]: r for r in data["rows"]}
    # smoke compares the reference path with itself: float32 cases agree exactly
    assert rows["float32"]["logits_rel_err"] == 0.0 and rows["float32 packed"]["grad_rel_err_max"] == 0.0
    assert 0 < rows["bf16"]["logits_rel_err"] < 0.1  # bf16 rounding shows, and stays small
    assert rows["decode (kernel steps) vs full forward (ref), float32"]["logits_rel_err"] < 1e-5
    assert json.loads((tmp_path / "kernel_parity_smoke_per_tensor.json").read_text())


@pytest.mark.slow
def test_block_types_smoke(monkeypatch, tmp_path):
    _run(monkeypatch, block_types, ["--smoke", "--out", str(tmp_path)])
    rows = _load(tmp_path / "block_types_smoke.json")["rows"]
    parity = {r["block"]: r for r in rows if r["part"] == "parity"}
    assert set(parity) == {"M", "A", "R", "G", "H"}
    assert all(0 < r["err_out"] < 0.05 and 0 < r["err_dx"] < 0.05 for r in parity.values())  # bf16 vs float64
    speed = {r["pattern"]: r for r in rows if r["part"] == "speed"}
    assert set(speed) == {"MAMMAM", "MRMMRM", "MGMMGM", "MHMMHM"}
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["mfu"]) for r in speed.values())


def test_context_parallel_overhead_smoke(monkeypatch, tmp_path):
    _run(monkeypatch, context_parallel_overhead, ["--smoke", "--out", str(tmp_path)])
    rows = _load(tmp_path / "context_parallel_overhead_smoke.json")["rows"]
    assert [r["case"] for r in rows] == ["plain", "context parallel 1"] * 2
    split = [r for r in rows if r["case"] == "context parallel 1"]
    assert all(r["loss_rel_err"] < 1e-6 and r["vs_plain"] > 0 for r in split)  # float32: the same model
    assert all(r["tokens_per_s"] > 0 for r in rows)


@pytest.mark.slow
def test_fwd_bwd_throughput_smoke(monkeypatch, tmp_path):
    _run(monkeypatch, fwd_bwd_throughput, ["--smoke", "--out", str(tmp_path)])
    rows = _load(tmp_path / "fwd_bwd_throughput_smoke.json")["rows"]
    assert {r["act_ckpt"] for r in rows} == {False, True}
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["mfu"]) for r in rows)


def test_kernel_gaps_sums_the_idle_time_between_kernels():
    """Two profiled steps of three kernels (times in us): the gaps inside each step are summed per step
    and binned; the 5 ms wait between the steps is listed apart; host ops are not kernels."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(name: str, start: float, end: float, device=DeviceType.CUDA) -> SimpleNamespace:
        span = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
        return SimpleNamespace(name=name, device_type=device, time_range=span)

    events = [event("a", 0, 10), event("b", 11, 20), event("c", 28, 40), event("host op", 0, 90, DeviceType.CPU),
              event("a", 5040, 5050), event("b", 5051, 5060), event("c", 5068, 5080)]
    gaps = profile_step.kernel_gaps(events, steps=2, top=2)
    assert gaps["kernels_per_step"] == 3 and gaps["busy_ms_per_step"] == pytest.approx(0.031)
    assert gaps["idle_ms_per_step"] == pytest.approx(0.009)  # 1 us + 8 us per step
    assert gaps["bins"]["0-2 us"]["count_per_step"] == 1 and gaps["bins"]["5-10 us"]["count_per_step"] == 1
    assert gaps["largest"] == [{"us": 8, "after": "b", "before": "c"}] * 2
    assert gaps["host_waits"] == [{"us": 5000, "after": "c", "before": "a"}]
    assert profile_step.kernel_gaps([event("host op", 0, 1, DeviceType.CPU)], steps=2) == {}


@pytest.mark.parametrize("casts", ["torchao", "once"])
def test_profile_step_smoke(casts, monkeypatch, tmp_path):
    """One profiled step with --fp8 (the layers train.precision=fp8 converts, float8 GEMMs emulated on CPU, or
    torch's CPU float8 GEMM for casts=once): the top rows, the converted layers counted, float8's casts among
    the ops."""
    _run(monkeypatch, profile_step, ["--smoke", "--fp8", "tensorwise", "--fp8-casts", casts, "--out", str(tmp_path),
                                     "--top", "200"])
    data = _load(tmp_path / "profile_step_smoke.json")
    from config.sections import FP8Config
    from model import HybridLM, ModelConfig
    from train.fp8 import fp8_plan

    assert data["meta"]["wall_ms_per_step"] > 0 and data["meta"]["fp8"] == "tensorwise"
    assert data["meta"]["fp8_casts"] == casts
    assert data["meta"]["fp8_linears"] == len(fp8_plan(HybridLM(ModelConfig(preset="tiny")), FP8Config())) > 0
    assert any("float8" in r["op"] or "_scaled_mm" in r["op"] or "amax" in r["op"] for r in data["rows"]), data["rows"]


def test_profile_compare_groups_every_kernel(monkeypatch, tmp_path):
    """The committed bf16 and float8 kernel profiles of the 1.3B: each column sums to its profile's kernel time,
    no kernel falls outside the named groups, and the GEMMs land in the right precision."""
    results = Path(__file__).resolve().parents[2] / "bench" / "results"
    base, other = (results / f"profile_step_kernels_4096_{p}_1.3b_h100_2026-12-07.json" for p in ("bf16", "fp8"))
    _run(monkeypatch, profile_compare, [str(base), str(other), "--name", "cmp", "--out", str(tmp_path)])
    data = _load(tmp_path / "cmp.json")
    rows = {r["group"]: r for r in data["rows"]}
    for col, path in (("base_ms", base), ("other_ms", other)):
        total = json.loads(path.read_text())["meta"]["profiled_ms_per_step"]
        assert rows["all kernels"][col] == pytest.approx(total, abs=0.01)
        assert sum(r[col] for g, r in rows.items() if g != "all kernels") == pytest.approx(total, abs=0.1)
    assert profile_compare.OTHER not in rows
    assert rows["GEMM float8"]["base_ms"] == 0 < rows["GEMM float8"]["other_ms"]
    assert rows["float8 scale and cast (torch.compile)"]["base_ms"] == 0
    with pytest.raises(SystemExit, match="cannot read a profile"):
        _run(monkeypatch, profile_compare, [str(base), str(tmp_path / "missing.json")])


def test_profile_decode_smoke(monkeypatch, tmp_path):
    _run(monkeypatch, profile_step, ["--smoke", "--decode", "--out", str(tmp_path), "--top", "5"])
    data = _load(tmp_path / "profile_decode_smoke.json")
    assert data["meta"]["decode"] and len(data["rows"]) == 5
    assert not any("backward" in r["op"].lower() for r in data["rows"])  # a decode step has no backward


@pytest.mark.slow
def test_packing_throughput_smoke(monkeypatch, tmp_path):
    shard = tmp_path / "tokens" / "train" / "src"
    shard.mkdir(parents=True)
    np.cumsum([40, 3, 90, 17, 1, 200, 60], dtype=np.uint64).tofile(shard / "000_src.ds.index")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"splits": {"train": {"sources": [
        {"name": "src", "shards": [{"index": "tokens/train/src/000_src.ds.index"}]}]}}}))
    assert packing_throughput.document_lengths(manifest).tolist() == [40, 3, 90, 17, 1, 200, 60]
    sid = packing_throughput.packed_seq_idx(np.array([40, 3, 90, 17, 1, 200, 60]), 128, 2)
    assert sid[0].tolist() == [0] * 40 + [1] * 3 + [2] * 85 and sid[1, :5].tolist() == [0] * 5
    _run(monkeypatch, packing_throughput, ["--smoke", "--manifest", str(manifest), "--out", str(tmp_path)])
    data = _load(tmp_path / "packing_throughput_smoke.json")
    assert [r["packing"] for r in data["rows"]] == ["continuous", "document", "document_flex"]
    assert data["meta"]["fastest_document_mode"] in ("document", "document_flex")
    assert data["meta"]["packed_vs_alone_logits_rel_err"] < 1e-5  # float32 reference path on CPU


@pytest.mark.slow
def test_decode_throughput_smoke(tmp_path):
    from bench import decode_throughput

    assert decode_throughput.main(["--smoke", "--results-dir", str(tmp_path)]) == 0
    rows = _load(tmp_path / "decode_throughput_tiny_smoke.json")["rows"]
    assert {r["model"] for r in rows} == {"ours", "hf", "attention"}
    assert all(r["decode_tokens_per_s"] > 0 and r["state_mb"] > 0 for r in rows)
    # the HF export decodes the same greedy tokens as ours (float32 on CPU)
    assert all(a == b for a, b in (r["tokens_agree_with_ours"].split("/") for r in rows if r["model"] == "hf"))


@pytest.mark.slow
def test_eval_throughput_smoke(monkeypatch, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness (lm_eval) is not installed here")
    import bench.common
    from bench import eval_throughput

    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)  # write_results' default folder
    monkeypatch.setattr(sys, "argv", ["eval_throughput.py", "--smoke"])
    assert eval_throughput.main() == 0
    rows = _load(tmp_path / "eval_throughput_tiny_smoke.json")["rows"]
    kinds = {(r["backend"], r.get("request_type")) for r in rows}
    assert {("hybrid", "loglikelihood"), ("hybrid", "generate_until")} <= kinds
    assert all(r["requests_per_s"] > 0 for r in rows if "requests_per_s" in r)


def test_block_costs_smoke(tmp_path):
    """Every part and variant is timed at both lengths, the Mamba2 mixer's gradients are checked against
    float64, and the estimate rows add the parts up: a
    step of ours is n_mamba mixers + n_attention mixers + n_layers x (MLP + 2 norms) + the head."""
    assert block_costs.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = _load(tmp_path / "block_costs_tiny_smoke.json")["rows"]
    parts = [r for r in rows if r["part"] != "estimate"]
    assert all("status" not in r and r["ms"] > 0 for r in parts), parts
    assert {(r["part"], r["variant"]) for r in parts} == {
        ("mamba_mixer", "chunk 32"), ("mamba_mixer", "chunk 64"), ("attention_mixer", "sdpa"),
        ("mlp", "ours 512, eager"), ("mlp", "twin 704, eager"), ("norm", "eager"), ("head_loss", "float32 CE")}
    for r in parts:  # the mixer's gradients against its float64 copy (float32 here: observed ~3e-7 to 1e-6)
        if r["part"] == "mamba_mixer":
            assert all(0 < r[f"err_{n}"] < 1e-5 for n in ("A_log", "dt_bias", "in_proj", "x")), r
    for seq in (64, 128):
        ms = {(r["part"], r["variant"]): r["ms"] for r in parts if r["seq_len"] == seq}
        est = {r["variant"]: r for r in rows if r["part"] == "estimate" and r["seq_len"] == seq}
        cfg = block_costs.ModelConfig(preset="tiny")
        n_m, n_a = cfg.layer_pattern.count("M"), cfg.layer_pattern.count("A")
        ours = (n_m * ms[("mamba_mixer", "chunk 64")] + n_a * ms[("attention_mixer", "sdpa")]
                + cfg.n_layers * (ms[("mlp", "ours 512, eager")] + 2 * ms[("norm", "eager")]) + ms[("head_loss", "float32 CE")])
        assert est["ours, as the model runs"]["ms"] == pytest.approx(ours, rel=1e-12)
        twin = cfg.n_layers * (ms[("attention_mixer", "sdpa")] + ms[("mlp", "twin 704, eager")]
                               + 2 * ms[("norm", "eager")]) + ms[("head_loss", "float32 CE")]
        assert est["attention twin, as the model runs"]["ms"] == pytest.approx(twin, rel=1e-12)
        assert est["ours / twin, as the model runs"]["ratio"] == pytest.approx(twin / ours, rel=1e-12)
    for r in parts:  # the loss rows carry their error against float64 cross-entropy of the same logits
        assert (r["part"] == "head_loss") == ("loss_rel_err" in r)
        if r["part"] == "head_loss":
            assert r["loss_rel_err"] < 1e-6 and r["grad_rel_err"] < 1e-6, r


def test_block_costs_parts_filter(tmp_path):
    """--parts times only the named parts; without all parts there is no estimate; a wrong name is refused."""
    assert block_costs.main(["--smoke", "--parts", "norm", "--out", str(tmp_path)]) == 0
    rows = _load(tmp_path / "block_costs_tiny_smoke.json")["rows"]
    assert {r["part"] for r in rows} == {"norm"}
    with pytest.raises(SystemExit):
        block_costs.main(["--smoke", "--parts", "norms", "--out", str(tmp_path)])


def test_ssd_tiles_widen_keeps_hooks_and_adds_no_repeats(tmp_path):
    """experiments/kernels/ssd_tiles.py's wider autotune lists: the original configs first and unchanged, then every block
    shape at every warps x stages once, each with its shape's pre-hook; the smoke run writes its files."""
    from types import SimpleNamespace as Cfg

    from experiments.kernels import ssd_tiles

    def make(kw, w, s, hook):
        return Cfg(kwargs=kw, num_warps=w, num_stages=s, pre_hook=hook)

    zero = object()  # a pre-hook of one shape (mamba_ssm's zero-initialisation of an accumulator)
    small, big = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 32}, {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 32}
    own = [make(small, 4, 3, zero), make(small, 8, 2, zero), make(big, 4, 4, None)]
    wide = ssd_tiles.widen(own, [4, 8], [2, 3], make)
    assert wide[:3] == own
    keys = [ssd_tiles.config_key(c) for c in wide]
    assert len(keys) == len(set(keys)) == 2 * 2 * 2 + 1  # 2 shapes x 2 warps x 2 stages, plus (128, 4 warps, 4 stages)
    assert all(c.pre_hook is (zero if c.kwargs["BLOCK_SIZE_M"] == 64 else None) for c in wide)
    assert ssd_tiles.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert _load(tmp_path / "ssd_tiles_tiny_smoke.json")["rows"][0]["configs"] == "1 -> 8"


def test_ssd_backends_smoke(tmp_path):
    """experiments/kernels/ssd_backends.py on CPU: the pure-PyTorch SSD in float32 against its float64 run (errors at
    float32 rounding), both timings; an unknown backend is refused."""
    from experiments.kernels import ssd_backends

    assert ssd_backends.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = _load(tmp_path / "ssd_backends_tiny_smoke.json")["rows"]
    assert [r["backend"] for r in rows] == ["reference c64"]
    errs = [v for k, v in rows[0].items() if k.startswith("err_")]
    assert len(errs) == 6 and all(0 <= e < 1e-5 for e in errs), rows[0]
    assert rows[0]["fwd_ms"] > 0 and rows[0]["fwd_bwd_ms"] > 0
    with pytest.raises(SystemExit):
        ssd_backends.backends(["flash"], 64, [64], [64])


def test_wgrad_accumulate_smoke(tmp_path):
    """experiments/kernels/wgrad_accumulate.py on CPU: one row per distinct linear weight shape of the tiny preset (gate and
    up merged), weighted by how many layers have it, and a total; the float32 accumulation is closer to
    float64 than the bf16 gradient folded into float32."""
    from experiments.kernels import wgrad_accumulate
    from model import HybridLM, ModelConfig

    assert wgrad_accumulate.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = _load(tmp_path / "wgrad_accumulate_tiny_smoke.json")["rows"]
    *shapes, total = rows
    linears = [n for n, m in HybridLM(ModelConfig(preset="tiny")).named_modules() if isinstance(m, torch.nn.Linear)]
    merged = sum(n.endswith("up_proj") for n in linears)  # each up_proj is counted in its gate_up row
    assert sum(r["count"] for r in shapes) == total["count"] == len(linears) - merged
    for r in shapes:
        assert r["err_fused"] < 1e-6 < r["err_fold"], r
    assert total["fold_cost_ms"] == pytest.approx(sum(r["count"] * r["fold_cost_ms"] for r in shapes))


@pytest.mark.slow
def test_state_memory_smoke(monkeypatch, tmp_path):
    from bench import state_memory

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy sizes: more threads only contend on a busy 2-core machine
    try:
        _run(monkeypatch, state_memory, ["--smoke", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    rows = _load(tmp_path / "state_memory_tiny_smoke.json")["rows"]
    names = ["strategic", "compression4", "compression2", "hierarchical", "bridges"]
    train = {r["variant"]: r for r in rows if r["part"] == "training"}
    decode = {r["variant"]: r for r in rows if r["part"] == "decode"}
    assert list(train) == names and list(decode) == names
    assert all(r["tokens_per_s"] > 0 for r in train.values()) and all(r["decode_tokens_per_s"] > 0 for r in decode.values())
    ssm = {name: r["ssm_state_mb"] for name, r in decode.items()}
    assert ssm["compression2"] == ssm["strategic"] / 2 and ssm["compression4"] == ssm["strategic"] / 4
    assert all(r["rounds"] == 2 for r in rows)  # every variant measured in both round-robin rounds
    assert all(r["tokens_per_s_spread"] >= 0 for r in train.values())


def test_state_memory_reports_the_median_round():
    from bench.state_memory import summarize

    runs = {("training", "a", None): [{"tokens_per_s": 90.0}, {"tokens_per_s": 120.0}, {"tokens_per_s": 100.0}],
            ("training", "b", None): [{"impl": "OutOfMemoryError"}]}
    median_row, failed = summarize(runs, "tokens_per_s")
    assert median_row == {"tokens_per_s": 100.0, "rounds": 3, "tokens_per_s_spread": pytest.approx(0.3)}
    assert failed == {"impl": "OutOfMemoryError"}


@pytest.mark.slow
def test_long_context_smoke(monkeypatch, tmp_path):
    """Ours and the twin at 64 and 128 tokens, the first mode that fits (none, on CPU) chosen per length."""
    from bench import long_context

    _run(monkeypatch, long_context, ["--smoke", "--out", str(tmp_path)])
    data = _load(tmp_path / "long_context_tiny_smoke.json")
    chosen = [(r["model"], r["seq_len"], r["mode"]) for r in data["rows"] if r["chosen"]]
    assert chosen == [("ours", 64, "none"), ("ours", 128, "none"), ("attention", 64, "none"), ("attention", 128, "none")]
    assert all(math.isfinite(r["mfu"]) and r["mfu"] > 0 for r in data["rows"])
    assert data["meta"]["measured_peak_tflops"] > 0


@pytest.mark.slow
def test_finetune_lora_vs_full_smoke(monkeypatch, tmp_path):
    from bench import finetune_lora_vs_full

    _run(monkeypatch, finetune_lora_vs_full, ["--smoke", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in _load(tmp_path / "finetune_lora_vs_full_tiny_smoke.json")["rows"]}
    assert rows["lora"]["status"] == rows["full"]["status"] == "ok", rows
    assert rows["lora"]["trainable_params"] < rows["full"]["trainable_params"] == rows["full"]["total_params"]
    assert all(math.isfinite(r["tokens_per_s"]) and r["peak_mem_gb"] > 0 for r in rows.values())
