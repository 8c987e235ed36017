"""Start a run from another model's weights (`train.init_from`): continued pretraining, fine-tuning,
context extension.

Only the weights carry over: the optimizer, the learning-rate schedule (warm-up included), the step and
the data position start fresh, unlike `--resume`, which continues a run. The folder is any checkpoint
the other stages read (export/loading.py: a consolidated bundle or a Hugging Face folder, imported);
quantized exports are refused (their weights are rounded).

The run's model config may differ from the checkpoint's where the tensors stay the same (e.g.
max_seq_len or the attention's RoPE scaling when extending the context): the tensors must fit exactly,
and every differing model key is logged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from config.loader import ConfigError
from config.manifest import Manifest
from model.hybrid import HybridLM
from model.weights import CheckpointError, arch_diff, check_state_dict

log = logging.getLogger(__name__)


def tokenizer_vocab(path: Path) -> dict[str, int]:
    """Piece -> id of a tokenizers JSON file (what decides whether two tokenizers' ids agree)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)


def check_same_tokenizer(folder: Path, manifest: Manifest) -> None:
    """The checkpoint's ids must mean the curated shards' ids: one line unless the vocabularies are equal."""
    from model.bundle import TOKENIZER_JSON

    theirs, ours = folder / TOKENIZER_JSON, manifest.resolve(manifest.tokenizer.json_path)
    if not theirs.is_file():
        raise ConfigError(f"train.init_from: {folder} has no {TOKENIZER_JSON}, so its token ids cannot be checked "
                          "against the manifest's tokenizer: copy the tokenizer it was trained with into it")
    if tokenizer_vocab(theirs) != tokenizer_vocab(ours):
        raise ConfigError(f"train.init_from: {theirs} and the manifest's tokenizer ({ours}) map tokens to different "
                          "ids: curate the data with the checkpoint's tokenizer")


def load_initial_weights(model: HybridLM, folder: str | Path, manifest: Manifest | None) -> None:
    """Copy the weights of the checkpoint in `folder` into `model` (in place, any device/dtype).

    ConfigError (one line) when the folder is missing or quantized, its tokenizer differs from the
    manifest's (None: the data is tokenized by the checkpoint's own tokenizer, nothing to compare), or
    its tensors do not fit the model.
    """
    from export import ExportError
    from export.loading import checkpoint_model_config, load_checkpoint
    from export.quantize import is_quantized_folder

    folder = Path(folder)
    try:
        theirs = checkpoint_model_config(folder)
        if is_quantized_folder(folder):
            raise ConfigError(f"train.init_from: {folder} is a quantized export (rounded weights): pass the "
                              "checkpoint it was quantized from")
        if manifest is not None:
            check_same_tokenizer(folder, manifest)
        state = load_checkpoint(folder, torch.device("cpu")).model.state_dict()
        check_state_dict(model, state, str(folder))
    except (ExportError, CheckpointError) as exc:
        raise ConfigError(f"train.init_from: {exc}") from None
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(state[name])
    if diff := arch_diff(model.cfg, theirs):
        log.info("train.init_from: model keys that differ from %s's: %s (this run's values apply)", folder,
                 ", ".join(f"model.{k}={json.dumps(model.cfg.model_dump(mode='json')[k])}" for k in diff))
    log.info("initial weights from %s (optimizer, schedule and data position start fresh)", folder)
