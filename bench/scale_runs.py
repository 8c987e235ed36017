"""Multi-GPU pretraining runs of `launch/pretrain.py`, launched and summarised: scaling over GPU counts,
and preemption with resume on the same and on another number of GPUs.

The driver of the 2-, 4- and 8-GPU runs (one call per machine: everything lands under --out). Every run
is the real entrypoint under the DeepSpeed launcher; figures come from the trainer's own metrics.jsonl.
On CPU, --smoke runs the tiny preset under gloo with 1 and 2 processes so that the driver cannot rot.

    python bench/scale_runs.py scaling --config 1.3b --gpus 1,2,4 --steps 30 --set data.manifest=M ... --out DIR
    python bench/scale_runs.py preempt --config 1.3b --gpus 2 --resume-gpus 1 --steps 30 --signal-after 12 ...
    python bench/scale_runs.py scaling --smoke --out /tmp/scale    # after scripts/run_default.sh (tiny
                                                                   # config's embedded shards) or with
                                                                   # --set data.manifest=...

scaling: one fresh run per GPU count at the same global batch; per run the mean tokens/s and MFU of the
steps after the first two (start-up apart), tokens/s per GPU, peak memory, first and last loss, and the
scaling efficiency (tokens/s per GPU over the first count's).
preempt: an uninterrupted reference run; a run SIGTERMed after --signal-after steps (every rank process
signalled, as Slurm does on preemption) then resumed with --resume auto on the same GPUs, and its
signal-time checkpoint resumed on --resume-gpus GPUs (a universal checkpoint when the count differs); the
largest loss difference to the reference over the resumed steps, for each.

The runs are short: unless --set gives train.warmup_steps, the warm-up is a fifth of --steps (a preset's
own, 2000 steps, exceeds any measurement run and fails validation). Every run config, with each GPU
count's accumulation, is validated before the first launch, so a bad setting costs no GPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the repo's packages first

from bench.common import RESULTS, environment, write_results  # noqa: E402
from train.metrics import read_metrics  # noqa: E402

PRETRAIN = REPO / "launch" / "pretrain.py"
SMOKE_SETS = [  # the tiny preset shrunk for CPU: 64-token sequences, 2 micro-batches of 2 per step on 2 ranks
    "train.seq_len=64", "train.micro_batch_size=2", "train.global_batch_tokens=512", "train.lr=3e-3",
    "train.warmup_steps=2", "train.eval_every=0", "train.log_every=1", "train.precision=fp32",
    "train.wandb.mode=disabled",
]
RUN_SETS = ["train.save_every=0", "train.save_final=false"]  # throughput runs write no checkpoint (a signal does)
COLUMNS = ["run", "world_size", "steps", "tokens_per_step", "tokens_per_s", "tokens_per_s_per_gpu", "mfu",
           "peak_mem_gb", "loss_first", "loss_last", "scaling_efficiency", "max_loss_diff_vs_reference", "status"]


def deepspeed_cmd(nprocs: int, config: str, sets: list[str], resume: str, out_dir: Path) -> list[str]:
    """The documented launch command for `nprocs` processes (GPUs, or gloo processes on CPU)."""
    beside = Path(sys.executable).parent / "deepspeed"  # this interpreter's own launcher first
    launcher = str(beside) if beside.is_file() else shutil.which("deepspeed") or "deepspeed"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = [*sets, f"train.output_dir={out_dir}"]
    return [launcher, "--num_gpus", str(nprocs), "--master_port", str(port), str(PRETRAIN), "--config", config,
            "--resume", resume, *[a for s in overrides for a in ("--set", s)]]


def check_runs(config: str, sets: list[str], worlds: list[int]) -> None:
    """Validate the run config and each world size's batch split before launching (SystemExit: one line)."""
    from config.loader import ConfigError
    from config.schema import load_run_config
    from train.ds_config import accumulation_steps

    try:
        cfg = load_run_config(config, sets)
        for world in worlds:
            accumulation_steps(cfg.train, world)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


def run(cmd: list[str], log: Path, timeout: float, signal_after_step: int | None = None,
        metrics: Path | None = None, env: dict[str, str] | None = None) -> int:
    """Run a launch command (output appended to `log`); with `signal_after_step`, SIGTERM every rank
    process once `metrics` shows that step (as Slurm signals every task on preemption), then wait for
    the launcher to exit. Returns the exit code (124 on timeout)."""
    import psutil

    with log.open("a") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.monotonic() + timeout
        try:
            while signal_after_step is not None and proc.poll() is None and time.monotonic() < deadline:
                if max(read_metrics(metrics.parent), default=0) >= signal_after_step:
                    for p in psutil.Process(proc.pid).children(recursive=True):
                        if any(a.startswith("--local_rank=") for a in p.cmdline()):
                            p.send_signal(signal.SIGTERM)
                    break
                time.sleep(0.1)
            return proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stop_tree(proc)
            return 124
        except BaseException:  # this driver's own SIGTERM or Ctrl-C: the launch must not outlive it
            stop_tree(proc)
            raise


def stop_tree(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the launcher and every process under it (the ranks: a killed launcher cannot forward a
    signal to them, and an orphaned rank would go on using the GPU), then SIGKILL what is left after
    `grace_s` (the ranks save a checkpoint on SIGTERM)."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()


def fresh_work(root: Path, name: str) -> tuple[Path, Path]:
    """An empty <root>/<name>_runs folder for the run folders, and its launch log's path."""
    work = root / f"{name}_runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work, work / "launch.log"


def launch_logged(label: str, cmd: list[str], log: Path, timeout: float, signal_after_step: int | None = None,
                  metrics: Path | None = None) -> int:
    """`run` the launch and print its exit code after `label`; on failure also the launch's last lines, so
    that a failure reads from this output alone."""
    start = log.stat().st_size if log.exists() else 0
    rc = run(cmd, log, timeout, signal_after_step, metrics)
    print(f"{label}, exit {rc}", flush=True)
    if rc != 0:
        print(*launch_tail(log, start), sep="\n", flush=True)
    return rc


def launch_tail(log: Path, start: int, lines: int = 40) -> list[str]:
    """The last `lines` lines that one launch appended to `log` from byte offset `start`."""
    with log.open("rb") as f:
        f.seek(start)
        return f.read().decode(errors="replace").splitlines()[-lines:]


def summarise(name: str, world: int, out_dir: Path, rc: int) -> dict:
    """One results row from a run's metrics.jsonl (steps after the first two count for speed)."""
    steps = {s: r for s, r in read_metrics(out_dir).items() if "loss" in r}
    row: dict = {"run": name, "world_size": world, "steps": len(steps), "status": "ok" if rc == 0 else f"exit {rc}"}
    if not steps:
        return row
    steady = [r for s, r in sorted(steps.items()) if s > min(steps) + 1] or list(steps.values())
    tps = statistics.mean(r["tokens_per_s"] for r in steady)
    first, last = steps[min(steps)], steps[max(steps)]
    row.update(tokens_per_step=last["tokens"] // max(steps), tokens_per_s=tps, tokens_per_s_per_gpu=tps / world,
               peak_mem_gb=max((r.get("mem_gb") or 0.0) for r in steps.values()) or None,
               loss_first=first["loss"], loss_last=last["loss"],
               losses={str(s): r["loss"] for s, r in sorted(steps.items())})
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    if mfus:
        row["mfu"] = statistics.mean(mfus)
    return row


def loss_diff(run_dir: Path, reference: Path, after_step: int) -> float | None:
    """Largest |loss - reference loss| over the steps after `after_step` that both runs logged."""
    got, ref = read_metrics(run_dir), read_metrics(reference)
    common = [s for s in got if s > after_step and s in ref and "loss" in got[s] and "loss" in ref[s]]
    return max((abs(got[s]["loss"] - ref[s]["loss"]) for s in common), default=None)


def latest_checkpoint(out_dir: Path) -> Path:
    """The checkpoint a run's `latest` pointer names (train/checkpoint.py's layout)."""
    pointer = out_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        raise SystemExit(f"{out_dir} wrote no checkpoint (see {out_dir.parent / 'launch.log'})")
    return out_dir / "checkpoints" / pointer.read_text().strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("scaling", "preempt"))
    ap.add_argument("--config", default="1.3b", help="run config name or YAML")
    ap.add_argument("--gpus", default="1,2", help="scaling: GPU counts; preempt: the one count of the run")
    ap.add_argument("--resume-gpus", type=int, help="preempt: the GPU count that resumes the checkpoint")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--signal-after", type=int, default=10, help="preempt: SIGTERM once this step is logged")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per launch")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny preset under gloo, 1 and 2 processes")
    ap.add_argument("--check", action="store_true", help="validate every run's config and batch split, launch nothing")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument("--work", type=Path, help="scratch folder for the run folders, removed at the end "
                    "(default: kept, under <out>/<name>_runs)")
    ap.add_argument("--name", help="results file name (default scale_<mode>_<config>)")
    args = ap.parse_args(argv)
    # a SIGTERM (bench/run.sh's time limit) ends the driver through its `finally`: the launch log is kept
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.smoke:
        args.config, args.steps, args.signal_after = "tiny", 12, 2  # 10 steps of margin for the signal
        args.sets = [*SMOKE_SETS, *args.sets]
        args.resume_gpus = args.resume_gpus or 1
    sets = [*RUN_SETS, *args.sets, f"train.max_steps={args.steps}"]
    if not any(s.startswith("train.warmup_steps=") for s in args.sets):
        sets.append(f"train.warmup_steps={max(1, args.steps // 5)}")
    worlds = [int(g) for g in args.gpus.split(",")]
    if args.mode == "preempt" and args.resume_gpus:
        worlds.append(args.resume_gpus)
    check_runs(args.config, sets, worlds)
    if args.check:
        print(f"{args.mode} {args.config}: run configs valid on {worlds} GPU(s)")
        return 0
    name = args.name or f"scale_{args.mode}_{Path(args.config).stem}" + ("_smoke" if args.smoke else "")
    work, log = fresh_work(args.work or args.out, name)
    meta = environment(_device()) | {"config": args.config, "sets": sets, "mode": args.mode}
    rows: list[dict] = []

    def launch(label: str, world: int, resume: str = "none", out_dir: Path | None = None,
               signal_after: int | None = None) -> tuple[Path, int]:
        out_dir = out_dir or work / label
        rc = launch_logged(f"{label}: {world} GPU(s)", deepspeed_cmd(world, args.config, sets, resume, out_dir), log,
                           args.timeout, signal_after, out_dir / "metrics.jsonl")
        return out_dir, rc

    def record(row: dict) -> None:
        rows.append(row)
        print({k: v for k, v in row.items() if k != "losses"}, flush=True)
        write_results(name, rows, meta, COLUMNS, args.out, title=f"{args.mode}: {args.config} ({meta['device']})")

    try:
        if args.mode == "scaling":
            for world in [int(g) for g in args.gpus.split(",")]:
                out_dir, rc = launch(f"gpus{world}", world)
                row = summarise(f"gpus{world}", world, out_dir, rc)
                if rows and rows[0].get("tokens_per_s_per_gpu") and row.get("tokens_per_s_per_gpu"):
                    row["scaling_efficiency"] = row["tokens_per_s_per_gpu"] / rows[0]["tokens_per_s_per_gpu"]
                record(row)
        else:
            preempt(args, launch, record)
    finally:
        shutil.copy(log, args.out / f"{name}_launch.log")
        if args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def preempt(args: argparse.Namespace, launch: Callable[..., tuple[Path, int]], record: Callable[[dict], None]) -> None:
    """Reference, SIGTERMed, resumed on --resume-gpus (from the signal-time checkpoint) and resumed on the
    same GPUs (--resume auto) runs, with their loss differences to the reference."""
    world = int(args.gpus.split(",")[0])
    ref, rc = launch("reference", world)
    record(summarise("reference", world, ref, rc))
    cut, rc = launch("preempted", world, signal_after=args.signal_after)
    ckpt = latest_checkpoint(cut)
    cut_step = int(ckpt.name.removeprefix("step_"))
    record(summarise(f"preempted (SIGTERM after step {args.signal_after}, saved step {cut_step})", world, cut, rc))
    if args.resume_gpus:  # first: the resume on another count reads the signal-time checkpoint as left
        other, rc = launch("resumed_other_world", args.resume_gpus, resume=str(ckpt))
        row = summarise(f"resumed on {args.resume_gpus} GPU(s) from step {cut_step}", args.resume_gpus, other, rc)
        record(row | {"max_loss_diff_vs_reference": loss_diff(other, ref, cut_step)})
    _, rc = launch("preempted", world, resume="auto", out_dir=cut)
    row = summarise(f"resumed on {world} GPU(s) (--resume auto)", world, cut, rc)
    record(row | {"max_loss_diff_vs_reference": loss_diff(cut, ref, cut_step)})


def _device():
    """The device the launched ranks train on, for the results' metadata (they inherit this environment)."""
    import torch

    from train.distributed import training_on_cuda

    return torch.device("cuda" if training_on_cuda() else "cpu")


if __name__ == "__main__":
    sys.exit(main())
