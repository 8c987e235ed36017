"""One decode step as a CUDA graph: the host launches a token's kernels once, then replays.

A decode step of the hybrid is a few milliseconds of GPU work behind hundreds of small launches
(projections, conv and state updates, norms, Triton kernels with a Python launcher): at batch 1 its
time is set by the host's launches, not by model size or context (see docs/performance.md). A CUDA
graph records the step once and replays it with one launch. It needs
fixed shapes and no host-side state, which the static cache provides (`HybridCache.make_static`):
the token goes in through a fixed input buffer, the logits come out in a fixed output buffer, and
every state (KV columns, filled count, RoPE positions, conv/SSM states) is updated in place by the
replay itself. This is what mamba_ssm's own generation does for its models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from model.cache import HybridCache
    from model.hybrid import HybridLM


def decode_graph_enabled(setting: bool | str, device: torch.device) -> bool:
    """Whether generation on `device` decodes through a CUDA graph. `setting`: "auto" (every
    entrypoint's default: on for CUDA devices, where it decodes the same greedy tokens many times
    faster, see docs/performance.md), true / false (also as strings). True on another device raises ValueError."""
    text = str(setting).lower()
    if text == "auto":
        return device.type == "cuda"
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"cuda_graph must be auto, true or false, got {setting!r}")
    enabled = text in ("true", "1", "yes")
    if enabled and device.type != "cuda":
        raise ValueError(f"cuda_graph needs a CUDA device, got device {device}")
    return enabled


class GraphedDecodeStep:
    """`HybridLM.step` for one static cache, captured once and replayed per token.

    Capturing runs the step a few times first (CUDA graphs need warmed-up allocations, and Triton
    autotuning cannot run under capture); those runs would advance the cache, so its state is saved
    before and restored after. The returned logits (b, v) live in the graph's output buffer: the next
    call overwrites them.
    """

    def __init__(self, model: "HybridLM", cache: "HybridCache", warmup: int = 2) -> None:
        device = cache.next_pos.device
        if device.type != "cuda":
            raise RuntimeError("CUDA-graph decoding needs a CUDA device; decode with model.step on this one")
        if cache.filled is None:
            raise ValueError("capture needs a static cache: call cache.make_static(capacity) after the prefill")
        self.token = torch.zeros(cache.next_pos.size(0), dtype=torch.long, device=device)
        saved, seen = cache.state_tensors(), cache.seen
        backup = [t.clone() for t in saved]
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(warmup):
                model.step(self.token, cache)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = model.step(self.token, cache)
        with torch.inference_mode():
            for t, b in zip(saved, backup):
                t.copy_(b)
        cache.seen = seen

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """token: (b,) long -> logits (b, v) of the next position; the cache advances by one."""
        self.token.copy_(token)
        self.graph.replay()
        return self.logits

