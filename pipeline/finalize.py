"""Last stage: publish the merged shards under tokens/, then write manifest.json and report.json.

Each `work/merged/<split>/<source>/` folder is moved to `tokens/<split>/<source>/` with one rename, so
tokens/ never holds a half-written shard; manifest.json (written atomically, last) is the commit point
readers rely on.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.logging import logger

from config.manifest import FORMAT_VERSION, Manifest, dtype_for_vocab, sha256_of
from config.recipe import RecipeConfig
from pipeline.layout import Layout
from pipeline.report import build_report, format_report
from pipeline.splits import SPLITS
from pipeline.spm_tokenizer import JSON_NAME, MODEL_NAME, SPECIAL_PIECES


def publish(merged: Path, final: Path) -> None:
    """Move a finished merge folder into place (idempotent: a rerun after the move does nothing)."""
    if not merged.is_dir():
        return
    for empty in [p for p in merged.glob("*.ds") if p.stat().st_size == 0]:
        for f in merged.glob(f"{empty.name}*"):
            f.unlink()
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(merged, final)


def shard_entry(ds: Path, root: Path, token_size: int) -> dict[str, Any]:
    index = ds.with_name(ds.name + ".index")
    size = ds.stat().st_size
    return {"path": str(ds.relative_to(root)), "index": str(index.relative_to(root)), "bytes": size,
            "tokens": size // token_size, "documents": index.stat().st_size // 8,
            "sha256": sha256_of(ds), "index_sha256": sha256_of(index)}


def build_manifest(layout: Layout, recipe: RecipeConfig) -> dict[str, Any]:
    import sentencepiece as spm

    model, hf_json = layout.tokenizer_dir / MODEL_NAME, layout.tokenizer_dir / JSON_NAME
    vocab = spm.SentencePieceProcessor(model_file=str(model)).vocab_size()
    dtype, token_size = dtype_for_vocab(vocab)
    weights = recipe.weights()
    splits = {}
    for split in SPLITS:
        sources = []
        for s in recipe.sources:
            folder = layout.tokens(split, s.name)
            shards = [shard_entry(p, layout.out, token_size) for p in sorted(folder.glob("*.ds"))]
            sources.append({"name": s.name, "weight": weights[s.name], "folder": str(folder.relative_to(layout.out)),
                            "documents": sum(x["documents"] for x in shards),
                            "tokens": sum(x["tokens"] for x in shards), "shards": shards})
        splits[split] = {"documents": sum(x["documents"] for x in sources),
                         "tokens": sum(x["tokens"] for x in sources), "sources": sources}
    return {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe": {"name": recipe.name, "sha256": recipe.sha256()},
        "tokenizer": {"model": str(model.relative_to(layout.out)), "json": str(hf_json.relative_to(layout.out)),
                      "sha256": sha256_of(model), "json_sha256": sha256_of(hf_json), "vocab_size": vocab,
                      **{f"{k}_id": i for k, (i, _) in SPECIAL_PIECES.items()}},
        "token_dtype": dtype,
        "token_size": token_size,
        "splits": splits,
    }


class FinalizeStep(PipelineStep):
    name = "📦 Publish shards, manifest, report"
    type = "📦 - FINALIZE"

    def __init__(self, recipe: RecipeConfig, layout: Layout, stage_names: list[str]):
        super().__init__()
        self.recipe, self.layout, self.stage_names = recipe, layout, stage_names

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from config.atomic import atomic_write_json

        layout = self.layout
        for split in SPLITS:
            for s in self.recipe.sources:
                publish(layout.merged(split, s.name), layout.tokens(split, s.name))
        manifest = build_manifest(layout, self.recipe)
        Manifest.model_validate(manifest)  # the writer obeys the reader's schema
        report = build_report(layout, self.stage_names, manifest, self.recipe.name, self.recipe.sha256())
        atomic_write_json(layout.report, report)
        atomic_write_json(layout.manifest, manifest)
        logger.info("curation report\n" + format_report(report))
