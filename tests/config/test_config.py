"""The run-config schema: YAML + `--set` overrides, one-line errors naming the dotted key, round trips."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from config.loader import ConfigError, apply_overrides, dump_yaml, parse_override
from config.schema import RUNS_DIR, RunConfig, load_run_config, save_run_config
from model import ModelConfig
from model.presets import PRESETS

TINY_YAML = RUNS_DIR / "tiny.yaml"


def _error(overrides: list[str], path: str | Path = TINY_YAML) -> str:
    with pytest.raises(ConfigError) as exc:
        load_run_config(path, overrides)
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def test_yaml_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  preset: tiny\n  n_layers: 4\n  attention: {n_heads: 8, n_kv_heads: 2}\n"
        "train:\n  seq_len: 128\n  micro_batch_size: 2\n  global_batch_tokens: 512\n  lr: 1.0e-3\n"
    )
    cfg = load_run_config(path)
    assert (cfg.model.n_layers, cfg.model.attention.n_heads, cfg.model.attention.n_kv_heads) == (4, 8, 2)
    assert cfg.model.d_model == PRESETS["tiny"]["d_model"]  # untouched preset values stay
    assert cfg.train.lr == 1e-3 and cfg.train.seq_len == 128


def test_named_run_and_defaults() -> None:
    cfg = load_run_config("tiny")  # a name under config/runs/
    assert cfg == load_run_config(TINY_YAML)
    assert cfg.model.preset == "tiny" and cfg.train.max_steps == yaml.safe_load(TINY_YAML.read_text())["train"]["max_steps"]
    assert cfg.model.mamba.dt_limit == (0.0, math.inf)


def test_overrides_are_parsed() -> None:
    cfg = load_run_config(TINY_YAML, [
        "model.n_layers=12",  # int
        "train.lr=1e-3",  # float (YAML reads 1e-3 as text; the float field parses it)
        "model.attn_ratio=0.25",
        "train.activation_checkpointing=true",  # bool
        "model.attention.qk_norm=True",
        "train.betas=[0.8, 0.99]",  # list -> tuple
        "eval.benchmarks=[hellaswag, arc_easy]",  # list of strings
        "model.mamba.dt_limit=[0.0, 0.5]",
        "train.output_dir=runs/x=1",  # '=' inside the value
    ])
    assert cfg.model.n_layers == 12 and isinstance(cfg.model.n_layers, int)
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.model.attn_ratio == 0.25 and cfg.model.layer_pattern.count("A") == 3
    assert cfg.train.activation_checkpointing == "full" and cfg.model.attention.qk_norm is True
    assert cfg.train.betas == (0.8, 0.99)
    assert cfg.eval.benchmarks == ["hellaswag", "arc_easy"]
    assert cfg.model.mamba.dt_limit == (0.0, 0.5)
    assert cfg.train.output_dir == "runs/x=1"


def test_parse_override_values() -> None:
    assert parse_override("a.b=12") == (["a", "b"], 12)
    assert parse_override("a.b=1.5") == (["a", "b"], 1.5)
    assert parse_override("a.b=false") == (["a", "b"], False)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a.b=null") == (["a", "b"], None)
    assert parse_override("a.b=text") == (["a", "b"], "text")
    assert parse_override("a.b=") == (["a", "b"], "")
    assert apply_overrides({"a": {"c": 1}}, ["a.b.d=2"]) == {"a": {"c": 1, "b": {"d": 2}}}


def test_preset_merges_with_overrides() -> None:
    cfg = load_run_config(TINY_YAML, ["model.d_model=128", "model.attention.n_kv_heads=1", "model.mamba.d_state=16"])
    tiny = PRESETS["tiny"]
    assert cfg.model.d_model == 128
    assert cfg.model.attention.n_heads == tiny["attention"]["n_heads"]  # sibling key kept (deep merge)
    assert cfg.model.attention.n_kv_heads == 1
    assert cfg.model.mamba.d_state == 16 and cfg.model.mamba.chunk_size == tiny["mamba"]["chunk_size"]
    assert cfg.model.ffn_hidden == tiny["ffn_hidden"] and cfg.model.vocab_size == tiny["vocab_size"]
    # Direct construction merges the same way.
    direct = ModelConfig(preset="tiny", d_model=128, attention={"n_kv_heads": 1}, mamba={"d_state": 16})
    assert direct == cfg.model


@pytest.mark.parametrize("overrides, key, fragment", [
    (["model.n_layrs=4"], "model.n_layrs", "unknown key"),
    (["train.wandb.projekt=x"], "train.wandb.projekt", "unknown key"),
    (["model.n_layers=abc"], "model.n_layers", "'abc'"),
    (["train.activation_checkpointing=maybe"], "train.activation_checkpointing", "'maybe'"),
    (["model.d_model=250"], "model.attention.n_heads", "must divide d_model"),
    (["model.attention.n_kv_heads=3"], "model.attention.n_kv_heads", "must divide"),
    (["model.pattern=MAM"], "model.pattern", "length"),
    (["model.pattern=MAMXAM"], "model.pattern", "'X'"),
    (["model.pattern=mamama"], "model.pattern", "'a'"),
    (["model.n_layers=0"], "model.n_layers", "greater than or equal to 1"),
    (["model.attn_ratio=1.5"], "model.attn_ratio", "less than or equal to 1"),
    (["train.lr=-1"], "train.lr", "greater than 0"),
    (["model.mamba.d_state=0"], "model.mamba.d_state", "greater than or equal to 1"),
    (["model.mamba.headdim=48"], "model.mamba.headdim", "must divide"),
    (["model.mamba.dt_min=1.0"], "model.mamba.dt_min", "dt_max"),
    (["model.attention.head_dim=5"], "model.attention.head_dim", "even"),
    (["model.preset=huge"], "model.preset", "tiny"),
    (["train.warmup_steps=5000"], "train.warmup_steps", "max_steps"),
    (["data.packing=foo"], "data.packing", "'foo'"),
    (["train.lr=.inf"], "train.lr", "finite"),
    (["train.betas=[0.9, .nan]"], "train.betas.1", "finite"),
    (["train.micro_batch_size=true"], "train.micro_batch_size", "not true"),
    (["eval.limit=false"], "eval.limit", "not false"),
    (["train.output_dir="], "train.output_dir", "must name a folder"),
    (["export.output_dir=' '"], "export.output_dir", "must name a folder"),
    (["train.cuda_graph=true", "data.packing=document", "model.attn_backend=flex"], "model.attn_backend",
     "data.packing=continuous"),
    (["train.cuda_graph=true", "data.packing=continuous", "train.activation_checkpointing=true"],
     "train.cuda_graph", "activation_checkpointing"),
    (["train.checkpoint_block_types=R"], "train.checkpoint_block_types", "not in the model's pattern"),
    (["train.activation_checkpointing=selective"], "train.activation_checkpointing", "'selective'"),
    (["train.context_parallel=3"], "train.context_parallel", "multiple of context_parallel x model.mamba.chunk_size"),
    (["train.context_parallel=2", "model.pattern=MRMA", "model.n_layers=4"], "train.context_parallel", "R (routed)"),
    (["train.context_parallel=2", "train.cuda_graph=true", "data.packing=continuous"], "train.cuda_graph",
     "train.context_parallel"),
])
def test_bad_values_name_the_key(overrides: list[str], key: str, fragment: str) -> None:
    msg = _error(overrides)
    assert key in msg and fragment in msg, msg


def test_several_problems_in_one_line() -> None:
    msg = _error(["model.n_layers=0", "train.lr=0"])
    assert "model.n_layers" in msg and "train.lr" in msg


def test_bad_override_syntax_and_files(tmp_path: Path) -> None:
    assert "section.key=value" in _error(["train.lr"])
    assert "empty key" in _error(["train..lr=1"])
    assert "train.lr is a value, not a section" in _error(["train.lr=1", "train.lr.x=1"])
    missing = _error([], tmp_path / "missing.yaml")
    assert "missing.yaml not found" in missing and "tiny" in missing  # lists the known run names
    assert "not found" in _error([], "no_such_run")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert "not valid YAML" in _error([], bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    assert "mapping" in _error([], listing)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert "model: required key is missing" in _error([], empty)


@pytest.mark.parametrize("name", list(PRESETS))
def test_saved_config_reloads_equal(name: str, tmp_path: Path) -> None:
    cfg = RunConfig(model=ModelConfig(preset=name))
    path = tmp_path / "run_config.yaml"
    save_run_config(cfg, path)
    loaded = load_run_config(path)
    assert loaded == cfg
    assert dump_yaml(loaded) == path.read_text()  # and the dump is stable
    assert [p.name for p in tmp_path.iterdir()] == ["run_config.yaml"]  # no temp file left


def test_saved_config_with_overrides_reloads_equal(tmp_path: Path) -> None:
    cfg = load_run_config(TINY_YAML, ["model.pattern=MAMAAM", "model.mamba.dt_limit=[0.001, 0.2]",
                                      "train.betas=[0.9, 0.98]", "model.attention.qk_norm=true"])
    path = tmp_path / "run_config.yaml"
    save_run_config(cfg, path)
    assert load_run_config(path) == cfg


def test_checkpoint_config_cannot_redirect_output_or_enable_code(tmp_path: Path) -> None:
    """A checkpoint folder's run_config.yaml is someone else's file: eval/run.py and the export/generate
    entrypoints ignore its output paths and code execution, and take the user's flags."""
    import json

    from eval.run import parse_args, resolve_config
    from export.loading import resolve_run_config

    hostile = load_run_config("tiny", [f"eval.output={tmp_path / 'victim.txt'}", "eval.allow_code_execution=true",
                                       f"eval.tasks_dir={tmp_path}", f"export.output_dir={tmp_path / 'x'}",
                                       f"train.output_dir={tmp_path / 'y'}", "eval.limit=3"])
    ckpt = tmp_path / "ckpt"
    save_run_config(hostile, ckpt / "run_config.yaml")
    (ckpt / "config.json").write_text(json.dumps(hostile.model.model_dump(mode="json")))
    cfg = resolve_config(parse_args(["--checkpoint", str(ckpt)]))
    assert (cfg.eval.output, cfg.eval.allow_code_execution, cfg.eval.tasks_dir) == (None, False, None)
    assert cfg.eval.limit == 3  # the rest of the checkpoint's settings still apply
    mine = resolve_config(parse_args(["--checkpoint", str(ckpt), "--output", "mine.json", "--allow-code-execution"]))
    assert (mine.eval.output, mine.eval.allow_code_execution) == ("mine.json", True)
    exp = resolve_run_config(hostile.model, ckpt, None, [])
    assert (exp.export.output_dir, exp.train.output_dir) == ("exports", "runs/default")


def test_staged_dir_replaces_as_a_whole_with_normal_permissions(tmp_path: Path) -> None:
    import os

    from config.atomic import DIR_MODE, FILE_MODE, staged_dir

    final = tmp_path / "export"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_dir(final) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("export failed half-way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"] and (final / "old.txt").is_file()
    with staged_dir(final) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "model.onnx").write_bytes(b"onnx")
        os.chmod(tmp / "sub" / "model.onnx", 0o600)  # as mkstemp-based writers leave them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"] and not (final / "old.txt").exists()
    assert (final / "sub" / "model.onnx").stat().st_mode & 0o777 == FILE_MODE
    assert final.stat().st_mode & 0o777 == DIR_MODE


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_listed_preset_is_a_runnable_config(name: str) -> None:
    """`python -m model list` shows PRESETS; each must also work as `--config NAME`."""
    assert load_run_config(name).model.preset == name
