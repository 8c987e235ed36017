"""Recipe schema and the CLI's one-line errors (stderr is one line, exit code 2, nothing processed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from config.loader import ConfigError
from config.recipe import RecipeConfig, load_recipe

from .conftest import run_cli

pytest.importorskip("datatrove", reason="datatrove is not installed here (curation runs on it)")


def test_shipped_recipes_validate() -> None:
    embedded, base = load_recipe("embedded")
    assert embedded.tokenizer.vocab_size == 8192 and base.name == "data_recipes"
    prod, _ = load_recipe("production_100b")
    assert prod.tokenizer.vocab_size == 32000 and len(prod.sources) == 8
    assert abs(sum(prod.weights().values()) - 1) < 1e-9
    assert prod.dedup.minhash.n_grams == 5 and prod.dedup.minhash.num_buckets == 14
    assert prod.decontamination.n_grams == 13


PYDOC = {"name": "a", "type": "pydoc"}


@pytest.mark.parametrize("patch, message", [
    ({"sources": [{"name": "a", "type": "jsonl", "path": "x", "colour": 1}]}, "sources.0.colour: unknown key"),
    ({"sources": [{"name": "a", "type": "jsonl"}]}, "sources.0: path is required for a jsonl source"),
    ({"sources": [{"name": "a", "type": "hf"}]}, "sources.0: hub_id is required"),
    ({"sources": [{"name": "a b", "type": "pydoc"}]}, "sources.0: name 'a b' must match"),
    ({"sources": [{"name": "a", "type": "pydoc"}, {"name": "a", "type": "pydoc"}]}, "sources.name must be unique"),
    ({"sources": [PYDOC], "dedup": {"minhash": {"n_gram": 5}}}, "dedup.minhash.n_gram: unknown key"),
    ({"sources": [PYDOC], "output": {"validation_fraction": 1.5}}, "output.validation_fraction"),
])
def test_schema_errors_name_the_key(tmp_path: Path, patch: dict, message: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", **patch}))
    with pytest.raises(ConfigError, match=message):
        load_recipe(path)


def test_recipe_hash_changes_with_any_value() -> None:
    a = RecipeConfig(name="r", sources=[{"name": "a", "type": "pydoc"}])
    b = RecipeConfig(name="r", sources=[{"name": "a", "type": "pydoc", "weight": 2}])
    assert a.sha256() == RecipeConfig.model_validate(a.model_dump()).sha256() != b.sha256()


def cli_error(*args: str) -> str:
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    return proc.stderr


def test_cli_unknown_key(tmp_path: Path) -> None:
    assert "filters.c4.min_sentences: unknown key" in cli_error("--recipe", "embedded", "--output", str(tmp_path),
                                                                "--set", "filters.c4.min_sentences=3")


def test_cli_unknown_recipe() -> None:
    assert "recipe nope not found (a YAML path or one of: embedded, production_100b" in cli_error("--recipe", "nope")


def test_cli_missing_input_path(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "sources": [{"name": "web", "type": "jsonl", "path": "data/web"}]}))
    err = cli_error("--recipe", str(recipe), "--output", str(tmp_path / "out"))
    assert f"source web: input path {tmp_path}/data/web does not exist" in err
    assert not (tmp_path / "out").exists()  # failed before touching the output


def test_cli_unreachable_source(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "sources": [
        {"name": "local", "type": "pydoc"}, {"name": "remote", "type": "hf", "hub_id": "org/unreachable"}]}))
    err = cli_error("--recipe", str(recipe), "--output", str(tmp_path / "out"))
    assert "source remote: cannot reach hub dataset org/unreachable" in err and "--data-root" in err


def test_cli_missing_eval_set(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "sources": [{"name": "a", "type": "pydoc"}],
                                      "decontamination": {"files": [{"name": "trivia", "path": "trivia.jsonl"}]}}))
    assert "eval set trivia: file" in cli_error("--recipe", str(recipe), "--output", str(tmp_path / "out"))


def test_cli_bad_limit() -> None:
    assert "--limit-docs must be >= 1" in cli_error("--recipe", "embedded", "--limit-docs", "0")
