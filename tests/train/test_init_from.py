"""train.init_from: a run starts from another checkpoint's weights (fresh optimizer, schedule and data).

Unit tests load into a model in process; one launched run checks the trainer wires it: a one-process run
initialised from run A's final weights starts at run A's final loss, far below a fresh start's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from config.loader import ConfigError
from config.manifest import load_manifest
from config.schema import load_run_config
from model.bundle import save_bundle
from model.hybrid import HybridLM
from train.init_from import load_initial_weights

from .conftest import read_metrics
from .test_pretrain import single_process


def tiny_config(corpus: Path, **model: object):
    cfg = load_run_config("tiny", [f"data.manifest={corpus}", "model.vocab_size=512"])
    return cfg.model.model_copy(update=model)


@pytest.fixture()
def saved(corpus: Path, tmp_path: Path) -> tuple[HybridLM, Path]:
    torch.manual_seed(1)
    model = HybridLM(tiny_config(corpus))
    return model, save_bundle(model, corpus.parent / "tokenizer", tmp_path / "ckpt")


def test_weights_copied_and_longer_context_allowed(saved, corpus: Path) -> None:
    source, folder = saved
    torch.manual_seed(2)
    target = HybridLM(tiny_config(corpus, max_seq_len=4 * source.cfg.max_seq_len))
    load_initial_weights(target, folder, load_manifest(corpus))
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name


def test_misfits_are_one_line_errors(saved, corpus: Path, tmp_path: Path, test_tokenizer_dir: Path) -> None:
    source, folder = saved
    manifest = load_manifest(corpus)
    wider = HybridLM(tiny_config(corpus, ffn_hidden=2 * source.cfg.ffn_hidden))
    with pytest.raises(ConfigError, match="train.init_from: .*shape mismatch at .*mlp"):
        load_initial_weights(wider, folder, manifest)
    with pytest.raises(ConfigError, match="train.init_from: checkpoint .* does not exist"):
        load_initial_weights(source, tmp_path / "missing", manifest)
    other = shutil.copytree(folder, tmp_path / "other_tokenizer")
    shutil.copyfile(test_tokenizer_dir / "tokenizer.json", other / "tokenizer.json")
    with pytest.raises(ConfigError, match="map tokens to different ids: curate the data with the checkpoint's"):
        load_initial_weights(source, other, manifest)


@pytest.mark.slow
def test_run_starts_from_the_checkpoint(run_a: Path, corpus: Path, tmp_path: Path) -> None:
    fresh_first = read_metrics(run_a)[1]["loss"]
    trained_last = read_metrics(run_a)[16]["loss"]
    proc = single_process(corpus, tmp_path / "cont", "--set", f"train.init_from={run_a / 'final'}",
                          "--set", "train.max_steps=2", "--set", "train.warmup_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = read_metrics(tmp_path / "cont")[1]
    assert abs(first["loss"] - trained_last) < 0.5 * (fresh_first - trained_last), (first, trained_last, fresh_first)
    assert first["lr"] < load_run_config(run_a / "final" / "run_config.yaml").train.lr  # the warm-up restarted


@pytest.mark.slow
def test_continued_pretraining_of_an_imported_granite(corpus: Path, tmp_path: Path, granite_factory) -> None:
    """train.init_from reads a GraniteMoeHybrid folder directly (export/loading.py); the run's model
    section is the imported config (multipliers, NoPE), and two steps move the weights only a little."""
    import yaml

    from export.hf import import_hf
    from model.bundle import load_bundle

    granite = granite_factory(tmp_path / "granite", corpus.parent / "tokenizer")
    imported = import_hf(granite)
    run_yaml = tmp_path / "granite_run.yaml"
    data = yaml.safe_load((Path(__file__).parents[2] / "config" / "runs" / "tiny.yaml").read_text())
    run_yaml.write_text(yaml.safe_dump({**data, "model": imported.cfg.model_dump(mode="json", exclude={"impl"})}))
    proc = single_process(corpus, tmp_path / "cont", "--config", str(run_yaml), "--set", f"train.init_from={granite}",
                          "--set", "train.max_steps=2", "--set", "train.warmup_steps=2", "--set", "train.save_every=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = load_bundle(tmp_path / "cont" / "final").model
    assert trained.cfg.scales == imported.cfg.scales and not trained.cfg.attention.rope
    moved = {k: float((v - trained.state_dict()[k]).abs().max()) for k, v in imported.state_dict().items()}
    assert max(moved.values()) < 0.05 and any(m > 0 for m in moved.values()), moved  # weights std 0.1
