"""Context extension: a run at 4x the trained length from run A's final weights (train.init_from), with
YaRN RoPE scaling, attention-only activation checkpointing and the chunked head + loss, all through the
launched trainer (one process, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.schema import load_run_config

from .conftest import read_metrics
from .test_pretrain import single_process


@pytest.mark.slow
def test_context_extension_run(run_a: Path, corpus: Path, tmp_path: Path) -> None:
    trained = load_run_config(run_a / "final" / "run_config.yaml")
    new_len = 4 * trained.train.seq_len
    out = tmp_path / "extended"
    sets = [f"train.init_from={run_a / 'final'}", f"train.seq_len={new_len}", f"train.global_batch_tokens={2 * new_len}",
            "train.max_steps=2", "train.warmup_steps=1", "train.eval_every=0",
            "train.activation_checkpointing=attention", "train.checkpoint_block_types=A", "train.loss_chunk_tokens=100",
            "model.attention.rope_scaling.type=yarn", "model.attention.rope_scaling.factor=4",
            f"model.attention.rope_scaling.original_max_seq_len={trained.train.seq_len}"]
    proc = single_process(corpus, out, *(a for s in sets for a in ("--set", s)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "activation checkpointing attention (A blocks)" in log and "loss in chunks of 100 tokens" in log
    assert f"micro-batch 2 x {new_len}" in log
    fresh_first, trained_last = read_metrics(run_a)[1]["loss"], read_metrics(run_a)[16]["loss"]
    first = read_metrics(out)[1]["loss"]
    assert first < trained_last + 0.5 * (fresh_first - trained_last), (first, trained_last, fresh_first)
    final = load_run_config(out / "final" / "run_config.yaml")
    assert final.model.attention.rope_scaling.type == "yarn" and final.train.seq_len == new_len
