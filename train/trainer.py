"""The pretraining loop: data, model and DeepSpeed engine; train, evaluate, checkpoint, export.

One optimizer step (G = sequences per step, W data-parallel ranks, A = G / (W x micro_batch) accumulation
steps; with train.context_parallel = C, W is the number of replicas, world size / C, and each of a
replica's C ranks holds a slice of every sequence: train/context_parallel.py):
  1. every rank takes its A micro-batches of the step (train/data.py: the order does not depend on W);
  2. one all_reduce gives N, the number of scored targets of the whole step;
  3. each micro-batch's summed NLL goes to `engine.backward` scaled by W * A / N: DeepSpeed divides
     by A and averages over W, so the update follows the mean NLL over all N targets of the step,
     whatever W, A and the document boundaries in each micro-batch (resume on another world size
     continues the same optimisation up to float summation order);
  4. one all_reduce of [NLL sum, stop flag, non-finite flag per rank] gives the logged loss, the
     agreement to stop after a SIGTERM/SIGINT, and which rank saw a non-finite loss.

A non-finite loss makes the gradients non-finite; DeepSpeed's ZeRO optimizer then skips the update
(`check_grad_overflow`). train.on_nan=skip logs the step and rank and goes on; stop raises an error
naming them.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from config.loader import ConfigError
from config.manifest import Manifest, content_sha256, load_manifest, sha256_of
from config.schema import RunConfig
from model.hybrid import HybridLM
from model.kernels import make_deterministic
from model.loss import IGNORE_INDEX, token_nll
from model.sizing import count_params, train_flops_per_token
from model.weights import CheckpointError, arch_diff
from train.activation_checkpointing import apply_activation_checkpointing
from train.checkpoint import (
    Checkpointer,
    TrainerState,
    read_run_config,
    read_state,
    reading,
    resolve_resume,
    seed_everything,
)
from train.checkpoint_files import enforce_data_only_loading
from train.consolidate import (
    gather_fp32_state_dict,
    state_dict_from_checkpoint,
    write_bundle,
)
from train.context_parallel import (
    ContextLayout,
    context_layout,
    init_groups,
    slice_batch,
)
from train.data import TrainData
from train.distributed import DistEnv, StopSignal, barrier, init_distributed
from train.ds_config import (
    accumulation_steps,
    build_ds_config,
    read_ds_json,
    zero_stage,
)
from train.errors import TrainingError
from train.fp8 import check_fp8_device, check_fp8_zero_stage, convert_to_fp8, step_weights
from train.gpu_stats import gather_gpu_stats, open_gpu_stats
from train.init_from import load_initial_weights
from train.grad_fold import install_fold
from train.graph_step import (
    GraphedLM,
    GraphedTrainingForward,
    check_graphable,
    graph_training_forward,
)
from train.metrics import MetricsLogger, device_peak_flops, memory_gb
from train.optim import follow_current_config, lr_multiplier, param_groups
from train.reduction import skip_lone_reduction
from train.run_lock import RunLock

log = logging.getLogger(__name__)
MODEL_INPUTS = ("input_ids", "labels", "position_ids", "seq_idx")


# ---- set-up ------------------------------------------------------------------------------------------
def open_manifest(cfg: RunConfig) -> Manifest:
    """Load the manifest, check its files (sizes), and check it fits the model and sequence length."""
    if cfg.model is None:
        raise ConfigError("adapt.base is set: a wrapped transformer trains with launch/adapt.py (docs/adapt.md)")
    if cfg.data.manifest is None:
        raise ConfigError("data.manifest is not set: pass --set data.manifest=PATH/manifest.json")
    manifest = load_manifest(cfg.data.manifest)
    manifest.verify(checksums=False)
    vocab = manifest.tokenizer.vocab_size
    if vocab != cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) differs from the manifest tokenizer's "
                          f"vocab_size ({vocab}): set model.vocab_size={vocab}")
    if cfg.train.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"train.seq_len ({cfg.train.seq_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")
    return manifest


def build_model(cfg: RunConfig, device: torch.device) -> HybridLM:
    """The model initialised from train.seed (identical on every rank), built directly on `device`; with
    train.precision=fp8, its large linear layers swapped for float8 ones (train/fp8.py; same parameters)."""
    seed_everything(cfg.train.seed)
    with device:
        model = (GraphedLM if cfg.train.cuda_graph else HybridLM)(cfg.model)
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing, cfg.train.checkpoint_block_types)
    model.set_impl()
    if cfg.train.precision == "fp8":
        names = convert_to_fp8(model, cfg.train.fp8)
        log.info("float8 (%s): %d linear layers (train/fp8.py)", cfg.train.fp8.recipe, len(names))
    return model


def prepare_zero3(model: HybridLM) -> None:
    """ZeRO-3 gathers a module's parameters around its forward. The kernel path reads some weights
    outside the modules that hold them (the fused Mamba2 scan takes its conv, norm and out_proj weights
    as arguments; the fused SwiGLU concatenates gate and up): each such module is one ZeRO-3 leaf, all
    its parameters gathered together (`HybridLM.zero3_leaves`, which asks every block's mixer). The LM
    head reads the embedding/head weight outside that module: it is registered with the model's forward."""
    import deepspeed
    from deepspeed.utils import set_z3_leaf_module

    for leaf in model.zero3_leaves():
        set_z3_leaf_module(leaf, True)
    deepspeed.zero.register_external_parameter(model, model.head_weight)


def build_engine(model: HybridLM, cfg: RunConfig, ds_config: dict, mpu: Any = None) -> Any:
    """mpu: DeepSpeed's sequence-parallel groups under context parallelism (train/context_parallel.py)."""
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    if zero_stage(ds_config) == 3:
        prepare_zero3(model)
    schedule = lr_multiplier(cfg.train)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.train.weight_decay), config=ds_config,
        lr_scheduler=lambda optimizer: LambdaLR(optimizer, schedule), mpu=mpu,
    )
    fold = install_fold(engine, cfg.train.grad_fold)
    if fold != "deepspeed":
        log.info("ZeRO-1 bf16 gradient fold: %s (train/grad_fold.py)", fold)
    if skip_lone_reduction(engine):
        log.info("one rank in the gradient reduction group: no boundary all-reduce (train/reduction.py)")
    return engine


# ---- one step ----------------------------------------------------------------------------------------
def forward_nll(engine: Any, batch: dict[str, torch.Tensor], loss_chunk_tokens: int = 0) -> torch.Tensor:
    """Per-target NLL (b, l) in float32 (0 where labels are -100): the fused cross-entropy on the
    kernel path (model/loss.py); loss_chunk_tokens > 0: head and loss in chunks inside the forward."""
    inputs = {"position_ids": batch.get("position_ids"), "seq_idx": batch.get("seq_idx")}
    if loss_chunk_tokens:
        return engine(batch["input_ids"], labels=batch["labels"], loss_chunk_tokens=loss_chunk_tokens, **inputs)
    logits = engine(batch["input_ids"], **inputs)
    return token_nll(logits, batch["labels"], engine.module.impl)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(values)
    return values


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs on `device`, except `seq_idx`: the model derives the document boundaries from it
    on the host (model.documents.DocumentLayout) and moves them itself, so no forward waits on a
    device-to-host copy."""
    return {k: batch[k] if k == "seq_idx" else batch[k].to(device, non_blocking=True)
            for k in MODEL_INPUTS if k in batch}


def check_finite(step: int, bad_ranks: list[int], skipped: bool, on_nan: str) -> None:
    """Act on a step whose loss was non-finite on `bad_ranks` (train.on_nan: stop | skip)."""
    if not bad_ranks:
        return
    where = f"non-finite loss at step {step} on rank(s) {', '.join(map(str, bad_ranks))}"
    if on_nan == "stop":
        raise TrainingError(f"{where} (train.on_nan=stop): resume from the last checkpoint with a lower "
                            "train.lr, or set train.on_nan=skip")
    if not skipped:
        raise TrainingError(f"{where}, and DeepSpeed applied the update: resume from the last checkpoint")
    log.warning("%s: update skipped (train.on_nan=skip)", where)


def check_model_matches(cfg: RunConfig, folder: Path) -> None:
    """The model config must build the checkpoint's tensors and math (one line naming the keys that differ)."""
    if diff := arch_diff(cfg.model, read_run_config(folder).model):
        raise ConfigError(f"model config differs from the one {folder} was trained with at: "
                          + ", ".join(f"model.{k}" for k in diff)
                          + "; set them as in its run_config.yaml, or start a new run with --resume none")


def check_fresh_start(out: Path, root: Path) -> None:
    """--resume none must not write over an existing run's checkpoints and metrics."""
    if (out / "metrics.jsonl").is_file() or any(root.glob("step_*")):
        raise ConfigError(f"--resume none: {out} holds a run (metrics.jsonl or checkpoints) that a fresh start would "
                          "overwrite: pass another train.output_dir, or --force to overwrite it")


class Trainer:
    frozen_base = False  # True: the frozen parameters are left out of step checkpoints (adapt/training.py)

    def __init__(self, cfg: RunConfig, resume: str, dry_run: bool = False, force: bool = False) -> None:
        """Build data, processes, model and engine and restore the resumed checkpoint. A dry run writes
        nothing: it takes no lock and converts or loads no checkpoint (it names the one it would resume)."""
        self.cfg, t = cfg, cfg.train
        stage = zero_stage(read_ds_json(t.ds_config))  # a bad train.ds_config stops before data and processes
        MetricsLogger.check_wandb(cfg)  # not ~30 s later, when the first step's logger starts
        enforce_data_only_loading()  # before DeepSpeed reads any checkpoint
        if t.deterministic:
            make_deterministic()  # before any CUDA matmul and before mamba_ssm is imported
        self.data = self.open_data()
        self.env: DistEnv = init_distributed()
        if t.precision == "fp8":  # before any data check or model: one line on a machine without float8
            check_fp8_device(self.env.device)
            check_fp8_zero_stage(stage)
        self.cp: ContextLayout = context_layout(self.env.rank, self.env.world_size, t.context_parallel)
        self.verify_data()
        self.stop = StopSignal()
        self.out = Path(t.output_dir)
        self.ckpt = Checkpointer(self.out, t.keep_last, self.env, exclude_frozen=self.frozen_base)
        self.accumulation = accumulation_steps(t, self.cp.replicas)
        self.lock = RunLock(self.out)
        if not dry_run:
            self._take_lock()
        if resume == "none" and not force:
            check_fresh_start(self.out, self.ckpt.root)
        self.resume_dir = resume_dir = resolve_resume(resume, self.ckpt.root)
        if resume_dir is not None:
            self.check_resumable(resume_dir)
        if dry_run:
            resume_dir = None
        universal = resume_dir is not None and self.ckpt.needs_universal(resume_dir, stage)
        if universal:
            self.ckpt.ensure_universal(resume_dir)
        self.ds_config = build_ds_config(t, self.cp.replicas, self.env.on_cuda, load_universal=universal)
        if stage == 2 and self.env.world_size == 1 and self.env.on_cuda:
            log.info("one GPU: ZeRO-2 partitions nothing here but still reduces every micro-batch's gradients; "
                     "train.ds_config=ds_configs/zero1.json stores the same without those reductions "
                     "(see docs/performance.md)")
        self.model = self.create_model(resume_dir)
        mpu = None
        if self.cp.size > 1:
            self.model.context_parallel, mpu = init_groups(self.cp)
            if self.model.impl == "kernels":
                log.warning("train.context_parallel=%d: the Mamba2 conv and the attention run in PyTorch (masked "
                            "SDPA over all gathered keys), not as kernels (model/context_parallel.py)", self.cp.size)
        if t.cuda_graph:
            check_graphable(self.model, self.env.on_cuda, cfg.data.packing == "document", self.ds_config)
        self.engine = build_engine(self.model, cfg, self.ds_config, mpu)  # DeepSpeed casts params, keeps fp32 buffers
        self.graph: GraphedTrainingForward | None = None  # captured at the first micro-batch (after any resume)
        self.fp8_weights = step_weights(self.model)  # train.fp8.weight_casts=step: recast at each step's start
        fresh = TrainerState(seq_len=t.seq_len, world_size=self.env.world_size, zero_stage=stage,
                             manifest_sha256=self.data_identity())
        if resume_dir is None:
            self.state = fresh
        else:
            loaded = self.ckpt.load(self.engine, resume_dir, universal, t.seed)
            self._check_resume(loaded, fresh, resume_dir)
            follow_current_config(self.engine.lr_scheduler, t)
            self.state = replace(loaded, world_size=fresh.world_size, zero_stage=stage)

    # ---- what a kind of run changes (FinetuneTrainer in train/finetune.py and AdaptTrainer in
    # adapt/training.py override these) ---------------------------------------------------------------
    def open_data(self) -> TrainData:
        """The run's sequences, opened before the processes start (bad data stops with one line)."""
        cfg = self.cfg
        self.manifest = open_manifest(cfg)
        return TrainData(self.manifest, cfg.train.seq_len, cfg.data.packing, cfg.data.num_workers, cfg.data.weights)

    def verify_data(self) -> None:
        """data.verify=sha256: every node's first rank hashes the shards."""
        if self.cfg.data.verify == "sha256":
            if self.env.local_rank == 0:
                self.manifest.verify(checksums=True)
            barrier()

    def data_identity(self) -> str:
        """What a resumed run compares to warn that the data changed."""
        return sha256_of(self.manifest.root / "manifest.json")

    def describe_data(self) -> str:
        sources = ", ".join(f"{s.name} ({s.n_windows} windows, w={w:.3f})"
                            for s, w in zip(self.data.train.sources, self.data.train.blend.counts / self.data.train.blend.PERIOD))
        return f"data: {self.manifest.root} [{self.cfg.data.packing}] train sources: {sources}"

    def tokenizer_dir(self) -> Path:
        """The tokenizer files the consolidated export carries."""
        return self.manifest.resolve(self.manifest.tokenizer.json_path).parent

    def check_resumable(self, folder: Path) -> None:
        """The run's model must be the one `folder` was trained with (ConfigError naming the keys)."""
        check_model_matches(self.cfg, folder)

    def describe_model(self) -> str:
        """The summary's model line."""
        t, m = self.cfg.train, self.cfg.model
        return (f"model: {m.preset or 'custom'} {count_params(m) / 1e6:.1f}M params, pattern {m.layer_pattern}, "
                f"impl {self.model.impl}, activation checkpointing {t.activation_checkpointing}"
                f"{f' ({t.checkpoint_block_types} blocks)' if t.checkpoint_block_types else ''}, "
                f"{f'loss in chunks of {t.loss_chunk_tokens} tokens, ' if t.loss_chunk_tokens else ''}"
                f"CUDA graph {t.cuda_graph}, deterministic {t.deterministic}")

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), for MFU in metrics.jsonl."""
        return train_flops_per_token(self.cfg.model, self.cfg.train.seq_len)

    def nll(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-target NLL (b, l) of one micro-batch through the engine."""
        return forward_nll(self.engine, batch, self.cfg.train.loss_chunk_tokens)

    def create_model(self, resume_dir: Path | None) -> torch.nn.Module:
        """The model to train: initialised from train.seed, or from train.init_from's weights on a fresh start."""
        model = build_model(self.cfg, self.env.device)
        if self.cfg.train.init_from is not None:
            if resume_dir is None:
                load_initial_weights(model, self.cfg.train.init_from, self.manifest)
            else:
                log.info("resuming %s: train.init_from applies to a fresh start only", resume_dir)
        return model

    def save_checkpoint(self) -> Path:
        """A complete step checkpoint of the current state (every rank calls it)."""
        return self.ckpt.save(self.engine, self.state, self.cfg)

    def _take_lock(self) -> None:
        """Rank 0 locks the output folder for the run's life; every rank stops with its one line if taken."""
        problem = [None]
        if self.env.is_main:
            try:
                self.lock.acquire()
            except TrainingError as exc:
                problem = [str(exc)]
        if self.env.world_size > 1:
            torch.distributed.broadcast_object_list(problem, src=0)
        if problem[0] is not None:
            raise TrainingError(problem[0])

    def _check_resume(self, loaded: TrainerState, fresh: TrainerState, folder: Path) -> None:
        if loaded.seq_len != fresh.seq_len:
            raise ConfigError(f"train.seq_len is {fresh.seq_len} but {folder} was trained at {loaded.seq_len}: the data "
                              "position cannot carry over; keep train.seq_len or start a new run with --resume none")
        if loaded.manifest_sha256 != fresh.manifest_sha256:
            log.warning("the manifest differs from the one %s was trained on: continuing at sample %d of the new data",
                        folder, loaded.consumed_samples)

    # ---- reporting ---------------------------------------------------------------------------------
    def summary(self) -> str:
        t = self.cfg.train
        return "\n".join([
            self.describe_model(),
            f"world {self.env.world_size} x {self.env.device.type}, ZeRO-{zero_stage(self.ds_config)}"
            f"{' (optimizer state in CPU memory)' if self.engine.zero_cpu_offload() else ''}, {t.precision}, "
            f"{type(self.engine.optimizer.optimizer).__name__}, micro-batch {t.micro_batch_size} x {t.seq_len}, "
            f"accumulation {self.accumulation}, {t.global_batch_tokens} tokens/step"
            + (f", context parallel {self.cp.size} ({self.cp.replicas} replicas)" if self.cp.size > 1 else ""),
            self.describe_data(),
            f"start: step {self.state.step}/{t.max_steps}, sample {self.state.consumed_samples}, output {self.out}",
        ])

    # ---- evaluation --------------------------------------------------------------------------------
    def evaluate(self, batches: list[dict], n_forward: int) -> tuple[float, dict[str, float]]:
        """Mean validation NLL over all ranks' targets, overall and per source."""
        names = self.data.validation.source_names
        sums = torch.zeros(2 + 2 * len(names), dtype=torch.float64, device=self.env.device)  # nll, n, per source
        self.engine.eval()
        with torch.no_grad():
            for i in range(n_forward):  # the same count on every rank (ZeRO-3 gathers collectively)
                if i >= len(batches):  # this rank holds fewer sequences: a forward pass for the collectives only
                    ids = batches[0]["input_ids"] if batches else torch.zeros(1, self.cfg.train.seq_len, dtype=torch.long)
                    self.engine(self._slice({"input_ids": ids})["input_ids"].to(self.env.device))
                    continue
                batch = to_device(self._slice(batches[i]), self.env.device)
                nll = self.nll(batch).double()
                scored = (batch["labels"] != IGNORE_INDEX).double()
                source = batches[i]["source"].to(self.env.device)
                sums[0] += nll.sum()
                sums[1] += scored.sum()
                sums[2::2].index_add_(0, source, nll.sum(1))
                sums[3::2].index_add_(0, source, scored.sum(1))
        self.engine.train()
        sums = all_reduce_sum(sums).tolist()
        per_source = {n: sums[2 + 2 * s] / sums[3 + 2 * s] for s, n in enumerate(names) if sums[3 + 2 * s]}
        return sums[0] / max(sums[1], 1.0), per_source

    def _slice(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of a collated batch: its slice of every sequence under context parallelism."""
        return slice_batch(batch, self.cp.rank, self.cp.size) if self.cp.size > 1 else batch

    # ---- training ----------------------------------------------------------------------------------
    def step(self, micro: list[dict[str, torch.Tensor]]) -> tuple[float, bool, list[int]]:
        """One optimizer step over this rank's micro-batches (steps 2-4 of the module doc).
        Returns (mean loss over all ranks, stop requested on any rank, ranks with a non-finite loss)."""
        env = self.env
        scored = sum((m["labels"] != IGNORE_INDEX).sum() for m in micro).double().reshape(1)
        n_scored = max(float(all_reduce_sum(scored).item()), 1.0)
        scale = self.cp.replicas * self.accumulation / n_scored  # DeepSpeed averages over the replicas
        nll_local = torch.zeros((), dtype=torch.float64, device=env.device)
        with self.fp8_weights.step() if self.fp8_weights is not None else nullcontext():
            if self.cfg.train.cuda_graph:
                if self.graph is None:
                    self.graph = graph_training_forward(self.model, micro[0]["input_ids"],
                                                        documents=self.cfg.data.packing == "document")
                for m in micro:  # capture what these micro-batches replay outside DeepSpeed's forward
                    self.graph.prepare(m["input_ids"], m.get("position_ids"), m.get("seq_idx"))
            for m in micro:
                nll = self.nll(m).sum()
                nll_local += nll.detach().double()
                self.engine.backward(nll * scale)
                self.engine.step()  # the last one updates the weights: the step's float8 copies expire after it
        stats = torch.zeros(2 + env.world_size, dtype=torch.float64, device=env.device)
        stats[0] = nll_local
        stats[1] = float(self.stop.requested)
        stats[2 + env.rank] = float(not torch.isfinite(nll_local))
        stats = all_reduce_sum(stats).tolist()
        return stats[0] / n_scored, stats[1] > 0, [r for r in range(env.world_size) if stats[2 + r]]

    def train(self) -> None:
        t, env, state = self.cfg.train, self.env, self.state
        per_step = t.global_batch_sequences
        loader = self.data.train_loader(state.consumed_samples, t.max_steps - state.step, per_step,
                                        self.cp.replica, self.cp.replicas, t.micro_batch_size, pin_memory=env.on_cuda)
        eval_set = None
        if t.eval_every:
            eval_set = self.data.eval_batches(t.eval_sequences, self.cp.replica, self.cp.replicas, t.micro_batch_size)
            if self.data.validation.skipped:
                log.warning("validation sources with no window of %d tokens, left out: %s",
                            t.seq_len + 1, ", ".join(self.data.validation.skipped))
        metrics = MetricsLogger(self.cfg, self.out, env.is_main, state.step,
                                self.flops_per_token(),
                                device_peak_flops(env.device, t.peak_tflops), env.world_size)
        metrics.print(self.summary())
        gpu_stats = open_gpu_stats(env.device)
        repeating: set[str] = set()
        batches = iter(loader)
        try:
            while state.step < t.max_steps:
                start = time.perf_counter()
                lr = float(self.engine.get_lr()[0])
                loss, stopping, bad_ranks = self.step([to_device(self._slice(next(batches)), env.device)
                                                       for _ in range(self.accumulation)])
                state.step += 1
                state.consumed_samples += per_step
                state.consumed_tokens += per_step * t.seq_len
                step_time = time.perf_counter() - start
                skipped = not self.engine.was_step_applied()
                check_finite(state.step, bad_ranks, skipped, t.on_nan)
                grad_norm = self.engine.get_global_grad_norm()
                at_log = state.step % t.log_every == 0 or state.step == t.max_steps
                gpu = gather_gpu_stats(gpu_stats, env.device) if env.on_cuda and at_log else None  # every rank
                metrics.log_step(state.step, loss, lr, None if grad_norm is None else float(grad_norm), skipped,
                                 state.consumed_tokens, per_step * t.seq_len, step_time, memory_gb(env.device), gpu)
                metrics.log_blocks(state.step, self.model.block_statistics)
                for name, epochs in self.data.train.epochs(state.consumed_samples).items():
                    if epochs > 1 and name not in repeating:
                        repeating.add(name)
                        log.warning("train source '%s' is repeating (epoch %.2f at step %d)", name, epochs, state.step)
                if eval_set is not None and (state.step % t.eval_every == 0 or state.step == t.max_steps):
                    metrics.log_eval(state.step, *self.evaluate(*eval_set))
                at_end = state.step == t.max_steps and t.save_final
                if stopping or at_end or (t.save_every and state.step % t.save_every == 0):
                    metrics.print(f"saved {self.save_checkpoint()}")
                if stopping:
                    metrics.print(f"stopped by signal after step {state.step}; resume with --resume auto")
                    return
            if t.save_final and not self._final_exported():
                self.export_final(metrics)
        finally:
            metrics.close()

    def _final_exported(self) -> bool:
        meta = self.out / "final" / "meta.json"
        return meta.is_file() and json.loads(meta.read_text()).get("step") == self.state.step

    def export_final(self, metrics: MetricsLogger) -> None:
        """Consolidated fp32 weights of the finished run into <output_dir>/final/ (all ranks gather)."""
        folder = self.out / "final"
        state_dict = gather_fp32_state_dict(self.engine, self.env.is_main)
        if self.env.is_main:
            meta = {"step": self.state.step, "tokens": self.state.consumed_tokens,
                    "consumed_samples": self.state.consumed_samples, "source": "final training state"}
            if self.manifest is not None:  # which corpus, by content: ablations compare runs of one
                meta["data_sha256"] = content_sha256(self.manifest.root / "manifest.json")
            write_bundle(state_dict, self.cfg, self.tokenizer_dir(), folder, meta)
            metrics.print(f"exported {folder}")
        barrier()


def run(cfg: RunConfig, resume: str = "auto", dry_run: bool = False, force: bool = False,
        make: Callable[..., Trainer] | None = None) -> None:
    """Train (or, with dry_run, build everything, write nothing and stop) under the current launcher's world;
    `make(cfg, resume, dry_run, force)` builds the trainer (default Trainer; fine-tuning: FinetuneTrainer)."""
    trainer = (make or Trainer)(cfg, resume, dry_run, force)
    if dry_run:
        if trainer.env.is_main:
            would = f"\ndry run: a run would resume from {trainer.resume_dir}" if trainer.resume_dir else ""
            print(trainer.summary(), would, "\ndry run: everything built, stopping (nothing written)", sep="", flush=True)
    else:
        trainer.train()
    barrier()  # no rank tears its connections down while a peer is still in a collective
    torch.distributed.destroy_process_group()


def export_checkpoint(cfg: RunConfig, which: str, dest: str | None, force: bool = False) -> Path:
    """Consolidate a saved checkpoint (a step folder, or `auto`: the newest) into a weights folder,
    with the run config it was trained with (its model and data only: where the export goes comes
    from `cfg` and `dest`). An existing destination is replaced only with `force`. One process, no launcher."""
    enforce_data_only_loading()
    folder = resolve_resume(which, Path(cfg.train.output_dir) / "checkpoints")
    if folder is None:
        raise CheckpointError(f"no complete checkpoint under {cfg.train.output_dir}/checkpoints: pass --export PATH")
    out = Path(dest) if dest else Path(cfg.train.output_dir) / "exports" / folder.name
    if out.exists() and not force:
        raise ConfigError(f"export destination {out} exists: pass --force to replace it, or --export-to a new folder")
    run_cfg = read_run_config(folder)
    state = read_state(folder)
    meta = {"step": state.step, "tokens": state.consumed_tokens, "consumed_samples": state.consumed_samples,
            "source": str(folder)}
    with reading(folder):
        weights = state_dict_from_checkpoint(folder)
    manifest = load_manifest(run_cfg.data.manifest)
    return write_bundle(weights, run_cfg, manifest.resolve(manifest.tokenizer.json_path).parent, out, meta)
