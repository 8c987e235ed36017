"""A consolidated checkpoint folder ("bundle"): what eval, export and generation load.

    FOLDER/
      model.safetensors   weights (model.weights)
      config.json         resolved ModelConfig
      tokenizer.json      HF tokenizers file (ids identical to tokenizer.model when present)
      tokenizer.model     sentencepiece model (optional)
      meta.json           step, tokens seen, git commit, package versions (optional)
      run_config.yaml     the resolved run config that trained it (optional)

Special tokens follow docs/data_contract.md: <pad>=0, <s>=1, </s>=2, <unk>=3.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.hybrid import HybridLM
from model.weights import CheckpointError, load_weights, save_weights

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_MODEL = "tokenizer.model"
META_NAME = "meta.json"
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@dataclass
class Bundle:
    model: HybridLM
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    folder: Path
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """A tokenizer that emits ids past the embedding's rows (the vocabulary padded to a multiple of 128)
        would fail with an IndexError at the first such token: one line at load instead."""
        cfg = self.model.cfg
        if (n := len(self.tokenizer)) > cfg.padded_vocab_size:
            raise CheckpointError(f"{self.folder / TOKENIZER_JSON} has {n} tokens but the model's vocabulary is "
                                  f"{cfg.vocab_size} ({cfg.padded_vocab_size} embedding rows): pass the tokenizer "
                                  "the model was trained with")


def load_tokenizer(folder: str | Path) -> Any:
    """The folder's tokenizer.json as a transformers fast tokenizer with the project's special tokens."""
    from transformers import PreTrainedTokenizerFast

    path = Path(folder) / TOKENIZER_JSON
    if not path.is_file():
        raise CheckpointError(f"no {TOKENIZER_JSON} in {folder}: the trainer's export copies it from the curated manifest")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path), **SPECIAL_TOKENS)
    tok.padding_side = "left"
    return tok


def load_bundle(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Bundle:
    """Load weights, config, tokenizer and metadata of a consolidated checkpoint (eval mode)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist (pass the folder holding model.safetensors)")
    model = load_weights(folder, device=device, dtype=dtype).eval()
    meta_path = folder / META_NAME
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return Bundle(model=model, tokenizer=load_tokenizer(folder), folder=folder, meta=meta)


def save_bundle(model: HybridLM, tokenizer_dir: str | Path, folder: str | Path, meta: dict | None = None) -> Path:
    """Write weights + config, copy tokenizer files from `tokenizer_dir`, write meta.json."""
    from config.atomic import atomic_write_json

    folder = Path(folder)
    save_weights(model, folder)
    for name in (TOKENIZER_JSON, TOKENIZER_MODEL):
        src = Path(tokenizer_dir) / name
        if src.is_file():
            shutil.copyfile(src, folder / name)
    atomic_write_json(folder / META_NAME, meta or {})
    return folder
