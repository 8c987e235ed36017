"""Fine-tuning a checkpoint (launch/finetune.py, docs/finetune.md): the pretraining Trainer with other
data, a peft-wrapped model for LoRA, and adapters in the checkpoints.

What changes against pretraining (train/trainer.py's hooks; the loop, the DeepSpeed engine, resume,
metrics.jsonl and the eval loss are the Trainer's):
  - data: JSON-lines records tokenized with the checkpoint's tokenizer (train/finetune_data.py);
  - model: the checkpoint's weights (train.init_from, set from --checkpoint), wrapped by peft with
    finetune.method=lora (train/lora.py: only the adapters train);
  - checkpoints: a LoRA run's step folders also hold `adapter/` (peft's files), its final/ is the
    adapter (merge it with `launch/finetune.py --merge`); a full run's final/ is a bundle as pretraining's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from config.atomic import atomic_write_json, staged_dir
from config.loader import ConfigError
from config.schema import RunConfig, load_run_config, save_run_config
from model.bundle import TOKENIZER_JSON
from train.checkpoint import RUN_CONFIG
from train.consolidate import gather_fp32_state_dict, write_bundle
from train.distributed import barrier
from train.finetune_data import FinetuneData
from train.init_from import tokenizer_vocab
from train.lora import (
    adapter_base,
    apply_lora,
    merged_model,
    save_adapter,
    trainable_fraction,
)
from train.metrics import MetricsLogger
from train.provenance import provenance
from train.trainer import Trainer

ADAPTER_DIR = "adapter"  # in each step checkpoint of a LoRA run


def checkpoint_tokenizer(checkpoint: Path, given: str | None = None) -> Path:
    """The checkpoint's tokenizer.json (the data is tokenized with it); a `given` tokenizer must map
    every token to the same id (ConfigError otherwise)."""
    theirs = checkpoint / TOKENIZER_JSON
    if not theirs.is_file():
        raise ConfigError(f"{checkpoint} has no {TOKENIZER_JSON}: fine-tuning tokenizes with the checkpoint's own "
                          "tokenizer; copy the one it was trained with into it")
    if given is not None:
        if not Path(given).is_file():
            raise ConfigError(f"--tokenizer {given} does not exist")
        if tokenizer_vocab(Path(given)) != tokenizer_vocab(theirs):
            raise ConfigError(f"--tokenizer {given} and {theirs} map tokens to different ids: the checkpoint was "
                              "trained with its own; fine-tune with it (leave --tokenizer out)")
    return theirs


class FinetuneTrainer(Trainer):
    """Trainer over fine-tuning records, full or LoRA (see the module doc)."""

    def __init__(self, cfg: RunConfig, resume: str, dry_run: bool = False, force: bool = False,
                 tokenizer: str | None = None) -> None:
        if cfg.train.init_from is None:
            raise ConfigError("train.init_from is not set: pass --checkpoint CKPT")
        if cfg.finetune.method == "lora" and cfg.train.cuda_graph:
            raise ConfigError("train.cuda_graph with finetune.method=lora is not supported (peft's wrapped Linears were "
                              "never captured): set train.cuda_graph=false")
        self.checkpoint = Path(cfg.train.init_from)
        self.tokenizer_json = checkpoint_tokenizer(self.checkpoint, tokenizer)
        super().__init__(cfg, resume, dry_run, force)

    # ---- data ---------------------------------------------------------------------------------------
    def open_data(self) -> FinetuneData:
        cfg = self.cfg
        if cfg.train.seq_len > cfg.model.max_seq_len:
            raise ConfigError(f"train.seq_len ({cfg.train.seq_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")
        if (n := len(tokenizer_vocab(self.tokenizer_json))) > cfg.model.padded_vocab_size:
            raise ConfigError(f"{self.tokenizer_json} has {n} tokens, the model {cfg.model.padded_vocab_size} embedding "
                              "rows: the checkpoint's tokenizer is not the one it was trained with")
        self.manifest = None  # the records are tokenized with the checkpoint's own tokenizer: nothing to compare
        return FinetuneData(cfg.finetune, self.tokenizer_json, cfg.train.seq_len, cfg.train.seed, cfg.data.num_workers)

    def verify_data(self) -> None:
        """Nothing to hash: the records were read and tokenized whole at start-up."""

    def data_identity(self) -> str:
        return self.data.identity()

    def describe_data(self) -> str:
        trainable, total = trainable_fraction(self.model)
        return (f"{self.data.describe()}\nfine-tuning {self.checkpoint}: {self.cfg.finetune.method}, "
                f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trained ({100 * trainable / total:.2f}%)")

    def tokenizer_dir(self) -> Path:
        return self.checkpoint

    # ---- model and saving ---------------------------------------------------------------------------
    @property
    def lora(self) -> bool:
        return self.cfg.finetune.method == "lora"

    def create_model(self, resume_dir: Path | None) -> torch.nn.Module:
        model = super().create_model(resume_dir)
        return apply_lora(model, self.cfg.finetune.lora, self.checkpoint) if self.lora else model

    def _adapter_state(self) -> dict[str, torch.Tensor] | None:
        """The adapters' fp32 master weights on rank 0 (None elsewhere). Collective."""
        return gather_fp32_state_dict(self.engine, self.env.is_main, trainable_only=True)

    def save_checkpoint(self) -> Path:
        if not self.lora:
            return super().save_checkpoint()
        state = self._adapter_state()
        return self.ckpt.save(self.engine, self.state, self.cfg,
                              extra=lambda folder: save_adapter(self.model, state, folder / ADAPTER_DIR))

    def export_final(self, metrics: MetricsLogger) -> None:
        """Full: the consolidated bundle (as pretraining). LoRA: the adapter, its run config and meta.json."""
        if not self.lora:
            return super().export_final(metrics)
        folder = self.out / "final"
        state = self._adapter_state()
        if self.env.is_main:
            with staged_dir(folder) as tmp:
                save_adapter(self.model, state, tmp)
                save_run_config(self.cfg, tmp / RUN_CONFIG)
                atomic_write_json(tmp / "meta.json", {"step": self.state.step, "tokens": self.state.consumed_tokens,
                                                      "base": str(self.checkpoint.resolve()), **provenance()})
            metrics.print(f"exported the adapter to {folder}; merge: python launch/finetune.py --merge {folder} "
                          f"--output {self.out / 'merged'}")
        barrier()


def run_config(checkpoint: str, data: str, config: str | None, overrides: list[str]) -> RunConfig:
    """--config (fine-tuning settings) <- the checkpoint's model section <- train.init_from and finetune.data
    from --checkpoint and --data <- --set overrides. Architecture keys come from the checkpoint."""
    from export import ExportError
    from export.loading import checkpoint_model_config, resolve_run_config

    try:
        model_cfg = checkpoint_model_config(checkpoint)
    except ExportError as exc:
        raise ConfigError(f"--checkpoint: {exc}") from None
    return resolve_run_config(model_cfg, None, config, [f"train.init_from={checkpoint}", f"finetune.data={data}",
                                                        *overrides])


def merge_adapter(adapter_dir: str | Path, output: str | Path, checkpoint: str | Path | None = None,
                  force: bool = False) -> Path:
    """Fold the LoRA adapter in `adapter_dir` into its base checkpoint (`checkpoint`, default the one its
    adapter_config.json names) and write a bundle (fp32 weights, config, the base's tokenizer) to `output`."""
    from export import ExportError
    from export.loading import load_checkpoint

    adapter_dir, output = Path(adapter_dir), Path(output)
    base = Path(checkpoint) if checkpoint is not None else adapter_base(adapter_dir)
    if output.exists() and not force:
        raise ConfigError(f"--output {output} exists: pass --force to replace it, or another folder")
    try:
        bundle = load_checkpoint(base, torch.device("cpu"), torch.float32)
    except ExportError as exc:
        raise ConfigError(f"base checkpoint of {adapter_dir}: {exc}") from None
    model = merged_model(bundle.model, adapter_dir)
    run_config = adapter_dir / RUN_CONFIG
    cfg = load_run_config(run_config) if run_config.is_file() else RunConfig(model=model.cfg)
    meta: dict[str, Any] = {"source": "merged LoRA adapter", "adapter": str(adapter_dir.resolve()),
                            "base": str(base.resolve())}
    return write_bundle(model.state_dict(), cfg, base, output, meta)
