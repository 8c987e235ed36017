"""adapt.data given a curation manifest (the wrapper's other data source besides .jsonl): windows of the train
split, and a manifest whose tokenizer is not the base's is refused in one line. Here for the `corpus` fixture."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from adapt.data import training_windows
from config.loader import ConfigError

from .conftest import VOCAB


def base_with_tokenizer(folder: Path, tokenizer_json: Path) -> Path:
    folder.mkdir()
    shutil.copyfile(tokenizer_json, folder / "tokenizer.json")
    return folder


def test_manifest_windows_and_tokenizer_check(corpus: Path, tmp_path: Path, test_tokenizer_dir: Path) -> None:
    base = base_with_tokenizer(tmp_path / "base", corpus.parent / "tokenizer" / "tokenizer.json")
    sample = training_windows(str(corpus), base, tokenizer=None, seq_len=32)
    rows = [sample(i) for i in range(4)]
    assert all(r.shape == (33,) and int(r.max()) < VOCAB for r in rows)
    assert len({tuple(r.tolist()) for r in rows}) == 4  # consecutive samples are different windows
    other = base_with_tokenizer(tmp_path / "other", test_tokenizer_dir / "tokenizer.json")
    with pytest.raises(ConfigError, match="adapt.data: the manifest's tokenizer .* is not the base's"):
        training_windows(str(corpus), other, tokenizer=None, seq_len=32)
