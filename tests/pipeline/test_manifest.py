"""load_manifest / Manifest.verify: one-line errors for every way a manifest or shard can be unusable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from config.manifest import ManifestError, dtype_for_vocab, load_manifest

pytest.importorskip("datatrove", reason="datatrove is not installed here (curation runs on it)")


@pytest.fixture
def copy(curated: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(curated, out, ignore=shutil.ignore_patterns("work"))
    return out


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_and_malformed_manifests(tmp_path: Path, copy: Path) -> None:
    with pytest.raises(ManifestError, match="not found: run `python pipeline/curate.py") as e:
        load_manifest(tmp_path / "nope" / "manifest.json")
    one_line(e)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format_version": 1,')
    with pytest.raises(ManifestError, match=r"is not valid JSON \(line 1") as e:
        load_manifest(bad)
    one_line(e)
    data = json.loads((copy / "manifest.json").read_text())
    data["splits"]["train"]["tokens"] += 1
    data["tokenizer"]["extra"] = 1
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"tokenizer.extra: unknown key.*splits.train") as e:
        load_manifest(copy)
    one_line(e)


def test_verify_catches_missing_resized_and_corrupt_shards(copy: Path) -> None:
    m = load_manifest(copy / "manifest.json")
    m.verify()
    shard = m.resolve(m.splits["train"].sources[0].shards[0].path)
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    m.verify(checksums=False)  # same size: only the checksum tells
    with pytest.raises(ManifestError, match=rf"corrupt file {shard}: sha256 differs.*re-run pipeline/curate.py") as e:
        m.verify()
    one_line(e)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(ManifestError, match=r"corrupt file .* bytes, manifest says"):
        m.verify(checksums=False)
    shard.unlink()
    with pytest.raises(ManifestError, match="is listed in .*manifest.json but missing"):
        m.verify(checksums=False)


def test_paths_are_relative_to_the_manifest_folder(copy: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    copy.rename(moved)
    m = load_manifest(moved)
    assert m.root == moved.resolve()
    assert m.source_folders("validation")["code"] == moved.resolve() / "tokens/validation/code"
    m.verify()


def test_dtype_follows_vocab_size() -> None:
    assert dtype_for_vocab(32000) == ("uint16", 2) and dtype_for_vocab(65536) == ("uint16", 2)
    assert dtype_for_vocab(65537) == ("uint32", 4)
