"""Pre-run checks: the output folder is claimed only after they pass; sources must yield text under
text_key; a corpus that curation empties stops before tokenizer training (one line each)."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.recipe import RecipeConfig

pytest.importorskip("datatrove", reason="datatrove is not installed here (curation runs on it)")
from pipeline.errors import CurationError
from pipeline.layout import Layout
from pipeline.preflight import preflight
from pipeline.stages import build_stages

from .conftest import EMBEDDED, write_jsonl


def recipe(tmp_path: Path, **extra) -> RecipeConfig:
    write_jsonl(tmp_path / "src" / "a.jsonl", [{"text": "One short document.", "id": "a"}])
    return RecipeConfig(name="pre", sources=[{"name": "s", "type": "jsonl", "path": "src"}], **extra)


def test_failed_eval_set_check_does_not_claim_the_folder(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "out")
    bad = recipe(tmp_path, decontamination={"files": [{"name": "e", "path": "missing.jsonl"}]})
    with pytest.raises(CurationError, match="eval set e: file .*missing.jsonl not found"):
        preflight(bad, tmp_path, layout, None)
    assert not layout.recipe_hash.exists()
    fixed = recipe(tmp_path, decontamination={"files": [{"name": "e", "path": str(EMBEDDED / "eval" /
                                                                                   "local_passages.jsonl")}]})
    preflight(fixed, tmp_path, layout, None)  # the same folder takes the corrected recipe
    assert layout.recipe_hash.read_text().strip() == fixed.sha256()
    assert list(layout.decont_index.glob("*.index.hashes"))


@pytest.mark.parametrize("rows", [[{"content": "text under another key", "id": "a"}], [{"text": "", "id": "b"}]])
def test_source_without_text_under_text_key_is_refused(tmp_path: Path, rows: list[dict]) -> None:
    write_jsonl(tmp_path / "other" / "a.jsonl", rows)
    r = RecipeConfig(name="pre", sources=[{"name": "s", "type": "jsonl", "path": "other"}])
    with pytest.raises(CurationError, match=r"^source s: none of its first 1 records has a non-empty 'text' field "
                                            r"\(fields: .*\); set the source's text_key") as err:
        preflight(r, tmp_path, Layout(tmp_path / "out"), None)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_empty_corpus_stops_before_tokenizer_training(tmp_path: Path) -> None:
    r = recipe(tmp_path)
    layout = Layout(tmp_path / "out")
    tokenizer_stage = next(s for s in build_stages(r, tmp_path, layout, None, None) if s.name == "tokenizer")
    (layout.curated / "train" / "s").mkdir(parents=True)
    (layout.curated / "train" / "s" / "00000.jsonl").write_text("")
    with pytest.raises(CurationError, match="^no training documents are left after filtering") as err:
        tokenizer_stage.check()
    assert "\n" not in str(err.value)
    write_jsonl(layout.curated / "train" / "s" / "00001.jsonl", [{"text": "kept", "id": "a"}])
    tokenizer_stage.check()


@pytest.mark.parametrize(("versions", "expected"), [
    ({"xxhash": "4.0.1"}, "xxhash<4 (installed: 4.0.1)"),
    ({"orjson": None}, "orjson (not installed)"),
    ({"nltk": None}, "nltk (not installed)"),
    ({"py3langid": None}, "py3langid (not installed)"),
])
def test_stage_packages_outside_datatroves_range_are_refused_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, versions: dict, expected: str) -> None:
    """A GPU image's xxhash 4 (datatrove 0.10 hashes str, which it refuses) or a missing stage package: one line at the
    pre-run checks, and the output folder stays unclaimed."""
    import importlib.metadata as md

    real = md.version

    def version(name: str) -> str:
        if name not in versions:
            return real(name)
        if versions[name] is None:
            raise md.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(md, "version", version)
    layout = Layout(tmp_path / "out")
    with pytest.raises(CurationError, match="the curation stages need") as info:
        preflight(recipe(tmp_path), tmp_path, layout, None)
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert not layout.recipe_hash.exists()


def test_no_datatrove_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata as md

    from pipeline.preflight import check_packages

    def requires(name: str) -> list[str]:
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "requires", requires)
    with pytest.raises(CurationError, match="^datatrove is not installed: pip install -r requirements.txt$"):
        check_packages()
