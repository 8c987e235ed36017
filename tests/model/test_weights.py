"""Weights I/O: round trip, strict loading with one-line errors, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import model.weights as weights
from config.atomic import atomic_write_bytes
from model.weights import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, load_weights, save_weights


@pytest.fixture
def saved(tiny_model, tmp_path: Path):
    model = tiny_model(pattern="MAM", qk_norm=True)
    return model, save_weights(model, tmp_path / "ckpt", metadata={"step": "7"})


def _one_line_error(exc_info: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def test_round_trip_identical_logits(saved) -> None:
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left
    loaded = load_weights(folder, cfg=model.cfg).eval()
    assert loaded.cfg == model.cfg
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert loaded.embed.weight.dtype == torch.float64 and not loaded.embed.weight.is_meta
    assert all(not b.is_meta for b in loaded.buffers())
    assert load_weights(folder, dtype=torch.float32).embed.weight.dtype == torch.float32


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as exc:
        load_weights(tmp_path / "nope")
    _one_line_error(exc, "nope", "does not exist")


def test_missing_config(saved) -> None:
    _, folder = saved
    (folder / CONFIG_NAME).unlink()
    with pytest.raises(CheckpointError) as exc:
        load_weights(folder)
    _one_line_error(exc, CONFIG_NAME)


def test_missing_weights_file(saved) -> None:
    _, folder = saved
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError) as exc:
        load_weights(folder)
    _one_line_error(exc, WEIGHTS_NAME)


def _rewrite(folder: Path, edit) -> None:
    state = load_file(str(folder / WEIGHTS_NAME))
    edit(state)
    save_file(state, str(folder / WEIGHTS_NAME))


def test_missing_key(saved) -> None:
    _, folder = saved
    _rewrite(folder, lambda s: s.pop("layers.0.mixer.A_log"))
    with pytest.raises(CheckpointError) as exc:
        load_weights(folder)
    _one_line_error(exc, "missing", "layers.0.mixer.A_log")


def test_unexpected_key(saved) -> None:
    _, folder = saved
    _rewrite(folder, lambda s: s.update({"layers.9.extra": torch.zeros(3)}))
    with pytest.raises(CheckpointError) as exc:
        load_weights(folder)
    _one_line_error(exc, "unexpected", "layers.9.extra")


def test_wrong_shape(saved) -> None:
    _, folder = saved
    _rewrite(folder, lambda s: s.update({"final_norm.weight": torch.zeros(5, dtype=torch.float64)}))
    with pytest.raises(CheckpointError) as exc:
        load_weights(folder)
    _one_line_error(exc, "shape", "final_norm.weight", "(5,)", "(32,)")


def test_config_mismatch(saved) -> None:
    model, folder = saved
    other = model.cfg.model_copy(update={"ffn_hidden": 64})
    with pytest.raises(CheckpointError) as exc:
        load_weights(folder, cfg=other)
    _one_line_error(exc, "ffn_hidden")
    # Execution-path switches are not architecture: a different impl still loads.
    load_weights(folder, cfg=model.cfg.model_copy(update={"impl": "auto", "max_seq_len": 64}))


def test_config_json_is_resolved(saved) -> None:
    model, folder = saved
    data = json.loads((folder / CONFIG_NAME).read_text())
    assert data["pattern"] == "MAM" and data["attention"]["qk_norm"] is True
    assert type(model.cfg).model_validate(data) == model.cfg


def test_weights_write_is_atomic(saved, monkeypatch) -> None:
    """A save that dies mid-write leaves the previous file intact and no temp file behind."""
    model, folder = saved
    before = (folder / WEIGHTS_NAME).read_bytes()

    def dying_save_file(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(weights, "save_file", dying_save_file)
    with torch.no_grad():
        model.final_norm.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_weights(model, folder)
    assert (folder / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]

    # A first save that dies leaves no file under the final name at all.
    fresh = folder.parent / "fresh"
    with pytest.raises(OSError):
        save_weights(model, fresh)
    assert list(fresh.iterdir()) == []


def test_atomic_write_bytes_cleans_up(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "out.json"
    atomic_write_bytes(target, b"old")

    def failing_fsync(fd: int) -> None:
        raise OSError("fsync failed")

    monkeypatch.setattr(weights.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="fsync failed"):
        atomic_write_bytes(target, b"new, half written")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
