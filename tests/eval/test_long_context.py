"""eval/long_context.py: passkey prompts built to length with the key at its depth, the teacher-forced
greedy check against the model's full logits, position buckets against the plain loss, and the
`eval/run.py --benchmarks passkey,position_ppl` run on the tiny bundle (JSON, table rows, PNG)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from eval import long_context as lc
from eval.val_ppl import read_manifest
from model.bundle import load_bundle


@pytest.fixture(scope="module")
def bundle(tiny_bundle_dir):
    return load_bundle(tiny_bundle_dir)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_has_its_length_and_depth(bundle, depth: float) -> None:
    tok = bundle.tokenizer
    prompt, answer = lc.passkey_sample(tok, 300, depth, 48213)
    assert len(prompt) == 300
    assert tok.decode(answer).strip() == "48213"
    text = tok.decode(prompt)
    assert text.count("The pass key is 48213") == 1 and text.endswith("The pass key is")
    needle = lc.NEEDLE.format(key=48213).strip()
    hay_start, end = text.index("information there.") + len("information there."), text.rindex("What is the pass key?")
    at = (text.index(needle) - hay_start) / (end - hay_start - len(needle))  # fraction of the filler before it
    assert abs(at - depth) < 0.15, at  # whole filler repetitions: 1 / 8 of the filler at this length
    with pytest.raises(ValueError, match="shorter than the prompt's fixed text"):
        lc.passkey_sample(tok, 20, depth, 48213)


def test_answer_score_is_greedy_on_full_logits(bundle) -> None:
    """Correct exactly when every answer token is the argmax of the full forward's logits; the NLL is
    their cross-entropy (float32, 1e-5)."""
    model = bundle.model.eval()
    prompt, answer = lc.passkey_sample(bundle.tokenizer, 160, 0.5, 12345)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + answer]))[0, len(prompt) - 1: -1]
    target = torch.tensor(answer)
    ok, nll = lc.answer_score(model, prompt, answer)
    assert ok == bool((logits.argmax(-1) == target).all())
    assert math.isclose(nll, float(torch.nn.functional.cross_entropy(logits, target)), rel_tol=1e-5)
    first = int(logits[0].argmax())  # the model's own greedy next token is "correct", any other is not
    assert lc.answer_score(model, prompt, [first])[0] and not lc.answer_score(model, prompt, [(first + 1) % 500])[0]


def test_position_buckets_add_up_to_the_loss(bundle, manifest_path) -> None:
    """Token-weighted mean of the buckets == the model's loss over the same windows (float32, 1e-5)."""
    assert lc.bucket_edges(32, 4) == [0, 4, 8, 16, 32] and lc.bucket_edges(8, 6) == [0, 1, 2, 4, 8]
    manifest = read_manifest(manifest_path)
    result = lc.position_perplexity(bundle.model.eval(), manifest, 32, 4, 3)
    assert result["windows"] == 3 and [b["start"] for b in result["buckets"]] == [0, 4, 8, 16]
    stream = torch.from_numpy(lc.validation_stream(manifest, 3 * 32 + 1))
    ids = torch.stack([stream[w * 32: w * 32 + 33] for w in range(3)])
    with torch.no_grad():
        want = float(bundle.model.loss(ids[:, :-1], ids[:, 1:]))
    got = sum(b["nll"] * b["tokens"] for b in result["buckets"]) / (3 * 32)
    assert math.isclose(got, want, rel_tol=1e-5)
    with pytest.raises(ValueError, match="fewer than one window"):
        lc.position_perplexity(bundle.model, manifest, 10**6, 4, 1)


@pytest.mark.slow
def test_cli_passkey_and_position_ppl(run_cli, tiny_bundle_dir, manifest_path, tmp_path) -> None:
    out = tmp_path / "lc.json"
    proc = run_cli("--checkpoint", str(tiny_bundle_dir), "--benchmarks", "passkey,position_ppl",
                   "--manifest", str(manifest_path), "--output", str(out),
                   "--set", "eval.passkey_lengths=[192,256]", "--set", "eval.passkey_depths=[0.0,1.0]",
                   "--set", "eval.passkey_samples=2", "--set", "eval.position_ppl_seq_len=32",
                   "--set", "eval.position_ppl_windows=2", "--set", "eval.position_buckets=3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    keys, position = doc["long_context"]["passkey"], doc["long_context"]["position_ppl"]
    assert [(c["length"], c["depth"]) for c in keys["cells"]] == [(192, 0.0), (192, 1.0), (256, 0.0), (256, 1.0)]
    assert all(0 <= c["accuracy"] <= 1 and c["answer_nll"] > 0 for c in keys["cells"])
    assert [b["end"] for b in position["buckets"]] == [8, 16, 32] and position["windows"] == 2
    assert {"passkey", "passkey/192", "passkey/256", "position_ppl/16-32"} <= {r["task"] for r in doc["table"]}
    png = tmp_path / "lc.long_context.png"
    assert doc["long_context"]["plot"] == str(png) and png.read_bytes()[:4] == b"\x89PNG"
