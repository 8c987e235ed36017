"""Step checkpoints: atomic saves, resume (also on another world size), rotation.

Layout under <output_dir>/checkpoints/:

    latest                    the tag of the newest complete checkpoint (DeepSpeed's format)
    step_00000100/
      mp_rank_00_model_states.pt, *zero_pp_rank_*_optim_states.pt   DeepSpeed (ZeRO-partitioned)
      rng/rank_00000.pt ...   python, numpy, torch (and cuda) RNG states of every rank
      trainer_state.json      step, consumed samples/tokens, world size, ZeRO stage, data identity,
                              git commit, package versions
      run_config.yaml         the resolved run config
      COMPLETE                written last, listing every file above with its size: only folders
                              holding it are resumed from, and only when their files match it
      universal/              DeepSpeed universal checkpoint, made on demand (world size changed)

A save: DeepSpeed writes the step folder (save_latest=False), every rank its RNG file and fsyncs the
files it wrote, then after a barrier rank 0 writes trainer_state.json, run_config.yaml, COMPLETE and
atomically replaces `latest`. A crash at any point before COMPLETE leaves the previous checkpoint as
the newest complete one; a half-written folder is deleted when its step is saved again or rotated out.
`--resume auto` takes the newest complete checkpoint whose files match its COMPLETE list and warns
about each newer one it passes over (train/checkpoint_files.py). Loading never runs code from a
checkpoint: its pickles may hold tensors and plain data only.

Resume restores weights, optimizer and scheduler (DeepSpeed), the RNG states and the data position
(consumed samples; see train/data.py). On another world size or ZeRO stage, the checkpoint is first
converted to a universal checkpoint (deepspeed.checkpoint.ds_to_universal, once, by rank 0) and
loaded with `checkpoint.load_universal`; RNG states are then re-seeded per rank.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from argparse import Namespace
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from config.atomic import atomic_write_bytes, atomic_write_json
from config.loader import ConfigError
from config.schema import RunConfig, load_run_config, save_run_config
from model.weights import CheckpointError
from train.checkpoint_files import (
    checkpoint_problem,
    complete_record,
    fsync_files,
    load_data,
    rank_files,
)
from train.distributed import DistEnv, barrier, training_on_cuda
from train.provenance import provenance

log = logging.getLogger(__name__)

LATEST, COMPLETE, STATE, RUN_CONFIG, RNG_DIR, UNIVERSAL = (
    "latest", "COMPLETE", "trainer_state.json", "run_config.yaml", "rng", "universal")


@dataclass
class TrainerState:
    """What the trainer needs besides DeepSpeed's state to continue exactly."""

    step: int = 0  # optimizer steps done
    consumed_samples: int = 0  # global sequences consumed: the data position
    consumed_tokens: int = 0
    seq_len: int = 0
    world_size: int = 0
    zero_stage: int = 0
    manifest_sha256: str = ""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(folder: Path) -> int:
    return int(folder.name.removeprefix("step_"))


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def read_state(folder: Path) -> TrainerState:
    """The trainer state of a step folder (CheckpointError when missing or damaged)."""
    path = folder / STATE
    try:
        raw = json.loads(path.read_text())
        return TrainerState(**{k: raw[k] for k in TrainerState.__dataclass_fields__})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is missing or damaged ({type(exc).__name__}: {exc}): "
                              "resume or export another checkpoint") from None


def read_run_config(folder: Path) -> RunConfig:
    """The run config a step folder was saved with (CheckpointError when missing or damaged)."""
    try:
        return load_run_config(folder / RUN_CONFIG)
    except ConfigError as exc:
        raise CheckpointError(f"{folder / RUN_CONFIG} is missing or damaged ({exc}): "
                              "resume or export another checkpoint") from None


def problem_of(folder: Path) -> str | None:
    """Why the complete step `folder` cannot be used (None: its files are all there, as written)."""
    try:
        world_size = read_state(folder).world_size
    except CheckpointError:
        world_size = None
    return checkpoint_problem(folder, world_size)


def check_intact(folder: Path) -> Path:
    if (problem := problem_of(folder)) is not None:
        raise CheckpointError(f"checkpoint {folder} is damaged: {problem}; pass another --resume/--export")
    return folder


@contextmanager
def reading(folder: Path) -> Iterator[None]:
    """Turn a checkpoint file that cannot be unpickled (code in it, or truncated) into one line."""
    try:
        yield
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"a file of {folder} holds more than tensors and plain data, refused (it could run "
                              f"code: {str(exc).splitlines()[0][:200]}); only load checkpoints you trust") from None
    except (EOFError, RuntimeError) as exc:
        if not isinstance(exc, EOFError) and "PytorchStreamReader" not in str(exc):
            raise
        raise CheckpointError(f"a file of {folder} is truncated or damaged ({str(exc).splitlines()[0][:200]}): "
                              "pass another checkpoint") from None


def _step_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()), key=step_of)


def latest_complete(root: Path) -> Path | None:
    """The newest complete step folder whose files are intact, else None; each newer complete one passed
    over is named in a warning. CheckpointError when there are complete ones but none is intact."""
    done = [p for p in _step_dirs(root) if is_complete(p)]
    for folder in reversed(done):
        if (problem := problem_of(folder)) is None:
            return folder
        log.warning("checkpoint %s is damaged (%s): falling back to the previous complete one", folder, problem)
    if done:
        raise CheckpointError(f"every complete checkpoint under {root} is damaged (see the warnings): "
                              "pass --resume none with a new train.output_dir")
    return None


def resolve_resume(resume: str, root: Path) -> Path | None:
    """`none` -> None; `auto` -> newest complete checkpoint under `root` (or None); a path -> a complete
    step folder, or the newest complete one in a checkpoints/ or output folder (CheckpointError if none)."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_complete(root) if root.is_dir() else None
    path = Path(resume)
    if is_complete(path):
        return check_intact(path)
    for candidate_root in (path, path / "checkpoints"):
        if candidate_root.is_dir() and (found := latest_complete(candidate_root)) is not None:
            return found
    raise CheckpointError(
        f"no complete checkpoint at {path} (a step folder holding {COMPLETE}, or a folder of them): "
        "pass another --resume or --resume auto"
    )


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if training_on_cuda():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and training_on_cuda():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _replace_file_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


class Checkpointer:
    """Saves, rotates and loads the step checkpoints of one run (all ranks call every method)."""

    def __init__(self, out_dir: Path, keep_last: int, env: DistEnv, exclude_frozen: bool = False) -> None:
        """exclude_frozen: leave parameters without requires_grad out of the saved module state (a frozen
        base that the run rebuilds from its own files, adapt/training.py); loading then accepts their absence."""
        self.root = Path(out_dir) / "checkpoints"
        self.keep_last, self.env, self.exclude_frozen = keep_last, env, exclude_frozen

    def save(self, engine: Any, state: TrainerState, cfg: RunConfig,
             extra: Callable[[Path], None] | None = None) -> Path:
        """Write a complete checkpoint of `state.step` (see the module doc for the order); `extra(folder)`
        writes more files on rank 0 before COMPLETE lists them (a fine-tuning run's LoRA adapter)."""
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        tag = tag_for(state.step)
        folder = self.root / tag
        if self.env.is_main and folder.exists():
            shutil.rmtree(folder)  # a half-written save of this step from a crashed run
        barrier()
        # the universal-checkpoint info lets ds_to_universal convert this checkpoint later
        client = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client, save_latest=False,
                               exclude_frozen_parameters=self.exclude_frozen)
        (folder / RNG_DIR).mkdir(parents=True, exist_ok=True)
        rng_file = folder / RNG_DIR / f"rank_{self.env.rank:05d}.pt"
        _replace_file_atomic(rng_file, _rng_state())
        fsync_files([*rank_files(folder, self.env.rank), rng_file])
        barrier()  # every rank's files are on disk
        if self.env.is_main:
            save_run_config(cfg, folder / RUN_CONFIG)
            if extra is not None:
                extra(folder)
            atomic_write_json(folder / STATE, {**asdict(state), **provenance()})
            atomic_write_bytes(folder / COMPLETE, complete_record(tag, folder))
            atomic_write_bytes(self.root / LATEST, tag.encode())
            self._rotate(folder)
        barrier()
        return folder

    def _rotate(self, newest: Path) -> None:
        """Keep the newest `keep_last` complete checkpoints; drop every other folder older than `newest`."""
        complete = [p for p in _step_dirs(self.root) if is_complete(p)]
        keep = set(complete[-self.keep_last:]) | {newest}
        for folder in _step_dirs(self.root):
            if folder not in keep and step_of(folder) < step_of(newest):
                shutil.rmtree(folder, ignore_errors=True)
                log.info("removed old checkpoint %s", folder.name)

    def needs_universal(self, folder: Path, zero_stage: int) -> bool:
        state = read_state(folder)
        return state.world_size != self.env.world_size or state.zero_stage != zero_stage

    def ensure_universal(self, folder: Path) -> None:
        """Convert `folder` to `folder/universal` once (rank 0), then let every rank continue."""
        if self.env.is_main and not is_complete(folder / UNIVERSAL):
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            tmp = folder / f"{UNIVERSAL}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("converting %s to a universal checkpoint (world size or ZeRO stage changed)", folder)
            with reading(folder):
                ds_to_universal(Namespace(input_folder=str(folder), output_folder=str(tmp), num_extract_workers=1,
                                          num_merge_workers=1, keep_temp_folder=False, strict=True,
                                          inject_missing_state=False))
            atomic_write_bytes(tmp / COMPLETE, b"universal\n")
            shutil.rmtree(folder / UNIVERSAL, ignore_errors=True)
            os.replace(tmp, folder / UNIVERSAL)
            atomic_write_bytes(folder / "latest_universal", UNIVERSAL.encode())  # ds_to_universal named the tmp
        barrier()

    def load(self, engine: Any, folder: Path, universal: bool, seed: int) -> TrainerState:
        """Restore DeepSpeed's state from `folder` (or its universal form) and this rank's RNG states
        (on another world size: fresh ones from `seed`, the step and the rank)."""
        load_dir, tag = (folder, UNIVERSAL) if universal else (folder.parent, folder.name)
        with reading(folder):
            path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True, load_module_strict=not self.exclude_frozen)
        if path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint in {load_dir / tag}: pass another --resume")
        state = read_state(folder)
        rng_file = folder / RNG_DIR / f"rank_{self.env.rank:05d}.pt"
        if state.world_size == self.env.world_size and rng_file.is_file():
            with reading(folder):
                _set_rng_state(load_data(rng_file))
        else:
            seed_everything(seed + 1_000_003 * state.step + self.env.rank)
        log.info("resumed from %s at step %d (%d samples consumed)", folder, state.step, state.consumed_samples)
        return state
