"""Context parallelism's training wiring (train/context_parallel.py): where each rank sits, which samples its
replica takes, and its slice of every collated sequence. The numerics are tests/model/test_context_parallel.py;
a launched 2-process run is in tests/train/test_pretrain.py."""

from __future__ import annotations

import pytest
import torch

from config.loader import ConfigError
from model.documents import positions_from_seq_idx
from train.context_parallel import context_layout, slice_batch
from train.data import RankBatches, collate


def _windows(lengths: list[list[int]]) -> list[dict]:
    """Windows of l + 1 tokens holding documents of the given lengths (positions restart at each)."""
    out = []
    for i, docs in enumerate(lengths):
        positions = torch.cat([torch.arange(n) for n in docs])
        out.append({"tokens": torch.arange(positions.numel()) + 100 * i, "positions": positions, "source": i,
                    "index": 10 + i})
    return out


def test_layout_groups_consecutive_ranks_and_refuses_an_uneven_world() -> None:
    places = [context_layout(r, 8, 4) for r in range(8)]
    assert [(p.replica, p.rank) for p in places] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert {p.replicas for p in places} == {2}
    with pytest.raises(ConfigError, match="train.context_parallel .3. must divide the number of processes .8."):
        context_layout(0, 8, 3)


def test_replicas_take_the_step_as_that_many_ranks_and_slices_rebuild_the_batch() -> None:
    """4 ranks, context_parallel 2: the 2 replicas split each step's samples as 2 data-parallel ranks would,
    and the 2 slices of each collated micro-batch, side by side, are the whole batch: seq_idx and positions
    of the whole rows (a document crossing the slice boundary keeps its number and counts on)."""
    replicas = [RankBatches(0, 1, 8, context_layout(r, 4, 2).replica, 2, 2) for r in range(4)]
    assert [list(s) for s in replicas[:2]] == [[[0, 2], [4, 6]]] * 2  # ranks 0, 1: replica 0
    assert list(replicas[2]) == [[1, 3], [5, 7]]
    batch = collate(_windows([[3, 10, 4], [17]]), "document")  # l = 16
    slices = [slice_batch(batch, r, 2) for r in range(2)]
    for key in ("input_ids", "labels", "position_ids", "seq_idx"):
        assert torch.equal(torch.cat([s[key] for s in slices], dim=1), batch[key]), key
        assert all(s[key].shape == (2, 8) for s in slices)
    assert slices[1]["seq_idx"][0].tolist() == [1, 1, 1, 1, 1, 2, 2, 2]  # document 1 runs on from slice 0
    assert slices[1]["position_ids"][0].tolist() == [5, 6, 7, 8, 9, 0, 1, 2]
    assert torch.equal(slices[1]["position_ids"], positions_from_seq_idx(batch["seq_idx"])[:, 8:])
    assert all(torch.equal(s["source"], batch["source"]) and torch.equal(s["index"], batch["index"]) for s in slices)
    plain = collate(_windows([[17]]), "continuous")
    assert set(slice_batch(plain, 1, 2)) == set(plain) and slice_batch(plain, 1, 2)["input_ids"].shape == (1, 8)
