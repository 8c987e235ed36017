"""Run the exported prefill/decode graphs in onnxruntime, including a greedy loop with no torch.

`OnnxLM` mirrors `HybridLM.prefill` / `HybridLM.step` over numpy arrays: a batch of prompts is
left-padded to its longest (the prefill graph pads to whole SSD chunks itself, see
`export.onnx_export.pad_inside`), the cache travels as the flat `past.*` / `present.*` tensors and
the attention mask grows by one column per step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from export import ExportError
from export.onnx_export import ONNX_CONFIG


class OnnxLM:
    """onnxruntime sessions over an ONNX export folder."""

    def __init__(self, folder: str | Path, providers: Sequence[str] | None = None) -> None:
        import onnxruntime as ort

        folder = Path(folder)
        cfg_path = folder / ONNX_CONFIG
        if not cfg_path.is_file():
            raise ExportError(f"{folder} is not an ONNX export (no {ONNX_CONFIG}); run launch/export.py --format onnx")
        self.info = json.loads(cfg_path.read_text())
        providers = list(providers or ["CPUExecutionProvider"])
        self.prefill_session = ort.InferenceSession(str(folder / self.info["prefill"]), providers=providers)
        self.decode_session = ort.InferenceSession(str(folder / self.info["decode"]), providers=providers)

    def padded_batch(self, prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Left-pad to the longest prompt: (ids, mask) int64 (b, l)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ExportError("every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = p
            mask[row, width - len(p):] = 1
        return ids, mask

    def prefill(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Last-position logits (b, v) float32 and the present cache tensors."""
        out = self.prefill_session.run(None, {"input_ids": ids, "attention_mask": mask})
        return out[0], out[1:]

    def step(self, token: np.ndarray, mask: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """token: (b,) int64; mask: (b, t + 1) including the new token. -> logits (b, v), new cache."""
        feeds = {"input_ids": token.reshape(-1, 1).astype(np.int64), "attention_mask": mask}
        feeds.update(zip(self.info["past"], states))
        out = self.decode_session.run(None, feeds)
        return out[0], out[1:]

    def greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int | None = None,
               pad_id: int = 0) -> list[list[int]]:
        """Greedy continuations (new tokens per row, stopping at eos, not included)."""
        ids, mask = self.padded_batch(prompts, pad_id)
        logits, states = self.prefill(ids, mask)
        out: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(len(prompts), dtype=bool)
        for i in range(max_new_tokens):
            token = logits.argmax(-1).astype(np.int64)
            for row in np.flatnonzero(~done):
                if eos_id is not None and token[row] == eos_id:
                    done[row] = True
                else:
                    out[row].append(int(token[row]))
            if done.all() or i == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
            logits, states = self.step(token, mask, states)
        return out
