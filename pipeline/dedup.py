"""Exact and MinHash near-dedup configs for datatrove's dedup stages (see pipeline/stages.py).

Each dedup is datatrove's multi-stage recipe: signatures per task, a global find/bucket pass, then a
filter pass that re-reads the same files with the same tasks (it matches documents by their index in
the task's stream, so the reader in front of a signature stage and its filter stage must be equal).
"""

from __future__ import annotations

from datatrove.data import Document
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.utils.hashing import HashConfig

from config.recipe import MinhashSettings


def document_text(doc: Document) -> str:
    """Exact-dedup key: the full text (datatrove hashes it with 64-bit xxhash)."""
    return doc.text


def exact_config() -> ExactDedupConfig:
    return ExactDedupConfig(content_getter=document_text, hash_config=HashConfig(precision=64))


def minhash_config(cfg: MinhashSettings) -> MinhashConfig:
    return MinhashConfig(n_grams=cfg.n_grams, num_buckets=cfg.num_buckets, hashes_per_bucket=cfg.hashes_per_bucket,
                         seed=cfg.seed, hash_config=HashConfig(precision=cfg.hash_precision))
