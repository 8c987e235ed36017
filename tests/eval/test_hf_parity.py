"""Our lm-eval backend (`hybrid`) against lm-eval's own `hf` backend on the Hugging Face export of the same
weights: the scores a user gets from `eval/run.py` are the ones `lm_eval --model hf` gives on the export.

Both run on CPU in float32 (transformers' Bamba through its PyTorch path). Tolerance: 1e-4 absolute on each
request's summed log-prob, the export's logit tolerance (tests/export/test_hf.py) over a few tokens; the
greedy flags must agree exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness (lm_eval) is not installed here")
from lm_eval.api.instance import Instance  # noqa: E402

from export.hf import export_hf, hf_torch_ops  # noqa: E402
from model.bundle import load_bundle  # noqa: E402

ATOL = 1e-4
PAIRS = [
    ("The quick brown fo", "x jumps over"),
    ("return sel", "f.value"),  # the boundary tokenizes differently joined than split
    ("Answer:", " A"),
    ("Answer:", " C"),
    ("trailing space ", "word"),
    ("", "import os"),  # empty context: conditioned on the prefix token
    ("def main():\n    print(", "'hello')"),
]
ROLLING = ["def parse(self, line):\n    return line.split()\n" * 3]


@pytest.fixture(scope="module")
def hf_lm(tiny_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory, lm):
    from lm_eval.models.huggingface import HFLM

    bundle = load_bundle(tiny_bundle_dir)
    out = export_hf(bundle.model, bundle.tokenizer, tmp_path_factory.mktemp("hf_export"))
    return HFLM(pretrained=str(out), backend="causal", dtype="float32", device="cpu", batch_size=3,
                max_length=lm.max_length, prefix_token_id=lm.prefix_token_id)


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_equals_lm_evals_hf_backend(lm, hf_lm):
    ours = lm.loglikelihood(_requests("loglikelihood", PAIRS), disable_tqdm=True)
    with torch.no_grad(), hf_torch_ops():
        theirs = hf_lm.loglikelihood(_requests("loglikelihood", PAIRS), disable_tqdm=True)
    for pair, (mine, my_greedy), (their, their_greedy) in zip(PAIRS, ours, theirs):
        assert mine == pytest.approx(their, abs=ATOL), pair
        assert my_greedy == their_greedy, pair


def test_rolling_loglikelihood_equals_lm_evals_hf_backend(lm, hf_lm):
    requests = _requests("loglikelihood_rolling", [(t,) for t in ROLLING])
    ours = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    with torch.no_grad(), hf_torch_ops():
        theirs = hf_lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in ROLLING]),
                                             disable_tqdm=True)
    assert ours == pytest.approx(theirs, abs=ATOL)
