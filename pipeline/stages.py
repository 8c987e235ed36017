"""The curation run as an ordered list of datatrove stages (one executor each, see pipeline/executors.py).

    prepare.<source>      read -> quality filters -> 13-gram decontamination
                                                      -> work/filtered/<source>/        (T tasks per source)
    exact.signatures|find|filter                      -> work/exact_deduped/<source>/
    minhash.signatures|buckets|cluster                (FineWeb's 4-stage MinHash; its filter runs in `final`)
    final                 MinHash filter -> train/validation split -> work/curated/<split>/<source>/
    tokenizer             sentencepiece BPE on a weighted sample of curated train text -> tokenizer/
    tokenize.<split>.<source>, merge.<split>.<source>
                          DocumentTokenizer (EOS after each document, shuffled) + DocumentTokenizerMerger
                          (shuffled, shard_tokens per .ds)  -> work/merged/<split>/<source>/
    finalize              merged folders -> tokens/ (one rename each), manifest.json, report.json

Decontamination runs before both dedups: a contaminated near copy of a clean document (the clean
text plus an eval passage) would otherwise be in the clean one's MinHash cluster, and if dedup kept the
copy, decontamination would then drop it too, losing both (docs/curation.md).

T = recipe.cluster.tasks. Every stage writes datatrove stats and completion markers under
work/logs/<stage>/, so a rerun skips finished tasks; all shuffles and splits are seeded, so a resumed
run writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Callable

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import ExactDedupFilter, ExactDedupSignature, ExactFindDedups
from datatrove.pipeline.dedup.minhash import (
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.tokens import DocumentTokenizer, DocumentTokenizerMerger
from datatrove.utils.tokenization import PipelineStepWithTokenizer

from config.recipe import RecipeConfig
from pipeline.decont import decont_filter
from pipeline.dedup import exact_config, minhash_config
from pipeline.filters import build_filters
from pipeline.finalize import FinalizeStep
from pipeline.layout import Layout, WorkReader, require_documents, work_writer
from pipeline.sources import build_reader
from pipeline.splits import SPLITS, SplitAssigner
from pipeline.spm_tokenizer import JSON_NAME, SPECIAL_PIECES, TokenizerStep
from pipeline.wordtok import WORD_TOKENIZER

EOS_PIECE = SPECIAL_PIECES["eos"][1]


@dataclass
class Stage:
    name: str
    pipeline: list[PipelineStep]
    tasks: int
    check: Callable[[], None] | None = None  # run by the local executor before the stage; raises CurationError


class SpmDocumentTokenizer(DocumentTokenizer):
    """DocumentTokenizer whose tokenizer encodes literal special-token strings as text (like sentencepiece)."""

    @cached_property
    def tokenizer(self):
        tok = PipelineStepWithTokenizer.tokenizer.func(self)
        tok.encode_special_tokens = True
        return tok


def decont_active(recipe: RecipeConfig) -> bool:
    d = recipe.decontamination
    return d.enabled and bool(d.files or d.lm_eval_tasks)


def tokenize_pipeline(curated: Path, tokenized: Path, tokenizer_json: Path, seed: int) -> list[PipelineStep]:
    """Curated jsonl -> shuffled token files (EOS after each document), one per task."""
    return [WorkReader(curated),
            SpmDocumentTokenizer(str(tokenized), str(tokenizer_json), eos_token=EOS_PIECE, seed=seed)]


def build_stages(recipe: RecipeConfig, base_dir: Path, layout: Layout, data_root: str | None,
                 tokenizer_path: str | None) -> list[Stage]:
    """Every stage of the run, in dependency order (each stage depends on all before it)."""
    tasks, seed = recipe.cluster.tasks, recipe.output.seed
    decont = [decont_filter(recipe.decontamination, layout.decont_index)] if decont_active(recipe) else []
    stages = [
        Stage(f"prepare.{s.name}",
              [build_reader(s, base_dir, tasks, data_root), *build_filters(recipe.filters, s), *decont,
               work_writer(layout.filtered)], tasks)
        for s in recipe.sources
    ]
    current = layout.filtered

    if recipe.dedup.exact:
        sigs, dups, cfg = layout.dedup("exact", "signatures"), layout.dedup("exact", "duplicates"), exact_config()
        stages += [
            Stage("exact.signatures", [WorkReader(current, "*/*.jsonl"), ExactDedupSignature(str(sigs), cfg)], tasks),
            Stage("exact.find", [ExactFindDedups(str(sigs), str(dups), cfg)], 1),
            Stage("exact.filter", [WorkReader(current, "*/*.jsonl"), ExactDedupFilter(str(dups), cfg),
                                   work_writer(layout.exact_deduped)], tasks),
        ]
        current = layout.exact_deduped

    final: list[PipelineStep] = []
    if recipe.dedup.minhash.enabled:
        mh = minhash_config(recipe.dedup.minhash)
        sigs, buckets, remove = (layout.dedup("minhash", p) for p in ("signatures", "buckets", "remove"))
        stages += [
            Stage("minhash.signatures", [WorkReader(current, "*/*.jsonl"),
                                         MinhashDedupSignature(str(sigs), mh, language=WORD_TOKENIZER)], tasks),
            Stage("minhash.buckets", [MinhashDedupBuckets(str(sigs), str(buckets), config=mh)], mh.num_buckets),
            Stage("minhash.cluster", [MinhashDedupCluster(str(buckets), str(remove), config=mh)], 1),
        ]
        final.append(MinhashDedupFilter(str(remove)))
    final += [SplitAssigner(recipe.output.validation_fraction, seed),
              work_writer(layout.curated, "${split}/${source}/${rank}.jsonl")]
    stages.append(Stage("final", [WorkReader(current, "*/*.jsonl"), *final], tasks))

    weights = recipe.weights()
    stages.append(Stage("tokenizer", [TokenizerStep(recipe.tokenizer, tokenizer_path, str(layout.curated / "train"),
                                                    str(layout.tokenizer_work), str(layout.tokenizer_dir),
                                                    weights, seed)], 1,
                        check=partial(require_documents, layout.curated / "train")))
    budget = recipe.output.total_tokens

    def train_budget(source: str) -> int:
        """The source's share of output.total_tokens (-1: keep everything)."""
        return round(budget * weights[source]) if budget else -1

    for split in SPLITS:
        for s in recipe.sources:
            tokenized, merged = layout.tokenized(split, s.name), layout.merged(split, s.name)
            stages += [
                Stage(f"tokenize.{split}.{s.name}",
                      tokenize_pipeline(layout.curated / split / s.name, tokenized, layout.tokenizer_dir / JSON_NAME,
                                        seed), tasks),
                Stage(f"merge.{split}.{s.name}",
                      [DocumentTokenizerMerger(str(tokenized), str(merged), save_filename=s.name,
                                               max_tokens_per_file=recipe.output.shard_tokens,
                                               max_tokens=train_budget(s.name) if split == "train" else -1,
                                               seed=seed, progress=False)], 1),
            ]
    names = [st.name for st in stages]
    stages.append(Stage("finalize", [FinalizeStep(recipe, layout, names)], 1))
    return stages
