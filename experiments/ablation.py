"""Ablations: variants of one run config trained side by side, one after another (launch/ablate.py).

A variants file (YAML; example config/ablations/patterns.yaml):

    variants:
      - name: alternating           # folder name: letters, digits, _ . -
        pattern: alternating        # optional: a named layer pattern of model/variants.py
        set: [model.attn_ratio=0.5] # optional: --set overrides of this variant
        match_params: true          # optional: ffn_hidden sized to the base config's parameter count

Every variant x seed is one run of launch/pretrain.py (one process, or a DeepSpeed world with --gpus N)
in OUTPUT/<variant>/seed_<seed>, with the base config (--config, --set) and, on top, the variant's
overrides and the runner's own: train.seed, train.max_steps (the token budget / tokens per step),
train.output_dir, train.save_final=true. The data, its order (train/data.py: it depends on neither the
seed nor the model), the token budget and the LR schedule are therefore the same for all: a variant
may not override data.* or the keys in FIXED. Every run config is validated before the first run.

Resuming: a run whose final export (OUTPUT/<variant>/seed_<seed>/final/meta.json) is at its last step is
finished and skipped; any other is launched with --resume auto, so an interrupted one continues from its
newest complete checkpoint.

Across machines: `--only` trains some variants now, the rest elsewhere; the report needs only each run's
metrics.jsonl and final/meta.json (and final/eval_results.json), so those files, gathered into one OUTPUT,
make the report with `--report-only`. final/meta.json holds the curated data's content hash, and runs of
different corpora are refused (`check_same_data`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from pydantic import Field

from config.base import StrictModel
from config.loader import ConfigError, parse_override, read_yaml, validate
from config.schema import RunConfig, load_run_config
from model.sizing import count_params
from model.variants import VARIANTS, match_ffn

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "launch" / "pretrain.py"
# What every variant shares (the runner sets the first four itself); data.* is shared as a whole.
FIXED = ("train.seed", "train.max_steps", "train.output_dir", "train.save_final", "train.seq_len",
         "train.global_batch_tokens", "train.lr", "train.min_lr_ratio", "train.warmup_steps", "train.schedule")
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# How long a finished run's output may stay open (its last lines still in the pipe) before what holds it is stopped.
OUTPUT_GRACE_S = 30.0
# How long a run may take to exit after its final export (teardown: a barrier, the process group), how often that is
# checked, and how long its ranks get to print their stacks before they are stopped.
EXIT_GRACE_S, POLL_S, STACKS_S = 120.0, 5.0, 2.0


class VariantSpec(StrictModel):
    name: str = Field(..., description="Folder and report name of the variant.")
    pattern: str | None = Field(None, description=f"A named layer pattern: {', '.join(VARIANTS)}.")
    set: list[str] = Field(default_factory=list, description="--set overrides (KEY=VALUE) of this variant.")
    match_params: bool = Field(False, description="Size model.ffn_hidden to the base config's parameter count.")
    description: str | None = None


class VariantsFile(StrictModel):
    variants: list[VariantSpec] = Field(..., min_length=1)


@dataclass
class PlannedRun:
    variant: str
    seed: int
    cfg: RunConfig
    sets: list[str]  # everything on top of the base config, in order
    out: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out = Path(self.cfg.train.output_dir)

    @property
    def finished(self) -> bool:
        """The final export of the last step exists (written only after the last step's checkpoint)."""
        import json

        meta = self.out / "final" / "meta.json"
        return meta.is_file() and json.loads(meta.read_text()).get("step") == self.cfg.train.max_steps


def load_variants(path: Path) -> list[VariantSpec]:
    """The variants file, validated (ConfigError naming the variant and key)."""
    if not Path(path).is_file():
        raise ConfigError(f"variants file {path} does not exist")
    specs = validate(VariantsFile, read_yaml(path)).variants
    seen: set[str] = set()
    for v in specs:
        where = f"variants file {path}: variant '{v.name}'"
        if not NAME.match(v.name):
            raise ConfigError(f"{where}: name may hold only letters, digits, '_', '.' and '-'")
        if v.name in seen:
            raise ConfigError(f"{where}: the name is used twice")
        seen.add(v.name)
        if v.pattern is not None and v.pattern not in VARIANTS:
            raise ConfigError(f"{where}: pattern '{v.pattern}' is unknown; choose one of {', '.join(VARIANTS)} "
                              "or give model.pattern in set")
        for item in v.set:
            key = ".".join(parse_override(item)[0])
            if key.startswith("data.") or key == "data" or key in FIXED:
                raise ConfigError(f"{where}: set {key} is shared by every variant (data, seed, token budget, LR "
                                  "schedule): give it to launch/ablate.py --set instead")
            if v.match_params and key == "model.ffn_hidden":
                raise ConfigError(f"{where}: set model.ffn_hidden and match_params: true exclude each other")
    return specs


def plan(config: str, base_sets: list[str], specs: list[VariantSpec], seeds: list[int] | None, tokens: int,
         output: Path, check_data: bool = True) -> list[PlannedRun]:
    """Every variant x seed's run config, validated (and, with `check_data`, the shared manifest opened:
    ManifestError); ConfigError names the variant and key."""
    from train.trainer import open_manifest

    base = load_run_config(config, base_sets)
    if check_data:
        open_manifest(base)  # the trainer's own checks of the shared data, before any run
    per_step = base.train.global_batch_tokens
    if tokens < per_step:
        raise ConfigError(f"--tokens {tokens} is less than one step ({per_step} tokens, train.global_batch_tokens)")
    steps = tokens // per_step
    target = count_params(base.model)
    runs = []
    for v in specs:
        where = f"variant '{v.name}'"
        try:
            own = list(v.set)
            cfg = load_run_config(config, [*base_sets, *own])
            if v.pattern is not None:
                own.insert(0, f"model.pattern={VARIANTS[v.pattern].rule(cfg.model)}")
                cfg = load_run_config(config, [*base_sets, *own])
            if v.match_params:
                try:
                    own.append(f"model.ffn_hidden={match_ffn(cfg.model, target).ffn_hidden}")
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
            for seed in seeds or [base.train.seed]:
                run_dir = output / v.name / f"seed_{seed}"
                sets = [*own, f"train.seed={seed}", f"train.max_steps={steps}", f"train.output_dir={run_dir}",
                        "train.save_final=true"]
                runs.append(PlannedRun(v.name, seed, load_run_config(config, [*base_sets, *sets]), sets))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return runs


def check_same_data(runs: list[PlannedRun]) -> None:
    """ConfigError unless every finished run trained on the same curated data (`data_sha256` in its
    final/meta.json, config.manifest.content_sha256): runs of several machines compare only on one corpus."""
    import json

    seen: dict[str, str] = {}
    for run in runs:
        meta = run.out / "final" / "meta.json"
        digest = json.loads(meta.read_text()).get("data_sha256") if run.finished else None
        if digest:
            seen.setdefault(digest, f"{run.variant} seed {run.seed}")
    if len(seen) > 1:
        (a, first), (b, second) = list(seen.items())[:2]
        raise ConfigError(f"{first} and {second} trained on different data ({a[:12]} vs {b[:12]}): "
                          "an ablation compares runs of one corpus; train them again on the same manifest")


def launch_command(config: str, base_sets: list[str], run: PlannedRun, gpus: int) -> list[str]:
    """launch/pretrain.py for `run`: this interpreter (a world of one) or the DeepSpeed launcher."""
    args = [str(PRETRAIN), "--config", config, "--resume", "auto",
            *[a for s in [*base_sets, *run.sets] for a in ("--set", s)]]
    if gpus == 1:
        return [sys.executable, *args]
    from bench.scale_runs import deepspeed_cmd  # the documented launch: this interpreter's launcher, a free port

    cmd = deepspeed_cmd(gpus, config, [*base_sets, *run.sets], "auto", run.out)
    return cmd[:cmd.index(str(PRETRAIN))] + args


def train(config: str, base_sets: list[str], run: PlannedRun, gpus: int) -> int:
    """Run (or resume) one variant; its output goes to the console and OUT/launch.log. Returns the exit code.

    SIGINT/SIGTERM reaching this process are passed to the run (which saves a checkpoint at the next step
    boundary and exits 0) instead of ending this one, so the run's output is read to its end. The run gets its
    own process group: what it leaves behind when it exits (a compile worker holding its stdout open) is
    stopped, so the next variant does not wait for an end of output that never comes."""
    run.out.mkdir(parents=True, exist_ok=True)
    cmd = launch_command(config, base_sets, run, gpus)
    with open(run.out / "launch.log", "a") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        reader = threading.Thread(target=_copy_lines, args=(proc.stdout, log), daemon=True)
        reader.start()
        previous = {sig: signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            rc = _wait(proc, run)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        reader.join(timeout=OUTPUT_GRACE_S)
        if reader.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            reader.join()
        return rc


def _wait(proc: subprocess.Popen, run: PlannedRun) -> int:
    """The run's exit code. A run whose final export exists but whose process is still there EXIT_GRACE_S later
    is hung in its teardown: its work is saved, so it is asked for its threads' stacks (SIGUSR1,
    train/distributed.py's fail_loudly, into its log), stopped, and counted as finished (0)."""
    finished_at = None
    while True:
        try:
            return proc.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            pass
        if finished_at is None:
            finished_at = time.monotonic() if run.finished else None
        elif time.monotonic() - finished_at > EXIT_GRACE_S:
            print(f"warning: {run.out} exported its final step but did not exit within {EXIT_GRACE_S:.0f} s; "
                  "stopped (its threads' stacks are in its launch.log)", file=sys.stderr, flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGUSR1)
                time.sleep(STACKS_S)
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return 0


def _copy_lines(stream: TextIO, log: TextIO) -> None:
    """Each line of the run's output to the console and its launch.log, until the output closes."""
    for line in stream:
        sys.stdout.write(line)
        log.write(line)
