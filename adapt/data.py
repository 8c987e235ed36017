"""Training windows for the wrapper: (n, seq_len + 1) token rows from a curation manifest or a .jsonl file.

A manifest's shards were tokenized by the curation pipeline: their ids must mean the base's, so the
manifest's tokenizer must map every piece to the same id as the base folder's tokenizer.json. A .jsonl file
holds {"text": ...} records, tokenized here with the base's tokenizer, each followed by its EOS, concatenated
and cut into windows (the tail shorter than a window is dropped).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from config.loader import ConfigError
from train.finetune_data import read_records


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


def manifest_windows(path: Path, base_folder: Path, seq_len: int) -> Callable[[int], torch.Tensor]:
    """Global sample i -> its (seq_len + 1,) window of the manifest's train split, blended as pretraining
    blends it (train/data.py); the manifest's tokenizer must be the base's."""
    from config.manifest import ManifestError, load_manifest
    from train.data import BlendedWindows
    from train.errors import TrainingError
    from train.init_from import tokenizer_vocab

    try:
        manifest = load_manifest(path)
        ours, theirs = manifest.resolve(manifest.tokenizer.json_path), base_folder / "tokenizer.json"
        if not theirs.is_file() or tokenizer_vocab(theirs) != tokenizer_vocab(ours):
            raise ConfigError(f"adapt.data: the manifest's tokenizer ({ours}) is not the base's ({theirs}): "
                              "curate the data with the base's tokenizer, or pass a .jsonl file of text")
        windows = BlendedWindows(manifest, "train", seq_len)
    except (ManifestError, TrainingError) as exc:
        raise ConfigError(f"adapt.data: {exc}") from None
    return lambda i: windows[i]["tokens"].long()


def training_windows(data: str, base_folder: Path, tokenizer: Any, seq_len: int) -> Callable[[int], torch.Tensor]:
    """adapt.data (a manifest.json or a .jsonl file) -> global sample index -> (seq_len + 1,) long window
    (the data repeats once it runs out)."""
    path = Path(data)
    if not path.exists():
        raise ConfigError(f"adapt.data: {path} does not exist")
    if path.suffix == ".jsonl":
        rows = jsonl_windows(path, tokenizer, seq_len)
        return lambda i: rows[i % rows.size(0)]
    return manifest_windows(path, base_folder, seq_len)
