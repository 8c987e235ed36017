"""Training data of the wrapper, in the shape the pretraining Trainer takes (train/data.py's TrainData).

adapt.data is a curation manifest or a .jsonl file:
  - a manifest's shards were tokenized by the curation pipeline: their ids must mean the base's, so the
    manifest's tokenizer must map every piece to the same id as the base folder's tokenizer.json. Its train
    and validation splits are read as continuous windows (train/data.py's TrainData, blended as pretraining
    blends them);
  - a .jsonl file holds {"text": ...} records, tokenized here with the base's tokenizer, each followed by its
    EOS, concatenated and cut into windows of train.seq_len + 1 tokens (the tail shorter than a window is
    dropped); a seeded adapt.val_fraction of the windows is held out for the eval loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from config.loader import ConfigError
from config.manifest import Manifest
from config.schema import RunConfig
from train.data import TrainData
from train.finetune_data import Example, ExampleData, file_identity, hold_out, read_records


def jsonl_windows(path: Path, tokenizer: Any, seq_len: int) -> torch.Tensor:
    """(n, seq_len + 1) long windows of the records' text; ConfigError (one line) for bad records."""
    ids: list[int] = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for n, record in read_records(path):
        if not isinstance(record.get("text"), str):
            raise ConfigError(f'{path}:{n}: each line must be an object with a "text" string')
        ids += tokenizer(record["text"], add_special_tokens=False).input_ids + eos
    n_windows = len(ids) // (seq_len + 1)
    if n_windows == 0:
        raise ConfigError(f"{path} holds {len(ids)} tokens, fewer than one window of train.seq_len + 1 = "
                          f"{seq_len + 1}: add text or lower train.seq_len")
    return torch.tensor(ids[: n_windows * (seq_len + 1)], dtype=torch.long).view(n_windows, seq_len + 1)


class WindowData(ExampleData):
    """The windows of a .jsonl file as train and held-out validation examples (full rows: no padding)."""

    def __init__(self, path: Path, tokenizer: Any, seq_len: int, val_fraction: float, seed: int,
                 num_workers: int = 0) -> None:
        self.path = path
        windows = jsonl_windows(path, tokenizer, seq_len)
        examples = [Example(w[:-1], w[1:]) for w in windows]
        train, val = hold_out(examples, val_fraction, seed, f"{path} (adapt.val_fraction)")
        super().__init__(train, val, seq_len, tokenizer.pad_token_id or 0, seed, num_workers,
                         "no validation windows (adapt.val_fraction=0): set train.eval_every=0 or adapt.val_fraction")

    def identity(self) -> str:
        return file_identity([self.path])

    def describe(self) -> str:
        return (f"data: {self.path}: {len(self.train)} train / {len(self._validation)} validation windows of "
                f"{self.seq_len + 1} tokens")


def open_manifest_data(path: Path, base_folder: Path, cfg: RunConfig) -> tuple[Manifest, TrainData]:
    """The manifest (its files' sizes checked) and its continuous windows; ConfigError unless its tokenizer is
    the base's."""
    from config.manifest import load_manifest
    from train.init_from import tokenizer_vocab

    manifest = load_manifest(path)
    manifest.verify(checksums=False)
    ours, theirs = manifest.resolve(manifest.tokenizer.json_path), base_folder / "tokenizer.json"
    if not theirs.is_file() or tokenizer_vocab(theirs) != tokenizer_vocab(ours):
        raise ConfigError(f"adapt.data: the manifest's tokenizer ({ours}) is not the base's ({theirs}): "
                          "curate the data with the base's tokenizer, or pass a .jsonl file of text")
    return manifest, TrainData(manifest, cfg.train.seq_len, "continuous", cfg.data.num_workers, cfg.data.weights)


def open_adapt_data(cfg: RunConfig, tokenizer: Any) -> tuple[Manifest | None, TrainData | WindowData]:
    """adapt.data -> (the manifest or None, the data the Trainer reads)."""
    path = Path(cfg.adapt.data)
    if not path.exists():
        raise ConfigError(f"adapt.data: {path} does not exist")
    if path.suffix == ".jsonl":
        t = cfg.train
        return None, WindowData(path, tokenizer, t.seq_len, cfg.adapt.val_fraction, t.seed, cfg.data.num_workers)
    return open_manifest_data(path, Path(cfg.adapt.base), cfg)
