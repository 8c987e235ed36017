"""The numbers quantized exports report: validation tokens from a curation manifest, perplexity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from export import ExportError
from export.measure import manifest_validation_tokens, perplexity
from model.bundle import load_bundle


def test_manifest_tokens_read_in_order_and_capped(tmp_path, write_manifest):
    tokens = np.arange(4, 1004, dtype=np.int64) % 500
    manifest = write_manifest(tmp_path, tokens)
    assert manifest_validation_tokens(manifest, 10_000).tolist() == tokens.tolist()
    assert manifest_validation_tokens(manifest, 700).tolist() == tokens[:700].tolist()
    with pytest.raises(ExportError, match="does not exist"):
        manifest_validation_tokens(tmp_path / "missing.json", 10)


def test_perplexity_matches_the_training_loss(tiny_bundle_dir):
    model = load_bundle(tiny_bundle_dir).model
    tokens = torch.randint(4, model.cfg.vocab_size, (129,), generator=torch.Generator().manual_seed(0))
    got = perplexity(model, tokens, seq_len=64, batch_size=3)
    with torch.no_grad():
        ref = model.loss(tokens[:-1].view(2, 64), tokens[1:].view(2, 64))
    assert got["tokens"] == 128 and math.isclose(got["loss"], float(ref), rel_tol=1e-5)
    assert math.isclose(got["ppl"], math.exp(float(ref)), rel_tol=1e-5)
