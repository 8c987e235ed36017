"""RunConfig: the one typed schema every entrypoint loads (sections model, data, train, eval, export, finetune,
adapt).

    cfg = load_run_config("config/runs/tiny.yaml", ["model.n_layers=12", "train.lr=1e-3"])

The resolved config (`dump_yaml(cfg)`) is saved next to every checkpoint and export and loads back
to an equal object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pydantic import Field, model_validator

from config.base import StrictModel
from config.loader import ConfigError, dump_yaml, load, resolve_named_yaml
from config.sections import AdaptConfig, DataConfig, EvalConfig, ExportConfig, FinetuneConfig, TrainConfig
from model.config import ModelConfig

RUNS_DIR = Path(__file__).resolve().parent / "runs"


class RunConfig(StrictModel):
    model: ModelConfig | None = Field(
        None, description="The architecture. Required, except in a launch/adapt.py run (adapt.base set), where the "
        "architecture is the base transformer's and a model section is refused (it would change nothing).")
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    adapt: AdaptConfig = AdaptConfig()

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.adapt.base is not None:
            adapt_run_problem(self)
            return self
        if self.model is None:
            raise ValueError("model: required key is missing (every run but a launch/adapt.py one, which sets "
                             "adapt.base, needs the architecture): add a model section or --set model.preset=NAME")
        if self.train.cuda_graph and self.data.packing == "document" and self.model.attn_backend not in ("auto", "flash"):
            raise ValueError(f"train.cuda_graph with data.packing=document needs model.attn_backend auto or flash "
                             f"(flash-attn's varlen kernel; {self.model.attn_backend} builds its document mask per "
                             "batch): set model.attn_backend=auto, or data.packing=continuous")
        if self.train.cuda_graph and self.train.activation_checkpointing != "none":
            raise ValueError("train.cuda_graph with train.activation_checkpointing is not supported yet (never "
                             "captured on a GPU): set train.cuda_graph=false or train.activation_checkpointing=none")
        fp8 = self.train.fp8
        if self.train.precision == "fp8" and fp8.bf16_first_blocks + fp8.bf16_last_blocks >= self.model.n_layers:
            raise ValueError(f"train.precision=fp8 with train.fp8.bf16_first_blocks={fp8.bf16_first_blocks} and "
                             f"bf16_last_blocks={fp8.bf16_last_blocks} keeps all {self.model.n_layers} blocks in bf16: "
                             "lower them, or set train.precision=bf16")
        if self.train.cuda_graph and self.train.loss_chunk_tokens:
            raise ValueError("train.cuda_graph with train.loss_chunk_tokens is not supported (the graphs capture "
                             "the whole logits): set train.cuda_graph=false or train.loss_chunk_tokens=0")
        unknown = set(self.train.checkpoint_block_types or "") - set(self.model.layer_pattern)
        if unknown:
            raise ValueError(f"train.checkpoint_block_types names {''.join(sorted(unknown))}, not in the model's "
                             f"pattern {self.model.layer_pattern}: use letters of the pattern")
        if self.train.context_parallel > 1:
            context_parallel_problem(self)
        return self


def context_parallel_problem(cfg: "RunConfig") -> None:
    """ValueError naming the keys when train.context_parallel > 1 cannot split this run's sequences."""
    from model.mixers import block_type

    cp, m, t = cfg.train.context_parallel, cfg.model, cfg.train
    if t.seq_len % (cp * m.mamba.chunk_size) or t.seq_len // cp < m.mamba.d_conv - 1:
        raise ValueError(f"train.context_parallel={cp} needs train.seq_len ({t.seq_len}) to be a multiple of "
                         f"context_parallel x model.mamba.chunk_size ({cp} x {m.mamba.chunk_size}), with at least "
                         f"model.mamba.d_conv - 1 tokens per rank: change "
                         "train.seq_len or train.context_parallel")
    unsplit = sorted({k for k in m.layer_pattern if not block_type(k).context_parallel})
    if unsplit:
        names = ", ".join(f"{k} ({block_type(k).name})" for k in unsplit)
        raise ValueError(f"train.context_parallel={cp}: model.pattern has block types that cannot run on a slice of a "
                         f"sequence: {names}; use M, A and G layers, or set train.context_parallel=1")
    if t.cuda_graph:
        raise ValueError("train.context_parallel > 1 with train.cuda_graph is not supported (the exchange between "
                         "ranks is not captured): set one of them off")


def adapt_run_problem(cfg: "RunConfig") -> None:
    """ValueError naming the key when a launch/adapt.py run (adapt.base set) sets what it cannot use: the
    model section (the architecture is the base's), or a train.* option that exists for our HybridLM only."""
    if cfg.model is not None:
        raise ValueError("model: adapt.base is set, so the architecture is the base transformer's and the model "
                         "section would change nothing: remove it (the added paths' sizes are adapt.*)")
    t = cfg.train
    unsupported = {  # key: (set, what to do)
        "train.cuda_graph": (t.cuda_graph, "set it false"),
        "train.context_parallel": (t.context_parallel > 1, "set it 1"),
        "train.loss_chunk_tokens": (t.loss_chunk_tokens > 0, "set it 0"),
        "train.precision=fp8": (t.precision == "fp8", "use bf16 or fp32"),
        "train.activation_checkpointing": (t.activation_checkpointing != "none", "set it none"),
        "train.init_from": (t.init_from is not None, "remove it (adapt.base is the starting point)"),
    }
    for key, (on, fix) in unsupported.items():
        if on:
            raise ValueError(f"{key}: not supported for a wrapped transformer (adapt.base set; the option acts on our "
                             f"HybridLM): {fix}")


# Settings that choose where files are written or whether code runs. A run_config.yaml inside a
# checkpoint folder was written by whoever made the checkpoint: it never sets these, only the user's
# own --config, --set and flags do (an eval.output there could overwrite any file of the user's).
USER_ONLY_KEYS = {
    "train": ("output_dir",),
    "eval": ("output", "allow_code_execution", "tasks_dir"),  # task YAMLs may name Python functions
    "export": ("output_dir",),
}


def without_user_only(data: dict) -> dict:
    """A copy of a checkpoint's run-config mapping without the USER_ONLY_KEYS (their defaults apply)."""
    out = {section: dict(values) if isinstance(values, dict) else values for section, values in data.items()}
    for section, keys in USER_ONLY_KEYS.items():
        if isinstance(out.get(section), dict):
            for key in keys:
                out[section].pop(key, None)
    return out


def resolve_run_path(name_or_path: str | Path) -> Path:
    """A path, or the name of a file in config/runs/ (with or without .yaml)."""
    return resolve_named_yaml(name_or_path, RUNS_DIR, "config")


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a run config file (or name under config/runs/) and apply `section.key=value` overrides."""
    return load(RunConfig, resolve_run_path(path) if path is not None else None, overrides)


def save_run_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config atomically."""
    from config.atomic import atomic_write_bytes

    atomic_write_bytes(Path(path), dump_yaml(cfg).encode())


__all__ = ["USER_ONLY_KEYS", "ConfigError", "RunConfig", "load_run_config", "resolve_run_path", "save_run_config",
           "without_user_only"]
