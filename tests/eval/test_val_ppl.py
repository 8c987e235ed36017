"""Validation perplexity on a tiny curated manifest against a direct, document-by-document computation.

Tolerance: 1e-5 relative on the mean NLL (float32 forward; the direct path runs every document
piece as its own sequence, the measured one packs them with seq_idx).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.errors import EvalError
from eval.val_ppl import read_manifest, validation_perplexity, verify
from model.scoring import windows

SEQ_LEN = 16


def _direct_nll(model, manifest: Path, seq_len: int, packing: str) -> tuple[float, int]:
    """Sum of target NLLs and their count. Window k predicts t[kL+1 : kL+L+1] from t[kL : kL+L];
    document packing: each document piece of a window runs alone, the first token of a document is
    never a target."""
    m = read_manifest(manifest)
    total, count = 0.0, 0
    for shard in (s for src in m.splits["validation"].sources for s in src.shards):
        tokens = np.fromfile(m.resolve(shard.path), dtype="<u2").astype(np.int64)
        ends = np.fromfile(m.resolve(shard.index), dtype="<u8").astype(np.int64)
        doc_id = np.searchsorted(ends, np.arange(len(tokens)), side="right")
        for start in range(0, len(tokens) - 1, seq_len):
            stop = min(start + seq_len, len(tokens) - 1)  # inputs [start, stop), targets +1
            pieces = [(start, stop)]
            if packing == "document":
                cuts = [p for p in range(start + 1, stop) if doc_id[p] != doc_id[p - 1]]
                bounds = [start, *cuts, stop]
                pieces = list(zip(bounds[:-1], bounds[1:]))
            for a, b in pieces:
                ids = torch.from_numpy(tokens[a:b])[None]
                with torch.no_grad():
                    logp = torch.log_softmax(model(ids)[0].double(), -1)
                for j, p in enumerate(range(a, b)):
                    if packing == "document" and doc_id[p + 1] != doc_id[p]:
                        continue  # the target starts the next document
                    total -= float(logp[j, tokens[p + 1]])
                    count += 1
    return total, count


@pytest.mark.parametrize("packing", ["document", "continuous"])
def test_val_ppl_equals_direct_computation(lm, manifest_path, packing):
    report = validation_perplexity(lm.model, read_manifest(manifest_path), seq_len=SEQ_LEN, batch_size=3,
                                   packing=packing)
    nll, count = _direct_nll(lm.model, manifest_path, SEQ_LEN, packing)
    assert report["tokens"] == count
    assert report["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert report["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert report["bits_per_token"] == pytest.approx(nll / count / math.log(2), rel=1e-5)
    sources = report["sources"]
    assert set(sources) == {"prose", "code"}
    assert sum(s["tokens"] for s in sources.values()) == count
    assert sum(s["nll"] * s["tokens"] for s in sources.values()) == pytest.approx(nll, rel=1e-5)


def test_windows_predict_every_token_once():
    for n, length in [(2, 4), (17, 4), (16, 4), (100, 7)]:
        targets = [t for s, l in windows(n, length) for t in range(s + 1, s + l + 1)]
        assert targets == list(range(1, n))


def test_limit_caps_windows(lm, manifest_path):
    report = validation_perplexity(lm.model, read_manifest(manifest_path), seq_len=SEQ_LEN, batch_size=2,
                                   limit=3)
    assert report["windows"] == 3


@pytest.mark.parametrize("limit", [None, 3])
def test_progress_bar_counts_every_window(lm, manifest_path, capsys, limit):
    report = validation_perplexity(lm.model, read_manifest(manifest_path), seq_len=SEQ_LEN, batch_size=2,
                                   limit=limit)
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("val_ppl: 100%") and f" {report['windows']}/{report['windows']} " in last, last


def test_verify_catches_corrupt_shard_and_foreign_tokenizer(tmp_path, manifest_path, tiny_bundle_dir):
    copy = tmp_path / "curated"
    shutil.copytree(manifest_path.parent, copy)
    manifest = read_manifest(copy / "manifest.json")
    tokenizer = tiny_bundle_dir / "tokenizer.json"
    verify(manifest, 512, tokenizer)
    with pytest.raises(EvalError, match="vocab 512 > the model's 256"):
        verify(manifest, 256, tokenizer)
    other_tok = tmp_path / "tokenizer.json"
    other_tok.write_text("{}")
    with pytest.raises(EvalError, match="differs from the manifest"):
        verify(manifest, 512, other_tok)
    shard = manifest.resolve(manifest.splits["validation"].sources[0].shards[0].path)
    raw = bytearray(shard.read_bytes())
    raw[0] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(EvalError, match=f"corrupt shard file {shard}: sha256"):
        verify(manifest, 512, tokenizer)
    shard.write_bytes(bytes(raw[:-2]))
    with pytest.raises(EvalError, match="corrupt shard file .* bytes"):
        verify(manifest, 512, tokenizer)


def test_bad_manifest_is_one_line_error(tmp_path):
    with pytest.raises(EvalError, match="not found"):
        read_manifest(tmp_path / "nope.json")
    bad = tmp_path / "manifest.json"
    bad.write_text('{"token_dtype": "uint16", "token_size": 2}')
    with pytest.raises(EvalError, match="is invalid") as err:
        read_manifest(bad)
    assert "\n" not in str(err.value)
