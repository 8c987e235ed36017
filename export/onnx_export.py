"""ONNX graphs of the reference path: prefill (tokens -> logits + cache) and one decode step.

Exporter: torch.onnx's dynamo exporter (`torch.export` + onnxscript, torch 2.13). It exports the
SSD scan's einsums, cumsum and masked segsum as ordinary ONNX ops, functionalizes the in-place
state writes, keeps batch and sequence symbolic, and refuses (instead of silently baking in) any
Python branch on a symbolic size. The legacy TorchScript exporter fails here (`aten::copy`, the
state writes, is unsupported at opset 20) and would record such branches for the example length
only (e.g. the chunk padding in `model.ssd.ssd_chunked`).

Any prompt length: `ssd_chunked` pads the sequence to whole chunks behind an `if pad:` branch.
Declaring the traced sequence axis as `chunk_size * n` lets torch.export prove `pad == 0` for every
length, so one graph serves all lengths (a symbolic `ceil(l / q)` inside the graph does not export:
torch.export cannot prove the guards it raises). `pad_inside` then edits the saved prefill graph: new
`input_ids` / `attention_mask` inputs of any length l are left-padded in ONNX (Shape, Mod, Pad) to the
next multiple (at least `min_prompt`), and the attention `present.*` outputs are sliced back to the l
given positions, so plain onnxruntime takes any prompt. The model treats left padding as a separate
document (no state, conv tap or attention crosses into the prompt, RoPE starts at the first real
token), so the padding changes nothing but rounding.

Torch range: tests/export/test_onnx.py passes with torch 2.11 and 2.13. opt_einsum, where installed, makes
`torch.einsum` pick its contraction order from the example's sizes, which fixes batch and length in the
trace: the export turns it off. `check_symbolic` still refuses any saved graph with a fixed axis, with one
line at export instead of leaving it to fail in a user's onnxruntime. The export traces a CPU copy of the
model: the graphs are device-free and run in onnxruntime.

Cache as flat tensors (the model's HybridCache preallocates KV capacity, which does not export):
per Mamba2 layer i  `past.i.conv` (b, conv_dim, d_conv), `past.i.ssm` (b, heads, headdim, d_state)
(float32); per attention layer i `past.i.key`, `past.i.value` (b, kv_heads, t, head_dim) with t
dynamic. Outputs are named `present.*` the same way; `attention_mask` (b, t + 1) marks real tokens
(0 = left padding) over everything cached plus the new token. The wrappers drive the unchanged
model code with `ConcatKV`, a KV state that grows by concatenation.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from config.atomic import atomic_write_json
from export import ExportError
from model.cache import HybridCache, MambaState
from model.config import MAMBA, ModelConfig
from model.hybrid import HybridLM
from model.mixers import block_type

log = logging.getLogger(__name__)

PREFILL_FILE, DECODE_FILE, ONNX_CONFIG = "prefill.onnx", "decode.onnx", "onnx_config.json"


class ConcatKV:
    """A KV state for export: `append` concatenates to the past (b, kv, t, head_dim) tensors."""

    def __init__(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> None:
        self.k, self.v = k, v

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.size(2)

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is not None:
            k_new, v_new = torch.cat([self.k, k_new], dim=2), torch.cat([self.v, v_new], dim=2)
        self.k, self.v = k_new, v_new
        return k_new, v_new


def state_names(cfg: ModelConfig, prefix: str) -> list[str]:
    """Flat cache tensor names in graph order, e.g. past.0.conv, past.0.ssm, past.1.key, ..."""
    names = []
    for i, kind in enumerate(cfg.layer_pattern):
        parts = ("conv", "ssm") if kind == MAMBA else ("key", "value")
        names += [f"{prefix}.{i}.{p}" for p in parts]
    return names


def _flat(cache: HybridCache) -> list[torch.Tensor]:
    out = []
    for st in cache.layers:
        out += [st.conv, st.ssm] if isinstance(st, MambaState) else [st.k, st.v]
    return out


class _Graph(nn.Module):
    def __init__(self, model: HybridLM) -> None:
        super().__init__()
        self.model = model

    def _last_logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM head on the last position only (HybridLM.forward would project every position)."""
        return self.model.logits(h[:, -1])


class PrefillGraph(_Graph):
    """(input_ids (b, l), attention_mask (b, l)) -> (logits (b, v), *present)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = input_ids.size(0)
        seq_idx = attention_mask.long()  # 0 = padding document, 1 = prompt (as HybridLM.prefill)
        position_ids = (seq_idx.cumsum(1) - 1).clamp(min=0)
        layers = [
            layer.mixer.empty_state(b, input_ids.device, self.model.embed.weight.dtype) if layer.kind == MAMBA
            else ConcatKV()
            for layer in self.model.layers
        ]
        cache = HybridCache(layers=layers, next_pos=position_ids[:, -1], key_valid=attention_mask.bool())
        h = self.model.hidden_states(input_ids, position_ids, seq_idx, cache)
        return (self._last_logits(h), *_flat(cache))


class DecodeGraph(_Graph):
    """(input_ids (b, 1), attention_mask (b, t + 1), *past) -> (logits (b, v), *present)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        position_ids = attention_mask[:, :-1].long().sum(1, keepdim=True)  # real tokens so far
        layers: list = []
        for i, layer in enumerate(self.model.layers):
            a, b = past[2 * i], past[2 * i + 1]
            # Mamba2 steps update their state in place: work on copies, never on graph inputs.
            layers.append(MambaState(a.clone(), b.clone(), filled=True) if layer.kind == MAMBA else ConcatKV(a, b))
        cache = HybridCache(layers=layers, next_pos=position_ids[:, 0], key_valid=attention_mask.bool())
        h = self.model.hidden_states(input_ids, position_ids, None, cache)
        return (self._last_logits(h), *_flat(cache))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs every optimisation pass at INFO and warns about merged axis names."""
    logger = logging.getLogger("onnx_ir")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def check_symbolic(path: Path, axes: dict[str, tuple[int, ...]]) -> None:
    """ExportError unless every named graph input keeps the given axes symbolic (dim_param). torch.onnx's
    capture may relax a declared dynamic axis to a fixed size instead of failing (it did for the prefill's
    batch and length under opt_einsum); such a graph would reject every other size in onnxruntime."""
    import onnx

    dims = {i.name: i.type.tensor_type.shape.dim for i in onnx.load(str(path), load_external_data=False).graph.input}
    fixed = [f"{name}[{d}]={dims[name][d].dim_value}" for name, want in axes.items() for d in want
             if not dims[name][d].dim_param]
    if fixed:
        raise ExportError(f"torch {torch.__version__} exported {path.name} with fixed sizes where batch and length must "
                          f"be symbolic ({', '.join(fixed[:4])}): export with torch 2.13 on the CPU, or leave onnx out "
                          "of export.formats")


def _min_chunks(cfg: ModelConfig) -> int:
    """Shortest prompt (in chunks) the graph accepts: the conv state needs >= d_conv tokens."""
    return -(-cfg.mamba.d_conv // cfg.mamba.chunk_size)


def export_onnx(model: HybridLM, out_dir: str | Path, opset: int | None = None) -> dict:
    """Write prefill.onnx, decode.onnx and onnx_config.json; returns the config written."""
    from torch.export import Dim

    cfg = model.cfg
    for letter in dict.fromkeys(cfg.layer_pattern):
        if not block_type(letter).onnx:
            raise ExportError(f"cannot export block type {letter} ({block_type(letter).name}) to ONNX: its prefill "
                              "and decode graphs are not traced yet; keep the consolidated checkpoint")
    if cfg.extensions():
        raise ExportError(f"cannot export {' and '.join(cfg.extensions())} to ONNX: its graphs are not traced and checked in onnxruntime "
                          "yet; keep the consolidated checkpoint")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model.embed.weight.device.type != "cpu":
        model = copy.deepcopy(model).cpu()  # the graphs are device-free; onnxruntime runs them on the CPU
    previous_impl = model.impl
    model = model.eval()
    model.set_impl("reference")  # the kernel path's Triton/CUDA ops do not export
    q = cfg.mamba.chunk_size
    batch, chunks, past = Dim("batch", min=1), Dim("chunks", min=_min_chunks(cfg)), Dim("past", min=1)
    seq = q * chunks
    example_len = q * max(2, _min_chunks(cfg))
    ids = torch.full((2, example_len), 5, dtype=torch.long, device=model.embed.weight.device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # exercise the padded path in the example
    prefill, decode = PrefillGraph(model).eval(), DecodeGraph(model).eval()
    present_names = state_names(cfg, "present")
    past_names = state_names(cfg, "past")
    kinds = [kind for kind in cfg.layer_pattern for _ in range(2)]
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5 * 2**30  # protobuf's 2 GiB cap
    # opt_einsum (when installed) picks a contraction path from the example's concrete sizes, which makes
    # torch.export specialize batch and length to them; torch's own left-to-right order keeps them symbolic.
    with torch.no_grad(), _quiet_exporter(), torch.backends.opt_einsum.flags(enabled=False):
        program = torch.onnx.export(
            prefill, (ids, mask), dynamo=True, opset_version=opset, external_data=big, verbose=False,
            input_names=["input_ids", "attention_mask"], output_names=["logits", *present_names],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
        )
        program.save(str(out / PREFILL_FILE), external_data=big)
        check_symbolic(out / PREFILL_FILE, {"input_ids": (0, 1), "attention_mask": (0, 1)})
        attention = [name for name, kind in zip(present_names, kinds, strict=True) if kind != MAMBA]
        pad_inside(out / PREFILL_FILE, q, q * _min_chunks(cfg), attention, big)
        states = prefill(ids, mask)[1:]
        token = torch.full((2, 1), 5, dtype=torch.long, device=ids.device)
        step_mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        program = torch.onnx.export(
            decode, (token, step_mask, *states), dynamo=True, opset_version=opset, external_data=big, verbose=False,
            input_names=["input_ids", "attention_mask", *past_names], output_names=["logits", *present_names],
            dynamic_shapes={
                "input_ids": {0: batch},
                "attention_mask": {0: batch, 1: past + 1},
                "past": tuple({0: batch} if kind == MAMBA else {0: batch, 2: past} for kind in kinds),
            },
        )
        program.save(str(out / DECODE_FILE), external_data=big)
        check_symbolic(out / DECODE_FILE, {"input_ids": (0,), "attention_mask": (0, 1),
                                           **{name: (0,) if kind == MAMBA else (0, 2)
                                              for name, kind in zip(past_names, kinds, strict=True)}})
    model.set_impl(previous_impl)
    info = {
        "prefill": PREFILL_FILE,
        "decode": DECODE_FILE,
        "prompt_len": "any (>= 1): the prefill graph pads to whole SSD chunks itself",
        "vocab_size": cfg.vocab_size,
        "layer_pattern": cfg.layer_pattern,
        "past": past_names,
        "present": present_names,
        "dtype": str(model.embed.weight.dtype).removeprefix("torch."),
        "exporter": f"torch.onnx dynamo (torch {torch.__version__})",
    }
    atomic_write_json(out / ONNX_CONFIG, info)
    return info


def pad_inside(path: Path, multiple: int, min_len: int, attention_outputs: list[str], external: bool) -> None:
    """Edit a saved prefill graph so it takes prompts of any length l (see the module docstring):
    input_ids / attention_mask are left-padded with 0 to max(ceil(l / multiple) * multiple, min_len)
    before the traced graph, and `attention_outputs` (b, kv, t, d) lose the padded positions after it."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))  # with its external data, if any
    graph = model.graph
    renamed = {"input_ids": "input_ids.padded", "attention_mask": "attention_mask.padded"}
    renamed.update({name: f"{name}.padded" for name in attention_outputs})
    for node in graph.node:
        node.input[:] = [renamed.get(x, x) for x in node.input]
        node.output[:] = [renamed.get(x, x) if x in attention_outputs else x for x in node.output]
    constants = {"pad.q": multiple, "pad.min": min_len, "pad.zero": [0], "pad.axis": [1], "pad.kv_axis": [2],
                 "pad.end": [2**62], "pad.value": 0}
    graph.initializer.extend(numpy_helper.from_array(np.array(v, dtype=np.int64), k) for k, v in constants.items())
    front = [
        helper.make_node("Shape", ["input_ids"], ["pad.shape"]),
        helper.make_node("Gather", ["pad.shape", "pad.axis"], ["pad.len"]),  # l, shape (1,)
        helper.make_node("Sub", ["pad.q", "pad.len"], ["pad.neg"]),
        helper.make_node("Mod", ["pad.neg", "pad.q"], ["pad.to_whole"]),  # (q - l) mod q (floored: >= 0)
        helper.make_node("Add", ["pad.len", "pad.to_whole"], ["pad.whole"]),
        helper.make_node("Max", ["pad.whole", "pad.min"], ["pad.width"]),
        helper.make_node("Sub", ["pad.width", "pad.len"], ["pad.n"]),  # tokens of left padding
        helper.make_node("Concat", ["pad.zero", "pad.n", "pad.zero", "pad.zero"], ["pad.pads"], axis=0),
        helper.make_node("Pad", ["input_ids", "pad.pads", "pad.value"], ["input_ids.padded"], mode="constant"),
        helper.make_node("Pad", ["attention_mask", "pad.pads", "pad.value"], ["attention_mask.padded"],
                         mode="constant"),
    ]
    back = [helper.make_node("Slice", [f"{name}.padded", "pad.n", "pad.end", "pad.kv_axis"], [name])
            for name in attention_outputs]
    nodes = front + list(graph.node) + back
    graph.ClearField("node")
    graph.node.extend(nodes)
    for value in list(graph.input) + [o for o in graph.output if o.name in attention_outputs]:
        axis = 2 if value.name in attention_outputs else 1
        if value.name in ("input_ids", "attention_mask") or value.name in attention_outputs:
            value.type.tensor_type.shape.dim[axis].dim_param = "prompt_len"
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data")
    else:
        onnx.save_model(model, str(path))
