"""adapt.data given a curation manifest (the wrapper's other data source besides .jsonl): the Trainer's TrainData
over the manifest's continuous windows, and a manifest whose tokenizer is not the base's is refused in one line.
Here for the `corpus` fixture."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from adapt.data import open_adapt_data
from config.loader import ConfigError
from config.schema import load_run_config

from .conftest import VOCAB


def base_with_tokenizer(folder: Path, tokenizer_json: Path) -> Path:
    folder.mkdir()
    shutil.copyfile(tokenizer_json, folder / "tokenizer.json")
    return folder


def test_manifest_windows_and_tokenizer_check(corpus: Path, tmp_path: Path, test_tokenizer_dir: Path) -> None:
    base = base_with_tokenizer(tmp_path / "base", corpus.parent / "tokenizer" / "tokenizer.json")
    cfg = load_run_config(None, [f"adapt.base={base}", f"adapt.data={corpus}", "train.seq_len=32"])
    manifest, data = open_adapt_data(cfg, tokenizer=None)
    assert manifest is not None and data.packing == "continuous"  # the base's attention has no document mask
    rows = [data.train[i]["tokens"] for i in range(4)]
    assert all(r.shape == (33,) and int(r.max()) < VOCAB for r in rows)
    assert len({tuple(r.tolist()) for r in rows}) == 4  # consecutive samples are different windows
    assert data.validation.source_names  # the manifest's own validation split gives the eval loss
    other = base_with_tokenizer(tmp_path / "other", test_tokenizer_dir / "tokenizer.json")
    cfg = load_run_config(None, [f"adapt.base={other}", f"adapt.data={corpus}", "train.seq_len=32"])
    with pytest.raises(ConfigError, match="adapt.data: the manifest's tokenizer .* is not the base's"):
        open_adapt_data(cfg, tokenizer=None)
