"""DeepSpeed's gradient all-reduce at the accumulation boundary, skipped where a rank has no one to reduce with.

With bf16 and ZeRO-1 (DeepSpeed's BF16_Optimizer), `engine.backward` ends every accumulation boundary with
`allreduce_gradients`: the float32 gradient buffers of each parameter group are flattened and cast to the
communication dtype (bf16) before the all-reduce, a transient copy of 2 bytes per parameter at the moment
memory is fullest (CUDA graphs' pools, all gradients); on a group of one rank the all-reduce returns its
input, so the pass only rounds the float32 sums to bf16 and copies them back. A one-GPU run that ran out of
memory in that cast: docs/planner.md. Alone in the reduction group, the engine is told not to reduce
(`enable_backward_allreduce`, DeepSpeed's own switch for callers that reduce themselves): the optimizer
then steps on the float32 sums themselves, what the bf16 rounding approximated
(tests/train/test_grad_fold.py). With more ranks the bf16 all-reduce stays: it halves the traffic.

Only BF16_Optimizer: ZeRO-2/3 (and fp32 ZeRO-1) move gradients into their partitions inside the same
call, which a single rank still needs.
"""

from __future__ import annotations

from typing import Any


def reduction_group_size(engine: Any) -> int:
    """Ranks the engine all-reduces gradients over: data-parallel x sequence-parallel (context parallelism)."""
    import deepspeed.comm as dist
    from deepspeed.utils import groups

    return dist.get_world_size(groups._get_sequence_data_parallel_group())


def skip_lone_reduction(engine: Any) -> bool:
    """Turn off the engine's boundary all-reduce when it is BF16_Optimizer's and the reduction group has
    one rank. Returns whether it did."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    if not isinstance(engine.optimizer, BF16_Optimizer) or engine.has_moe_layers or reduction_group_size(engine) != 1:
        return False
    engine.enable_backward_allreduce = False
    return True
