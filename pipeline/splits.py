"""Deterministic train/validation assignment by document id (independent of order, tasks and reruns)."""

from __future__ import annotations

import hashlib

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.typeshelper import StatHints

SPLITS = ("train", "validation")


def unit_hash(seed: int, key: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, key)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


class SplitAssigner(PipelineStep):
    """Set `metadata["split"]`: "validation" for a `fraction` of documents chosen by id hash, else "train"."""

    name = "✂️ Train/validation split"
    type = "🔀 - SPLIT"

    def __init__(self, fraction: float, seed: int):
        super().__init__()
        self.fraction = fraction
        self.seed = seed

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            split = "validation" if unit_hash(self.seed, doc.id) < self.fraction else "train"
            doc.metadata["split"] = split
            self.stat_update(StatHints.total, split)
            yield doc
