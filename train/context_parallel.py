"""Context parallelism in training (train.context_parallel = C > 1): rank groups, DeepSpeed's view, data slices.

Ranks: the world of W ranks is W / C data-parallel replicas of C consecutive ranks each (DeepSpeed's
sequence-parallel layout, deepspeed/runtime/sequence_parallel/parallel_state_sp.py): rank k is replica
k // C and holds slice k % C of every sequence of that replica's micro-batches.

Data: the replicas take the step's samples as W / C ranks would (train/data.py `RankBatches` with the
replica's index and count), and every rank of a replica keeps its slice of the collated (b, l) tensors
(`slice_batch`). `seq_idx` and `position_ids` are cut from the whole rows', so they stay global.

Gradients: DeepSpeed is handed that module as its `mpu`: it then reduces gradients and partitions ZeRO
state over all W ranks and divides by W / C, i.e. sums over the C slices of a sequence and averages over the
replicas (engine `_reduce_non_expert_gradients`, ZeRO's `average_tensor`: world / sequence_parallel_size).
The trainer scales each micro-batch's summed NLL by (W / C) x accumulation / (targets of the whole step),
so the update follows the mean NLL over all the step's targets, as without context parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from config.loader import ConfigError
from model.context_parallel import ContextParallel

SLICED = ("input_ids", "labels", "position_ids", "seq_idx")  # (b, l) per token; "source", "index" are per row


@dataclass(frozen=True)
class ContextLayout:
    """Where this rank sits: slice `rank` of `size` in replica `replica` of `replicas`."""

    size: int
    rank: int
    replica: int
    replicas: int


def context_layout(rank: int, world_size: int, size: int) -> ContextLayout:
    """This rank's place for train.context_parallel = size (ConfigError unless size divides the world)."""
    if world_size % size:
        raise ConfigError(f"train.context_parallel ({size}) must divide the number of processes ({world_size}): "
                          "change train.context_parallel or the launcher's process count")
    return ContextLayout(size=size, rank=rank % size, replica=rank // size, replicas=world_size // size)


def init_groups(layout: ContextLayout) -> tuple[ContextParallel, Any]:
    """The process groups (after the default group exists): the model's `ContextParallel` and DeepSpeed's
    `mpu` (its sequence-parallel state module, groups of consecutive ranks as `context_layout` places them)."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    mpu.initialize_sequence_parallel(layout.size)
    if mpu.get_sequence_parallel_rank() != layout.rank:
        raise RuntimeError("DeepSpeed's sequence-parallel groups are not groups of consecutive ranks")
    return ContextParallel(mpu.get_sequence_parallel_group(), layout.rank, layout.size), mpu


def slice_batch(batch: dict[str, torch.Tensor], rank: int, size: int) -> dict[str, torch.Tensor]:
    """This rank's slice of a collated batch: the per-token (b, l) tensors cut to tokens
    [rank l / size, (rank + 1) l / size); per-row entries as they are."""
    out = dict(batch)
    for key in SLICED:
        if key in batch:
            n = batch[key].size(1) // size
            out[key] = batch[key][:, rank * n : (rank + 1) * n]
    return out
