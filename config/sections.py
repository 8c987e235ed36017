"""The run-config sections besides `model` (which lives in model/config.py).

Each section is a strict pydantic model: every field documents its unit, unknown keys are errors.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from model.config import StrictModel


class DataConfig(StrictModel):
    """Where training tokens come from and how they are cut into sequences."""

    manifest: str | None = Field(None, description="manifest.json written by pipeline/curate.py.")
    packing: Literal["document", "continuous"] = Field(
        "document",
        description="document: boundaries travel with each sequence (Mamba2 state/conv reset, attention "
        "masked per document, RoPE restarts, cross-document targets masked); continuous: plain "
        "EOS-separated concatenation.",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank.")


class WandbConfig(StrictModel):
    """Weights & Biases logging. Offline unless mode=online (then WANDB_API_KEY must be set)."""

    project: str = "hybrid-lm"
    mode: Literal["offline", "online", "disabled"] = "offline"
    name: str | None = None
    entity: str | None = None


class TrainConfig(StrictModel):
    """Optimisation, schedule, checkpointing and logging of a pretraining run."""

    seq_len: int = Field(1024, ge=2, description="Tokens per training sequence.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per GPU per forward/backward.")
    global_batch_tokens: int = Field(
        524288, ge=1,
        description="Tokens per optimizer step over all ranks; must be a multiple of "
        "seq_len * micro_batch_size * world_size (the quotient is the accumulation).",
    )
    max_steps: int = Field(1000, ge=1, description="Optimizer steps.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of the peak.")
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = Field(0.2, gt=0, le=1, description="WSD: share of steps spent decaying.")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="Max global grad norm; 0 disables clipping.")
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = Field(False, description="ZeRO-3 optimizer state on CPU.")
    precision: Literal["bf16", "fp32"] = "bf16"
    activation_checkpointing: bool = False
    seed: int = 1234
    log_every: int = Field(1, ge=1, description="Steps between metric lines.")
    eval_every: int = Field(200, ge=0, description="Steps between validation losses; 0 disables.")
    eval_batches: int = Field(8, ge=1, description="Micro-batches per validation pass.")
    save_every: int = Field(500, ge=0, description="Steps between checkpoints; 0: only at the end/on signal.")
    keep_last: int = Field(3, ge=1, description="Checkpoints kept on disk.")
    output_dir: str = Field("runs/default", description="Checkpoints, metrics.jsonl and exports go here.")
    on_nan: Literal["skip", "stop"] = Field("stop", description="Non-finite loss: skip the step or stop.")
    wandb: WandbConfig = WandbConfig()

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be <= max_steps ({self.max_steps})")
        per_step = self.seq_len * self.micro_batch_size
        if self.global_batch_tokens % per_step:
            raise ValueError(
                f"global_batch_tokens ({self.global_batch_tokens}) must be a multiple of "
                f"seq_len * micro_batch_size ({per_step})"
            )
        return self


class EvalConfig(StrictModel):
    """lm-evaluation-harness settings used by eval/run.py."""

    benchmarks: list[str] = Field(default_factory=lambda: ["standard"], description="Task/group names.")
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | None = Field(None, ge=1, description="Examples per task (debugging).")
    batch_size: int = Field(8, ge=1)
    tasks_dir: str | None = Field(None, description="Folder of local lm-eval task YAMLs.")
    output: str | None = None


class ExportConfig(StrictModel):
    """Export targets used by launch/export.py."""

    formats: list[Literal["hf", "onnx", "int8", "nf4", "int4"]] = Field(default_factory=lambda: ["hf"])
    output_dir: str = "exports"
