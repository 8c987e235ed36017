"""Launched training runs of the tiny preset on CPU (the DeepSpeed launcher, gloo), sharing runs between
assertions: one ZeRO-2 fp32 reference run of 16 steps (checkpoints at 6, 12, 16), a one-process
universal resume of it, a ZeRO-1 run and a context-parallel run of its first 6 steps, a ZeRO-3 bf16 run
with its export, and single-process runs for errors, NaN handling and --dry-run. Its SIGTERM-stopped and
resumed copy runs as a Slurm job (tests/train/test_slurm_script.py).

Tolerances: a resume on the same world size is bitwise (CPU fp32, same reduction order). The
one-process resume differs by float32 summation order only (gradients accumulated over 4 micro-
batches instead of all-reduced over 2 ranks x 2; the step's loss normalisation is global, so the
math is the same): |delta loss| / loss < 1e-5. The export test compares a bf16 model's validation
loss computed two ways (DeepSpeed ZeRO-3 engine vs the loaded export): rel. 1e-3.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from config.manifest import load_manifest
from config.schema import load_run_config
from model.weights import load_weights
from tests.conftest import built_once
from train.data import IGNORE_INDEX, TrainData
from train.errors import TrainingError
from train.run_lock import RunLock
from train.trainer import check_finite

from .conftest import BASE_SETS, PRETRAIN, REPO, copy_checkpoint, read_metrics, run_env, train_run

pytestmark = pytest.mark.slow  # launched runs / long exports: the full tier only (README, "Tests")

ZERO3_BF16 = ["train.ds_config=ds_configs/zero3.json", "train.precision=bf16", "train.max_steps=12"]


def single_process(corpus: Path, out: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python launch/pretrain.py` (a world of one, no launcher) with the test settings."""
    sets = [*BASE_SETS, f"data.manifest={corpus}", f"train.output_dir={out}", "train.global_batch_tokens=256"]
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run([sys.executable, str(PRETRAIN), "--config", "tiny", *args, *extra], cwd=REPO,
                          env=run_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def run_zero3(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ZeRO-3 bf16, 12 steps, with its export: one per test run, also when xdist hands its two tests to
    different workers (each worker would otherwise launch it again)."""
    return built_once(tmp_path_factory, "run_zero3", lambda folder: train_run(2, corpus, folder, ZERO3_BF16))


def test_zero2_run_learns_and_writes_complete_checkpoints(run_a: Path) -> None:
    m = read_metrics(run_a)
    assert [s for s in sorted(m) if "loss" in m[s]] == list(range(1, 17))
    # Validation improves from the first eval (step 6, at the peak learning rate) to both later ones, by > 0.1 nats. Not
    # also from 12 to 16: at the decayed learning rate (1.3e-3 -> 3e-4) it is a plateau whose sign depends on the CPU's
    # float32 rounding: this 2-core AMD machine (torch 2.13) gave 5.22, 4.99, 4.81 at steps 6, 12, 16, the GPU
    # machine's Xeon (AVX-512, torch 2.11; the same CPU world) 5.35, 4.9506, 4.9590 in both suite runs.
    val = [m[s]["val_loss"] for s in (6, 12, 16)]
    assert val[0] - max(val[1:]) > 0.1, val
    first, last = (sum(m[s]["loss"] for s in steps) / 4 for steps in (range(1, 5), range(13, 17)))
    assert first - last > 1.0, (first, last)
    root = run_a / "checkpoints"
    assert (root / "latest").read_text() == "step_00000016"
    for step in (6, 12, 16):
        folder = root / f"step_{step:08d}"
        assert (folder / "COMPLETE").is_file() and (folder / "rng" / "rank_00001.pt").is_file()
        assert load_run_config(folder / "run_config.yaml").train.max_steps == 16
    state = (root / "step_00000012" / "trainer_state.json").read_text()
    for key in ('"consumed_samples": 96', '"world_size": 2', '"zero_stage": 2', '"git_commit"', '"torch"'):
        assert key in state
    model = load_weights(run_a / "final")
    assert model.cfg.vocab_size == 512 and (run_a / "final" / "tokenizer.json").is_file()


def test_two_process_checkpoint_resumes_on_one_process(run_a: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "one_process"
    copy_checkpoint(run_a, 12, out)
    train_run(1, corpus, out)
    assert (out / "checkpoints" / "step_00000012" / "universal" / "COMPLETE").is_file()
    ref, got = read_metrics(run_a), read_metrics(out)
    assert sorted(got) == list(range(13, 17))
    for step in range(13, 17):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5)
        assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4)
    assert got[16]["val_loss"] == pytest.approx(ref[16]["val_loss"], rel=1e-5)


def test_deterministic_mode_continues_bitwise(run_a: Path, corpus: Path, tmp_path: Path) -> None:
    """train.deterministic=true (torch's deterministic algorithms, which also fill every uninitialised
    allocation with NaN) resumed from run_a's step-12 checkpoint on 2 processes: steps 13-16 equal run_a's
    bitwise, so on CPU the mode changes no arithmetic and no step reads memory it did not write."""
    out = tmp_path / "deterministic"
    copy_checkpoint(run_a, 12, out)
    train_run(2, corpus, out, ["train.deterministic=true"])
    assert "deterministic True" in (out / "launch.log").read_text()
    ref, got = read_metrics(run_a), read_metrics(out)
    assert sorted(got) == list(range(13, 17))
    for step in range(13, 17):
        for key in ("loss", "grad_norm", "lr", "val_loss"):
            assert got[step].get(key) == ref[step].get(key), (step, key)


def test_four_process_checkpoint_resumes_on_two(corpus: Path, tmp_path: Path) -> None:
    """Issue 12's 4 -> 2 GPU resume, on CPU: a 4-process ZeRO-2 run's step-3 checkpoint resumed on 2
    processes through the universal checkpoint continues the run: the same samples (the data position
    does not depend on the world size), losses within rel 1e-5 (float32 summation order over 4 vs 2
    ranks and 1 vs 2 micro-batches per rank)."""
    sets = ["train.max_steps=6", "train.save_every=3"]
    ref = train_run(4, corpus, tmp_path / "four", sets)
    out = tmp_path / "two"
    copy_checkpoint(ref, 3, out)
    train_run(2, corpus, out, sets)
    assert (out / "checkpoints" / "step_00000003" / "universal" / "COMPLETE").is_file()
    want, got = read_metrics(ref), read_metrics(out)
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step]["tokens"] == want[step]["tokens"]
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-4), step


def test_zero1_run_trains_the_same_model_as_zero2(run_a: Path, corpus: Path, tmp_path: Path) -> None:
    """ds_configs/zero1.json, 2 processes, fp32: the first 6 steps' losses and gradient norms equal the
    ZeRO-2 reference run's up to float32 summation order (ZeRO-1 reduces the summed micro-batch
    gradients once per step, ZeRO-2 every micro-batch): rel 1e-5 / 1e-4."""
    out = train_run(2, corpus, tmp_path / "zero1", ["train.ds_config=ds_configs/zero1.json", "train.max_steps=6"])
    ref, got = read_metrics(run_a), read_metrics(out)
    assert '"zero_stage": 1' in (out / "checkpoints" / "step_00000006" / "trainer_state.json").read_text()
    for step in range(1, 7):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step
        assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4), step


@pytest.mark.slow
def test_context_parallel_run_trains_the_same_model(run_a: Path, corpus: Path, tmp_path: Path) -> None:
    """train.context_parallel=2 on 2 processes: one replica, each sequence split over the two ranks
    (model.mamba.chunk_size 32, the tiny preset's 64 would not split 64 tokens). The first 6 steps take the
    same samples as the 2-replica reference run and follow the same mean NLL: losses and gradient norms equal
    its own up to float32 summation order (and the chunk size's rounding): rel 1e-6 / 1e-5 (observed 9e-8 /
    3e-7)."""
    out = train_run(2, corpus, tmp_path / "cp2", ["train.context_parallel=2", "model.mamba.chunk_size=32",
                                                  "train.max_steps=6"])
    ref, got = read_metrics(run_a), read_metrics(out)
    assert "context parallel 2 (1 replicas)" in (out / "launch.log").read_text()
    for step in range(1, 7):
        assert got[step]["tokens"] == ref[step]["tokens"]
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-6), step
        assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-5), step
    assert 0 < got[6]["val_loss"] < got[1]["loss"]  # evaluated on slices too (after a step whose lr differs:
    # the 6-step schedule ends there, the reference's runs to 16)


def test_zero1_bf16_checkpoint_resumes_bitwise(corpus: Path, tmp_path: Path) -> None:
    """ds_configs/zero1.json in bf16 runs DeepSpeed's BF16_Optimizer (with immediate_grad_update, and
    train.grad_fold's default fused_wgrad: the resumed engine's linear layers add into its new buffers): its
    checkpoint at step 3 resumes to the same steps 4-6 (CPU, same world size: bitwise)."""
    sets = ["train.ds_config=ds_configs/zero1.json", "train.precision=bf16", "train.max_steps=6",
            "train.save_every=3", "train.eval_every=3"]
    ref = train_run(1, corpus, tmp_path / "ref", sets)
    out = tmp_path / "resumed"
    copy_checkpoint(ref, 3, out)
    train_run(1, corpus, out, sets)
    want, got = read_metrics(ref), read_metrics(out)
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", "grad_norm", "val_loss"):
            assert got[step].get(key) == want[step].get(key), (step, key)


def test_zero1_bf16_fused_wgrad_on_two_processes(corpus: Path, tmp_path: Path) -> None:
    """train.grad_fold=fused_wgrad under data parallelism (2 processes, bf16 ZeRO-1): the float32 buffers its
    GEMMs add into are the ones reduced across ranks at the step. Against copy_free (DeepSpeed's sums
    bitwise): the same losses and gradient norms up to the bf16 rounding of each gradient that fused_wgrad
    skips (rel 1e-2; the first step's loss, before any update, to 1e-6)."""
    sets = ["train.ds_config=ds_configs/zero1.json", "train.precision=bf16", "train.max_steps=4", "train.save_every=0",
            "train.eval_every=0", "train.save_final=false"]
    runs = {fold: train_run(2, corpus, tmp_path / fold, [*sets, f"train.grad_fold={fold}"])
            for fold in ("copy_free", "fused_wgrad")}
    assert "gradient fold: fused_wgrad" in (runs["fused_wgrad"] / "launch.log").read_text()
    want, got = read_metrics(runs["copy_free"]), read_metrics(runs["fused_wgrad"])
    assert got[1]["loss"] == pytest.approx(want[1]["loss"], rel=1e-6)
    for step in range(1, 5):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-2), step
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-2), step


def test_zero3_offload_checkpoint_resumes_bitwise(corpus: Path, tmp_path: Path) -> None:
    """ds_configs/zero3_offload.json (the Adam state in CPU memory: issue 12's 13B setting) on 2 processes:
    the step-3 checkpoint of a 6-step run resumes to the same steps 4-6, bitwise (fp32 on CPU)."""
    sets = ["train.ds_config=ds_configs/zero3_offload.json", "train.max_steps=6", "train.save_every=3"]
    ref = train_run(2, corpus, tmp_path / "reference", sets)
    out = tmp_path / "resumed"
    copy_checkpoint(ref, 3, out)
    train_run(2, corpus, out, sets)
    want, got = read_metrics(ref), read_metrics(out)
    assert "ZeRO-3 (optimizer state in CPU memory)" in (out / "launch.log").read_text()
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", "grad_norm", "lr", "val_loss"):
            assert got[step].get(key) == want[step].get(key), (step, key)


def test_zero3_bf16_run_learns(run_zero3: Path) -> None:
    m = read_metrics(run_zero3)
    assert m[6]["val_loss"] > m[12]["val_loss"]
    assert sum(m[s]["loss"] for s in range(1, 4)) / 3 - sum(m[s]["loss"] for s in range(10, 13)) / 3 > 0.5


def test_export_is_the_trained_model(run_zero3: Path, corpus: Path) -> None:
    """The exported weights give the run's last validation loss, and the offline consolidation of the
    last checkpoint (zero_to_fp32 over the ZeRO-3 shards) gives the same tensors."""
    model = load_weights(run_zero3 / "final", dtype=torch.bfloat16).eval()
    batches, _ = TrainData(load_manifest(corpus), 64, "document").eval_batches(10, rank=0, world=1, micro_batch=2)
    nll = scored = 0.0
    with torch.no_grad():
        for b in batches:
            logits = model(b["input_ids"], position_ids=b["position_ids"], seq_idx=b["seq_idx"]).float()
            nll += F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum").item()
            scored += (b["labels"] != IGNORE_INDEX).sum().item()
    assert nll / scored == pytest.approx(read_metrics(run_zero3)[12]["val_loss"], rel=1e-3)
    proc = single_process(corpus, run_zero3, "--export", "auto", "--export-to", str(run_zero3 / "offline"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    final, offline = load_file(run_zero3 / "final" / "model.safetensors"), load_file(run_zero3 / "offline" / "model.safetensors")
    assert final.keys() == offline.keys() and all(torch.equal(final[k], offline[k]) for k in final)


def _damage(corpus: Path, tmp_path: Path, how: str) -> Path:
    copy = tmp_path / "corpus"
    shutil.copytree(corpus.parent, copy)
    shard = sorted((copy / "tokens" / "train" / "stdlib_a").glob("*.ds"))[0]
    data = bytearray(shard.read_bytes())
    if how == "truncate":
        del data[-10:]
    else:
        data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    return copy / "manifest.json"


@pytest.mark.parametrize("case, expected", [
    ("bad_key", ["train.lrr: unknown key"]),
    ("missing_manifest", ["/nonexistent/manifest.json", "curate.py"]),
    ("truncated_shard", ["corrupt", "000_stdlib_a.ds", "curate.py"]),
    ("flipped_byte", ["corrupt", "000_stdlib_a.ds", "sha256"]),
    ("cuda_graph_with_document_packing_and_sdpa", ["train.cuda_graph", "model.attn_backend=auto"]),
    ("cuda_graph_without_cuda", ["train.cuda_graph needs CUDA", "train.cuda_graph=false"]),
])
def test_bad_input_is_a_one_line_error(case: str, expected: list[str], corpus: Path, tmp_path: Path) -> None:
    if case == "bad_key":
        extra = ["--set", "train.lrr=1"]
    elif case == "missing_manifest":
        extra = ["--set", "data.manifest=/nonexistent/manifest.json"]
    elif case == "truncated_shard":
        extra = ["--set", f"data.manifest={_damage(corpus, tmp_path, 'truncate')}"]
    elif case == "flipped_byte":
        extra = ["--set", f"data.manifest={_damage(corpus, tmp_path, 'flip')}", "--set", "data.verify=sha256"]
    elif case == "cuda_graph_with_document_packing_and_sdpa":
        extra = ["--set", "train.cuda_graph=true", "--set", "data.packing=document", "--set", "model.attn_backend=sdpa"]
    else:
        extra = ["--set", "train.cuda_graph=true", "--set", "data.packing=continuous"]
    proc = single_process(corpus, tmp_path / "out", *extra, "--dry-run")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(part in last for part in expected), last
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("engine", [[], ["--set", "train.ds_config=ds_configs/zero1.json", "--set", "train.precision=bf16"]],
                         ids=["zero2_fp32", "zero1_bf16"])
def test_non_finite_loss_stops_or_skips(engine: list[str], corpus: Path, tmp_path: Path) -> None:
    """init_std=1e38 makes the first loss NaN: `stop` names step and rank; `skip` skips every update
    (the run would stop with an error if DeepSpeed had applied one). Both optimizers DeepSpeed builds
    here: ZeRO-2's, and BF16_Optimizer (ZeRO-1 in bf16, which detects a non-finite gradient norm)."""
    nan = ["--set", "model.init_std=1e38", "--set", "train.max_steps=2", "--set", "train.warmup_steps=1", "--set", "train.eval_every=0",
           "--set", "train.save_every=0", "--resume", "none", *engine]
    stop = single_process(corpus, tmp_path / "stop", *nan)
    assert stop.returncode == 2
    assert "error: non-finite loss at step 1 on rank(s) 0 (train.on_nan=stop)" in stop.stderr.strip().splitlines()[-1]
    skip = single_process(corpus, tmp_path / "skip", *nan, "--set", "train.on_nan=skip")
    assert skip.returncode == 0, skip.stderr[-2000:]
    m = read_metrics(tmp_path / "skip")
    assert [m[s]["skipped"] for s in (1, 2)] == [True, True]
    with pytest.raises(Exception, match="non-finite loss at step 3 on rank\\(s\\) 1, 2"):
        check_finite(3, [1, 2], skipped=False, on_nan="skip")


def test_dry_run_on_another_world_size_writes_nothing(run_a: Path, corpus: Path, tmp_path: Path) -> None:
    """--dry-run with the default --resume auto names the checkpoint a run would resume from; it neither
    converts it to a universal checkpoint (the world size differs) nor takes the lock."""
    out = tmp_path / "one"
    copy_checkpoint(run_a, 12, out)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    proc = single_process(corpus, out, "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"dry run: a run would resume from {out / 'checkpoints' / 'step_00000012'}" in proc.stdout
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def test_dry_run_builds_everything_and_stops(corpus: Path, tmp_path: Path) -> None:
    proc = single_process(corpus, tmp_path / "dry", "--dry-run", "--set", "train.ds_config=ds_configs/zero3.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ZeRO-3" in proc.stdout and "dry run: everything built, stopping" in proc.stdout
    assert not (tmp_path / "dry" / "checkpoints").exists()


def test_second_run_refused_and_sigterm_to_the_deepspeed_command_checkpoints(corpus: Path, tmp_path: Path) -> None:
    """Two runs on one folder: the second is refused, naming the first. `kill PID` of the user's
    `deepspeed ...` command (its runner dies at once on one node): the ranks notice, save a checkpoint
    at the next step boundary and exit, and leave no shared-memory segment behind."""
    import psutil

    from .conftest import launch_cmd

    out = tmp_path / "run"
    cmd = launch_cmd(2, corpus, out, ["train.max_steps=500", "train.save_every=0", "train.eval_every=0"])
    with open(tmp_path / "launch.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while (out / "metrics.jsonl").read_text().count("\n") < 2 if (out / "metrics.jsonl").is_file() else True:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "launch.log").read_text()[-3000:]
            time.sleep(0.5)
        with pytest.raises(TrainingError, match="is in use by another run \\(host .* pid \\d+\\)"):
            RunLock(out).acquire()  # what a second run's rank 0 does first (tests/train/test_hardening.py)
        descendants = psutil.Process(proc.pid).children(recursive=True)
        proc.terminate()  # SIGTERM to the command the user started
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(descendants, timeout=180)
        assert not alive, f"processes left running after the deepspeed command ended: {alive}"
    finally:
        for p in psutil.Process().children(recursive=True):
            p.kill()
    logged = max(read_metrics(out))
    folder = out / "checkpoints" / f"step_{logged:08d}"
    assert (folder / "COMPLETE").is_file(), (tmp_path / "launch.log").read_text()[-3000:]
    port = cmd[cmd.index("--master_port") + 1]
    assert not sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
