"""The data path in-process: windows and document boundaries against the raw shards, the rank split,
blending, packing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from config.manifest import load_manifest
from train.data import IGNORE_INDEX, Blend, RankBatches, TrainData, collate, eval_index_batches
from train.errors import TrainingError

SEQ = 64


@pytest.fixture(scope="module")
def data(corpus: Path) -> TrainData:
    return TrainData(load_manifest(corpus), SEQ, "document")


def raw_windows(manifest_path: Path, source: str) -> list[tuple[np.ndarray, set[int]]]:
    """Independent reading of a source's shards: windows of SEQ+1 tokens in datatrove's order (files
    sorted by name, each file's tail dropped) with the in-window offsets where a document starts."""
    doc = json.loads(manifest_path.read_text())
    entry = next(s for s in doc["splits"]["train"]["sources"] if s["name"] == source)
    out = []
    for shard in sorted(entry["shards"], key=lambda s: Path(s["path"]).name):
        tokens = np.fromfile(manifest_path.parent / shard["path"], dtype="<u2")
        ends = set(np.fromfile(manifest_path.parent / shard["index"], dtype="<u8").tolist())
        assert len(ends) == shard["documents"] and max(ends) == shard["tokens"]
        for w in range(len(tokens) // (SEQ + 1)):
            lo = w * (SEQ + 1)
            starts = {0} | {t for t in range(SEQ + 1) if lo + t in ends}
            out.append((tokens[lo : lo + SEQ + 1].astype(np.int64), starts))
    return out


def test_boundaries_match_the_shards(data: TrainData, corpus: Path) -> None:
    names = data.train.source_names
    expected = {name: raw_windows(corpus, name) for name in names}
    assert [s.n_windows for s in data.train.sources] == [len(expected[n]) for n in names]
    multi_doc = split_doc = 0
    for i in range(0, 400, 3):
        s, k = data.train.blend.locate(i)
        tokens, starts = expected[names[s]][k]
        batch = collate([data.train[i]], "document")
        assert torch.equal(batch["input_ids"][0], torch.from_numpy(tokens[:-1]))
        start_mask = torch.tensor([t in starts for t in range(SEQ + 1)])
        assert torch.equal(batch["seq_idx"][0], start_mask[:-1].long().cumsum(0) - 1)
        labels = torch.from_numpy(tokens[1:]).masked_fill(start_mask[1:], IGNORE_INDEX)
        assert torch.equal(batch["labels"][0], labels)
        pos = torch.arange(SEQ + 1) - torch.cummax(torch.where(start_mask, torch.arange(SEQ + 1), 0), 0).values
        assert torch.equal(batch["position_ids"][0], pos[:-1])
        multi_doc += int(batch["seq_idx"][0, -1] > 0)
        split_doc += int(1 not in starts and tokens[0] != 2)
    assert multi_doc > 10 and split_doc > 10  # short documents packed together, long ones split


def test_document_lengths_from_consecutive_windows(data: TrainData, corpus: Path) -> None:
    """Document starts seen by the loader over a whole shard reproduce the index's document lengths."""
    doc = json.loads(corpus.read_text())
    entry = doc["splits"]["train"]["sources"][0]
    shard = sorted(entry["shards"], key=lambda s: Path(s["path"]).name)[0]
    ends = np.fromfile(corpus.parent / shard["index"], dtype="<u8")
    src = data.train.sources[0]
    n_windows = shard["tokens"] // (SEQ + 1)
    seen = []
    for w in range(n_windows):
        _, positions = src[w]
        seen += [w * (SEQ + 1) + t for t in torch.nonzero(positions == 0).flatten().tolist() if t > 0]
    covered = n_windows * (SEQ + 1)
    interior = [e for e in ends.tolist() if e < covered and e % (SEQ + 1)]
    assert seen == interior
    lengths = np.diff([0, *ends.tolist()])
    assert lengths.min() >= 1 and lengths.sum() == shard["tokens"]


def test_continuous_packing_masks_nothing(data: TrainData) -> None:
    batch = collate([data.train[i] for i in range(4)], "continuous")
    assert set(batch) == {"input_ids", "labels", "source", "index"}
    tokens = torch.stack([data.train[i]["tokens"] for i in range(4)])
    assert torch.equal(batch["labels"], tokens[:, 1:]) and not (batch["labels"] == IGNORE_INDEX).any()


def test_ranks_take_disjoint_parts_of_the_world_size_independent_order() -> None:
    per_step, steps, first = 16, 5, 48
    one = list(RankBatches(first, steps, per_step, rank=0, world=1, micro_batch=4))
    two = [list(RankBatches(first, steps, per_step, rank=r, world=2, micro_batch=2)) for r in range(2)]
    assert len(one) == steps * 4 and all(len(b) == 4 for b in one)
    for t in range(steps):
        step_ids = set(range(first + t * per_step, first + (t + 1) * per_step))
        mine = [{i for b in two[r][t * 4 : (t + 1) * 4] for i in b} for r in range(2)]
        assert not mine[0] & mine[1] and mine[0] | mine[1] == step_ids
        assert {i for b in one[t * 4 : (t + 1) * 4] for i in b} == step_ids
        assert all(i % 2 == r for r in range(2) for i in mine[r] - {first})  # rank r takes j = r, r+W, ...


def test_eval_batches_are_the_same_count_on_every_rank() -> None:
    parts = [eval_index_batches(10, r, 4, 2) for r in range(4)]
    assert sorted(i for batches, _ in parts for b in batches for i in b) == list(range(10))
    assert {n for _, n in parts} == {2}


def test_blend_follows_the_weights_and_is_prefix_stable() -> None:
    blend = Blend([0.6, 0.3, 0.1], ["a", "b", "c"])
    assert blend.counts.tolist() == [39322, 19661, 6553]  # largest remainder of 0.6/0.3/0.1 x 2^16
    seq = [blend.locate(i) for i in range(3000)]
    for s, w in enumerate([0.6, 0.3, 0.1]):
        ks = [k for src, k in seq if src == s]
        assert ks == list(range(len(ks)))  # the k-th sample of a source comes k-th
        for n in (10, 100, 1000, 3000):
            assert abs(sum(src == s for src, _ in seq[:n]) - w * n) <= 1.5
            assert blend.count(s, n) == sum(src == s for src, _ in seq[:n])
    period = Blend.PERIOD
    assert blend.locate(2 * period + 5) == (seq[5][0], 2 * blend.counts[seq[5][0]] + seq[5][1])


def test_weights_override_reblends_and_names_unknown_sources(corpus: Path) -> None:
    manifest = load_manifest(corpus)
    names = [s.name for s in manifest.splits["train"].sources]
    only_first = TrainData(manifest, SEQ, "document", weights={names[1]: 0.0})
    assert only_first.train.source_names == [names[0]]
    assert only_first.validation.source_names == [names[0]]
    with pytest.raises(TrainingError, match="data.weights names \\['nope'\\]"):
        TrainData(manifest, SEQ, "document", weights={"nope": 1.0})
    with pytest.raises(TrainingError, match="every train source at weight 0"):
        TrainData(manifest, SEQ, "document", weights={n: 0.0 for n in names})


def test_loader_workers_survive_the_preemption_signal(data: TrainData) -> None:
    """SIGTERM reaches every process of a preempted job; the workers must outlive it so that the
    main process can write its checkpoint (and go on reading batches until it does)."""
    import os
    import signal

    loader = TrainData(data.manifest, SEQ, "document", num_workers=1).train_loader(0, 4, 2, 0, 1, 2)
    batches = iter(loader)
    next(batches)
    for worker in batches._workers:
        os.kill(worker.pid, signal.SIGTERM)
    for _ in range(3):  # a worker killed by the signal makes this raise
        assert next(batches)["input_ids"].shape == (2, SEQ)


@pytest.mark.parametrize("damage, expected", [("token_out_of_vocab", "token id 600, outside the vocabulary of 512"),
                                              ("index_shifted", "document offsets (000_stdlib_a.ds.index)")])
def test_same_size_shard_damage_is_found_at_first_read(damage: str, expected: str, corpus: Path,
                                                       tmp_path: Path) -> None:
    """Damage that keeps the file sizes (data.verify=size passes) stops the first read of that shard."""
    import shutil

    from config.manifest import ManifestError

    copy = tmp_path / "corpus"
    shutil.copytree(corpus.parent, copy)
    shard = next((copy / "tokens" / "train" / "stdlib_a").glob("000_*.ds"))
    if damage == "token_out_of_vocab":
        tokens = np.fromfile(shard, dtype="<u2")
        tokens[10] = 600
        tokens.tofile(shard)
    else:
        ends = np.fromfile(f"{shard}.index", dtype="<u8")
        (ends + 3).tofile(f"{shard}.index")
    manifest = load_manifest(copy / "manifest.json")
    manifest.verify(checksums=False)
    source = TrainData(manifest, SEQ, "document").train.sources[0]
    with pytest.raises(ManifestError, match=f"corrupt shard .*000_stdlib_a.ds: .*{re.escape(expected)}"):
        source[0]
    source_b = TrainData(manifest, SEQ, "document").train.sources[1]
    source_b[0]  # the intact source reads as before
