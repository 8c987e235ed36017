"""Everything checked before any processing starts, so bad input fails in seconds with one line:
the packages datatrove imports lazily, source paths and hub reachability, the reused tokenizer, the output
folder, and the eval sets (whose n-gram index is built here, on the submitting machine)."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from config.loader import dump_yaml
from config.recipe import RecipeConfig
from pipeline.decont import eval_passages, ngrams_config, write_index
from pipeline.errors import CurationError
from pipeline.layout import Layout
from pipeline.sources import check_source
from pipeline.spm_tokenizer import check_model
from pipeline.stages import decont_active


def resolve_tokenizer(recipe: RecipeConfig, base_dir: Path) -> str | None:
    """Absolute path of the tokenizer.model to reuse (None: train one); checked against the contract."""
    if not recipe.tokenizer.path:
        return None
    path = Path(recipe.tokenizer.path)
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise CurationError(f"tokenizer.path {path} does not exist (a sentencepiece .model to reuse)")
    import sentencepiece as spm

    try:
        check_model(path)
    except ValueError as exc:
        raise CurationError(f"tokenizer.path: {exc}") from None
    vocab = spm.SentencePieceProcessor(model_file=str(path)).vocab_size()
    if vocab != recipe.tokenizer.vocab_size:
        raise CurationError(f"tokenizer.path {path} has {vocab} pieces but tokenizer.vocab_size is "
                            f"{recipe.tokenizer.vocab_size}: make them agree")
    return str(path)


def claim_output(recipe: RecipeConfig, layout: Layout) -> None:
    """Bind the output folder to this recipe (resuming a different recipe's run would mix outputs)."""
    from config.atomic import atomic_write_bytes

    digest = recipe.sha256()
    if layout.recipe_hash.is_file() and layout.recipe_hash.read_text().strip() != digest:
        raise CurationError(f"output folder {layout.out} holds a run of a different recipe (or --limit-docs); "
                            f"pass a new --output or delete the folder")
    atomic_write_bytes(layout.recipe_hash, (digest + "\n").encode())
    atomic_write_bytes(layout.resolved_recipe, dump_yaml(recipe).encode())
    finalize_marker = layout.logs("finalize") / "completions" / "00000"
    if finalize_marker.exists() and not layout.manifest.exists():
        finalize_marker.unlink()  # manifest.json was removed: write it again


# Packages the stages import only inside their workers, after the output folder is claimed: orjson (JSONL reading
# and writing), xxhash (outside datatrove's declared range, xxhash 4 refuses the str datatrove 0.10 hashes), nltk
# (the word tokenizer of MinHash and decontamination, pipeline/wordtok.py) and py3langid (the language filter). A
# missing one would otherwise fail minutes in, with a traceback per task.
STAGE_PACKAGES = ("orjson", "xxhash", "nltk", "py3langid")


def check_packages() -> None:
    """Each of STAGE_PACKAGES is installed, within the version range datatrove's metadata declares for it."""
    try:
        requirements = md.requires("datatrove") or []
    except md.PackageNotFoundError:
        raise CurationError("datatrove is not installed: pip install -r requirements.txt") from None
    declared = {}
    for line in requirements:
        req = Requirement(line)
        declared[req.name] = declared.get(req.name, SpecifierSet()) & req.specifier
    problems = []
    for name in STAGE_PACKAGES:
        wanted = declared.get(name, SpecifierSet())
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            problems.append(f"{name}{wanted} (not installed)")
            continue
        if not wanted.contains(installed, prereleases=True):
            problems.append(f"{name}{wanted} (installed: {installed})")
    if problems:
        raise CurationError(f"the curation stages need {', '.join(problems)}: pip install -r requirements.txt "
                            "(or these packages at those versions)")


def preflight(recipe: RecipeConfig, base_dir: Path, layout: Layout, data_root: str | None) -> str | None:
    """Run every check; returns the tokenizer to reuse (or None). Raises CurationError.
    The output folder is claimed only once every check has passed, so a corrected recipe can reuse it."""
    check_packages()
    for source in recipe.sources:
        check_source(source, base_dir, data_root)
    tokenizer = resolve_tokenizer(recipe, base_dir)
    passages = eval_passages(recipe.decontamination, base_dir) if decont_active(recipe) else None
    claim_output(recipe, layout)
    if passages is not None:
        write_index(passages, layout.decont_index, ngrams_config(recipe.decontamination))
    return tokenizer
