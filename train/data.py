"""Training and validation sequences from the manifest: blending, the global sample order, packing.

Shape legend: b micro-batch, l train.seq_len.

Sequences. Each source of a split is read through datatrove's `DatatroveFolderDataset` with
`return_positions=True`: consecutive, non-overlapping windows of l + 1 tokens, each with the position
of every token inside its document (0 where a document starts; the window's first token is always
0). A document longer than l therefore spans windows, and a window holds the ends and starts of as
many documents as fall into it. The window order inside a source is the shard order (datatrove
shuffles documents when it tokenizes), read sequentially, which is what datatrove's reader is fast at.

Blending (`Blend`). Global sample i maps to (source s, the k-th sample of s) by a fixed periodic
pattern: each block of 2^16 consecutive samples holds round(w_s 2^16) samples of source s, spread
evenly. It is a pure function of i and the weights: independent of the run length, the world size,
the seed and of where a run was resumed. The k-th sample of s is window k mod n_s (a source that runs
out starts over; the trainer warns).

Sample order. Optimizer step t covers the global samples c_t ... c_t + G - 1 (c_t = consumed samples
before the step, G = sequences per step); rank r of W takes the j-th of them for j = r, r + W, ...
(`RankBatches`). Only c_t is stored in a checkpoint, so resuming on any number of ranks continues
exactly where the run stopped, and the union over ranks of a step's samples never depends on W.

Packing (`collate`). From windows tokens (b, l+1) and positions (b, l+1):
  input_ids = tokens[:, :-1], targets = tokens[:, 1:]
  document:   labels = targets with -100 where the target starts a new document (a document's first
              token predicted from the previous document's last token, its EOS); position_ids =
              positions[:, :-1]; seq_idx = running document index per row (0, 0, ..., 1, 1, ...).
  continuous: labels = targets, no position_ids/seq_idx (windows are always full: no padding).
"""

from __future__ import annotations

import bisect
import math
import signal
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from config.manifest import Manifest, ManifestError, SourceEntry
from model.loss import IGNORE_INDEX
from train.errors import TrainingError
from train.shard_check import shard_problem

Packing = Literal["document", "continuous"]


class SourceWindows:
    """Windows of seq_len + 1 tokens (and in-document positions) of one source, via datatrove."""

    def __init__(self, name: str, folder: Path, shards: list[Path], seq_len: int, token_size: int,
                 vocab_size: int) -> None:
        from datatrove.utils.dataset import DatatroveFolderDataset

        self.name, self.folder, self.token_size, self.vocab_size = name, folder, token_size, vocab_size
        self.checked: set[int] = set()  # shards (by position in the dataset) that passed shard_problem
        if not folder.is_dir():
            raise ManifestError(f"source folder {folder} is missing: re-run pipeline/curate.py")
        self.dataset = DatatroveFolderDataset(str(folder), seq_len, token_size=token_size, return_positions=True)
        found = {(folder / f.file_path).resolve() for f in self.dataset.files}  # paths relative to folder
        listed = {p.resolve() for p in shards}
        if found != listed:
            extra, missing = sorted(map(str, found - listed)), sorted(map(str, listed - found))
            raise ManifestError(
                f"source folder {folder} does not match the manifest (not listed: {extra[:2]}, "
                f"missing: {missing[:2]}): re-run pipeline/curate.py"
            )
        self.n_windows = len(self.dataset)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Window k mod n_windows: tokens (l+1,) long and positions (l+1,) long. The first read from a
        shard checks it (train/shard_check.py: token ids within the vocabulary, sane document offsets)."""
        k %= self.n_windows
        shard = bisect.bisect_right(self.dataset.lens, k) - 1
        if shard not in self.checked:  # first read from this shard (in this process)
            path = self.folder / self.dataset.files[shard].file_path
            if (problem := shard_problem(path, self.token_size, self.vocab_size)) is not None:
                raise ManifestError(f"corrupt shard {path}: {problem}; re-run pipeline/curate.py")
            self.checked.add(shard)
        item = self.dataset[k]
        return item["input_ids"], item["positions"].long()


class Blend:
    """Deterministic interleaving of sources by weight (see the module doc)."""

    PERIOD = 1 << 16

    def __init__(self, weights: Sequence[float], names: Sequence[str]) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or w.sum() <= 0 or (w < 0).any():
            raise ManifestError(f"source weights must be >= 0 with a positive sum, got {list(weights)}")
        exact = w / w.sum() * self.PERIOD
        counts = np.floor(exact).astype(np.int64)
        # largest remainder: the samples left over go to the largest fractional parts (ties: first source)
        order = sorted(range(len(w)), key=lambda s: (-(exact[s] - counts[s]), s))
        counts[order[: self.PERIOD - int(counts.sum())]] += 1
        too_small = [names[s] for s in range(len(w)) if w[s] > 0 and counts[s] == 0]
        if too_small:
            raise ManifestError(f"source weight below 1/{self.PERIOD} for {too_small}: raise or remove it")
        # k-th sample of source s sits at time (k + 1/2) / m_s of the period; exact in float64 here
        times = np.concatenate([(np.arange(m) + 0.5) / m for m in counts if m])
        src = np.concatenate([np.full(m, s) for s, m in enumerate(counts) if m])
        rank = np.concatenate([np.arange(m) for m in counts if m])
        perm = np.lexsort((src, times))
        self.counts = counts
        self.src = src[perm].astype(np.int64)
        self.rank = rank[perm].astype(np.int64)
        self._offsets = [np.flatnonzero(self.src == s) for s in range(len(w))]

    def locate(self, i: int) -> tuple[int, int]:
        """Global sample i -> (source index s, k: how many samples of s come before it)."""
        period, offset = divmod(int(i), self.PERIOD)
        s = int(self.src[offset])
        return s, period * int(self.counts[s]) + int(self.rank[offset])

    def count(self, s: int, n: int) -> int:
        """Samples of source s among the first n global samples."""
        period, offset = divmod(int(n), self.PERIOD)
        return period * int(self.counts[s]) + int(np.searchsorted(self._offsets[s], offset))


class BlendedWindows(Dataset):
    """Global sample index -> {"tokens", "positions", "source", "index"} for one split.

    Sources with weight 0 are left out. In the train split a source with weight > 0 must hold a
    window; in the validation split sources too small for one window are left out (named in
    `skipped`), since a held-out share of a small source may be tiny.
    """

    def __init__(self, manifest: Manifest, split: str, seq_len: int,
                 weights_override: Mapping[str, float] | None = None) -> None:
        self.split_name = split
        self.sources: list[SourceWindows] = []
        self.skipped: list[str] = []
        entries = manifest.splits[split].sources
        override = dict(weights_override or {})
        unknown = sorted(set(override) - {e.name for e in entries})
        if unknown:
            raise TrainingError(f"data.weights names {unknown}, not sources of the {split} split "
                                f"({', '.join(e.name for e in entries)}): fix the names")
        if split == "train" and not any(override.get(e.name, e.weight) > 0 for e in entries):
            raise TrainingError("data.weights leaves every train source at weight 0 "
                                f"({', '.join(e.name for e in entries)}): give at least one a positive weight")
        weights = []
        for entry in entries:
            weight = override.get(entry.name, entry.weight)
            if weight == 0:
                continue
            src = self._open(manifest, entry, seq_len) if entry.tokens else None
            if src is None or src.n_windows == 0:
                if split == "train":
                    raise TrainingError(
                        f"train source '{entry.name}' has no shard of {seq_len + 1} tokens: "
                        "lower train.seq_len or give it more data"
                    )
                self.skipped.append(entry.name)
                continue
            self.sources.append(src)
            weights.append(weight)
        if not self.sources:
            raise TrainingError(f"the {split} split has no source with a window of {seq_len + 1} tokens"
                                + (": set train.eval_every=0 or lower train.seq_len" if split != "train" else ""))
        self.blend = Blend(weights, [s.name for s in self.sources])

    @staticmethod
    def _open(manifest: Manifest, entry: SourceEntry, seq_len: int) -> SourceWindows:
        shards = [manifest.resolve(s.path) for s in entry.shards]
        return SourceWindows(entry.name, manifest.resolve(entry.folder), shards, seq_len, manifest.token_size,
                             manifest.tokenizer.vocab_size)

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def epochs(self, n: int) -> dict[str, float]:
        """How many passes over each source the first n global samples make."""
        return {src.name: self.blend.count(s, n) / src.n_windows for s, src in enumerate(self.sources)}

    def __getitem__(self, i: int) -> dict:
        s, k = self.blend.locate(i)
        tokens, positions = self.sources[s][k]
        return {"tokens": tokens, "positions": positions, "source": s, "index": int(i)}


def collate(samples: list[dict], packing: Packing) -> dict[str, torch.Tensor]:
    """Windows -> model inputs (see the module doc). Every tensor is (b, l) long except
    `source` and `index` (b,): the sample's source and global index."""
    tokens = torch.stack([s["tokens"] for s in samples])  # (b, l+1)
    batch = {
        "input_ids": tokens[:, :-1].contiguous(),
        "source": torch.tensor([s["source"] for s in samples]),
        "index": torch.tensor([s["index"] for s in samples]),
    }
    targets = tokens[:, 1:]
    if packing == "continuous":
        batch["labels"] = targets.contiguous()
        return batch
    positions = torch.stack([s["positions"] for s in samples])  # (b, l+1)
    starts = positions == 0
    batch["labels"] = targets.masked_fill(starts[:, 1:], IGNORE_INDEX)
    batch["position_ids"] = positions[:, :-1].contiguous()
    batch["seq_idx"] = starts[:, :-1].long().cumsum(dim=1) - 1
    return batch


class RankBatches(Sampler[list[int]]):
    """This rank's micro-batches of global sample indices for `n_steps` optimizer steps.

    Step t covers global samples first_sample + t * per_step + j, j < per_step; rank r takes
    j = r, r + world, ... and cuts them into micro-batches of `micro_batch` (in that order).
    """

    def __init__(self, first_sample: int, n_steps: int, per_step: int, rank: int, world: int, micro_batch: int):
        if per_step % (world * micro_batch):
            raise ValueError(f"{per_step} sequences per step do not split into {world} ranks x {micro_batch}")
        self.first, self.n_steps, self.per_step = first_sample, n_steps, per_step
        self.rank, self.world, self.micro_batch = rank, world, micro_batch

    @property
    def accumulation(self) -> int:
        return self.per_step // (self.world * self.micro_batch)

    def __len__(self) -> int:
        return self.n_steps * self.accumulation

    def __iter__(self) -> Iterator[list[int]]:
        for t in range(self.n_steps):
            base = self.first + t * self.per_step
            mine = list(range(base + self.rank, base + self.per_step, self.world))
            for m in range(0, len(mine), self.micro_batch):
                yield mine[m : m + self.micro_batch]


def eval_index_batches(n_sequences: int, rank: int, world: int, micro_batch: int) -> tuple[list[list[int]], int]:
    """Validation samples 0..n-1 of this rank in micro-batches, and the number of forward passes
    every rank must run (the same on all ranks: ZeRO-3 gathers parameters collectively)."""
    mine = list(range(rank, n_sequences, world))
    batches = [mine[m : m + micro_batch] for m in range(0, len(mine), micro_batch)]
    return batches, math.ceil(math.ceil(n_sequences / world) / micro_batch)


def shield_worker_from_termination(worker_id: int) -> None:
    """DataLoader worker_init_fn: workers ignore SIGTERM and SIGINT.

    On preemption the scheduler (or Ctrl-C) signals every process of the job. A worker that dies of it
    makes the main process raise `DataLoader worker ... killed by signal` in the middle of the
    emergency checkpoint the main process is writing (inside save_checkpoint). The
    main process handles the signal (train/checkpoint.py), saves, and then shuts its workers down;
    a worker whose main process is gone exits by itself (torch's worker watchdog).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class TrainData:
    """The train and validation datasets of a manifest at one sequence length and packing."""

    manifest: Manifest
    seq_len: int
    packing: Packing
    num_workers: int = 0
    weights: Mapping[str, float] | None = None  # data.weights: per-source overrides of the manifest's

    def __post_init__(self) -> None:
        self.train = BlendedWindows(self.manifest, "train", self.seq_len, self.weights)

    @cached_property
    def validation(self) -> BlendedWindows:
        """Opened on first use, so a run with train.eval_every=0 needs no usable validation split."""
        if "validation" not in self.manifest.splits:
            raise TrainingError(f"{self.manifest.root}/manifest.json has no validation split: set train.eval_every=0")
        return BlendedWindows(self.manifest, "validation", self.seq_len, self.weights)

    def train_loader(self, first_sample: int, n_steps: int, per_step: int, rank: int, world: int,
                     micro_batch: int, pin_memory: bool = False) -> DataLoader:
        """Micro-batches of this rank for `n_steps` steps starting at global sample `first_sample`."""
        sampler = RankBatches(first_sample, n_steps, per_step, rank, world, micro_batch)
        return DataLoader(
            self.train, batch_sampler=sampler, collate_fn=partial(collate, packing=self.packing),
            num_workers=self.num_workers, pin_memory=pin_memory,
            worker_init_fn=shield_worker_from_termination if self.num_workers else None,
        )

    def eval_batches(self, n_sequences: int, rank: int, world: int, micro_batch: int) -> tuple[list[dict], int]:
        """This rank's collated validation micro-batches (a fixed set) and the forward passes per rank."""
        index_batches, n_forward = eval_index_batches(n_sequences, rank, world, micro_batch)
        batches = [collate([self.validation[i] for i in idx], self.packing) for idx in index_batches]
        return batches, n_forward
