"""Training the wrapper's added paths with the pretraining Trainer (train/trainer.py): its DeepSpeed engine,
schedule, checkpoints and `--resume`, metrics.jsonl (tokens/s) and eval loss.

What changes against pretraining (the Trainer's hooks):
  - model: the base folder's transformer, frozen (requires_grad False), wrapped by adapt/wrapper.py; the
    engine's optimizer gets only the added parameters (train/optim.py's param_groups skips frozen ones), so
    ZeRO-1/2 hold optimizer state and gradients for them only. ZeRO-3 is refused: it would partition the
    frozen base as well, and the wrapper declares no ZeRO-3 leaves;
  - data: adapt/data.py (a manifest's continuous windows, or a .jsonl file's windows with a held-out slice);
  - checkpoints: DeepSpeed's step checkpoints without the frozen base (it is re-read from adapt.base);
    resuming checks that adapt.base and the added paths' sizes are the ones the checkpoint was trained with;
  - final/: only the added weights (adapter.safetensors + adapter_config.json, adapt/wrapper.py), with
    run_config.yaml, adapt_report.json (trainable fraction, first and last loss) and meta.json.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adapt.data import WindowData, open_adapt_data
from adapt.wrapper import AdaptedLM, decoder_layers, load_base, load_tokenizer, mamba_config
from config.atomic import atomic_write_json, staged_dir
from config.loader import ConfigError
from config.schema import RunConfig, save_run_config
from config.sections import AdaptConfig
from model.loss import token_nll
from train.checkpoint import RUN_CONFIG, read_run_config, seed_everything
from train.consolidate import gather_fp32_state_dict
from train.data import TrainData
from train.distributed import barrier
from train.ds_config import read_ds_json, zero_stage
from train.metrics import MetricsLogger, read_metrics
from train.provenance import provenance
from train.trainer import Trainer

ARCHITECTURE_KEYS = ("layers", "memory_slots", "mamba")  # of the adapt section: what the saved weights' shapes follow


def check_sizes(base_folder: Path, adapt: AdaptConfig) -> None:
    """ConfigError naming the key unless the base's config takes adapt.layers and adapt.mamba's sizes."""
    from transformers import AutoConfig

    try:
        base = AutoConfig.from_pretrained(str(base_folder))
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"adapt.base: transformers cannot read {base_folder}/config.json ({str(exc).splitlines()[0]})") from None
    text = base.get_text_config() if hasattr(base, "get_text_config") else base
    if adapt.layers > text.num_hidden_layers:
        raise ConfigError(f"adapt.layers ({adapt.layers}) is more than the base's {text.num_hidden_layers} decoder layers")
    mamba_config(text.hidden_size, adapt)


def adapt_flops_per_token(model: AdaptedLM) -> float:
    """Training FLOPs per token of the weight matmuls (attention's and the SSD's sequence terms left out), 2 per
    weight per pass: the forward through every matrix but the input embedding (a lookup; a tied head counts once,
    as the head); the added weights' gradients; the input gradients from the head down to the lowest adapted
    layer (its frozen weights counted whole, an upper bound: below its added path nothing needs a gradient),
    through the added paths above that layer too."""
    def frozen(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if not p.requires_grad)

    head = model.base.get_output_embeddings()
    embed = model.base.get_input_embeddings()
    head_params = head.weight.numel() if head is not None else 0
    tied = head is not None and head.weight is embed.weight
    added = [sum(p.numel() for p in paths.parameters()) for paths in model.added]
    forward = frozen(model.base) - embed.weight.numel() + (head_params if tied else 0) + sum(added)
    layers = decoder_layers(model.base)
    input_grads = sum(frozen(layers[i]) for i in model.layer_indices) + head_params + sum(added[1:])
    return float(2 * (forward + sum(added) + input_grads))


class AdaptTrainer(Trainer):
    """Trainer over the added paths of a wrapped transformer (see the module doc)."""

    frozen_base = True

    def __init__(self, cfg: RunConfig, resume: str, dry_run: bool = False, force: bool = False) -> None:
        if cfg.adapt.base is None or cfg.adapt.data is None:
            raise ConfigError("adapt.base and adapt.data are required: pass --base HF_DIR and --data DATA")
        if zero_stage(read_ds_json(cfg.train.ds_config)) == 3:
            raise ConfigError("train.ds_config: ZeRO-3 would partition the frozen base too, which the wrapper does not "
                              "support: use ds_configs/zero2.json or zero1.json (the optimizer state is the added "
                              "parameters' only)")
        self.base_folder = Path(cfg.adapt.base)
        self.tokenizer = load_tokenizer(self.base_folder)
        check_sizes(self.base_folder, cfg.adapt)  # before the processes start: bad sizes stop with one line
        super().__init__(cfg, resume, dry_run, force)

    # ---- data ---------------------------------------------------------------------------------------
    def open_data(self) -> TrainData | WindowData:
        self.manifest, data = open_adapt_data(self.cfg, self.tokenizer)
        return data

    def verify_data(self) -> None:
        if self.manifest is not None:
            super().verify_data()

    def data_identity(self) -> str:
        return super().data_identity() if self.manifest is not None else self.data.identity()

    def describe_data(self) -> str:
        return super().describe_data() if self.manifest is not None else self.data.describe()

    # ---- model ----------------------------------------------------------------------------------------
    def create_model(self, resume_dir: Path | None) -> AdaptedLM:
        """The base, read in the training dtype (DeepSpeed would cast it to it anyway), wrapped with added paths
        initialised from train.seed; a resumed run's added weights are then loaded by the engine."""
        seed_everything(self.cfg.train.seed)
        dtype = torch.bfloat16 if self.cfg.train.precision == "bf16" else torch.float32
        model = AdaptedLM(load_base(self.base_folder, dtype), self.cfg.adapt, self.base_folder)
        return model.to(self.env.device).train()

    def check_resumable(self, folder: Path) -> None:
        theirs, ours = read_run_config(folder).adapt, self.cfg.adapt
        differ = [f"adapt.{k}" for k in ARCHITECTURE_KEYS if getattr(theirs, k) != getattr(ours, k)]
        if Path(theirs.base).resolve() != self.base_folder.resolve():
            differ.insert(0, "adapt.base")
        if differ:
            raise ConfigError(f"the adapt config differs from the one {folder} was trained with at: {', '.join(differ)}; "
                              "set them as in its run_config.yaml, or start a new run with --resume none")

    def describe_model(self) -> str:
        added, total = self.model.trainable_fraction()
        slots = self.cfg.adapt.memory_slots
        return (f"model: {type(self.model.base).__name__} from {self.base_folder}, frozen; layers "
                f"{self.model.layer_indices} gain Mamba2 paths{f' and {slots} memory slots' if slots else ''}: "
                f"{added / 1e6:.3f}M of {total / 1e6:.2f}M parameters trained ({100 * added / total:.3f}%), "
                f"deterministic {self.cfg.train.deterministic}")

    def flops_per_token(self) -> float:
        return adapt_flops_per_token(self.model)

    def nll(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return token_nll(self.engine(batch["input_ids"]), batch["labels"])

    # ---- the result -----------------------------------------------------------------------------------
    def _added_state(self) -> dict[str, torch.Tensor] | None:
        """The added weights (fp32 master copies) keyed as `model.added.state_dict()`, on rank 0 (None
        elsewhere). Collective."""
        full = gather_fp32_state_dict(self.engine, self.env.is_main, trainable_only=True)
        if full is None:
            return None
        name_of = {id(p): name for name, p in self.model.named_parameters()}
        buffers = {k: b.detach().cpu() for k, b in self.model.added.named_buffers()}
        return {**buffers, **{k: full[name_of[id(p)]] for k, p in self.model.added.named_parameters()}}

    def export_final(self, metrics: MetricsLogger) -> None:
        """final/: the added weights, adapter_config.json, run_config.yaml, adapt_report.json, meta.json."""
        folder = self.out / "final"
        state = self._added_state()
        if self.env.is_main:
            added, total = self.model.trainable_fraction()
            losses = [r["loss"] for _, r in sorted(read_metrics(self.out).items()) if "loss" in r]
            report = {"trainable parameters": added, "all parameters": total, "trainable fraction": added / total,
                      "adapted layers": self.model.layer_indices, "steps": self.state.step,
                      "first loss": losses[0] if losses else None, "last loss": losses[-1] if losses else None}
            with staged_dir(folder) as tmp:
                self.model.save_added(tmp, state)
                save_run_config(self.cfg, tmp / RUN_CONFIG)
                atomic_write_json(tmp / "adapt_report.json", report)
                atomic_write_json(tmp / "meta.json", {"step": self.state.step, "tokens": self.state.consumed_tokens,
                                                      "base": str(self.base_folder.resolve()), **provenance()})
            metrics.print(f"exported the added weights to {folder}; generate: python launch/adapt.py --adapter "
                          f"{folder} --prompt TEXT")
        barrier()

