"""Are the ONNX export's batch and length axes dynamic on this torch? (The GPU test run found torch 2.11's
graphs with a fixed batch: onnxruntime refused batch 1 and 3 after an export traced at batch 2.)

Exports a tiny model (export/onnx_export.py), lists every graph input's dimensions as written (a symbolic name,
or a fixed size), and runs torch.export on the prefill graph with the same dynamic shapes, so that the guard
which fixes an axis, if any, is reported with its message.

    python experiments/kernels/onnx_axes.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repo's packages first

from bench.common import environment, write_results  # noqa: E402
from model import HybridLM, ModelConfig  # noqa: E402


def graph_dims(path: Path) -> list[dict]:
    import onnx

    rows = []
    for i in onnx.load(str(path), load_external_data=False).graph.input:
        dims = [d.dim_param or str(d.dim_value) for d in i.type.tensor_type.shape.dim]
        rows.append({"part": "graph input", "graph": path.name, "input": i.name, "dims": " x ".join(dims)})
    return rows


def export_guard(model: HybridLM) -> dict:
    """torch.export of the prefill graph with the exporter's dynamic shapes: 'ok' or the error's message."""
    from torch.export import Dim

    from export.onnx_export import PrefillGraph, _min_chunks

    q = model.cfg.mamba.chunk_size
    batch, chunks = Dim("batch", min=1), Dim("chunks", min=_min_chunks(model.cfg))
    ids = torch.full((2, q * max(2, _min_chunks(model.cfg))), 5, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    shapes = {"input_ids": {0: batch, 1: q * chunks}, "attention_mask": {0: batch, 1: q * chunks}}
    try:
        with torch.no_grad():
            program = torch.export.export(PrefillGraph(model).eval(), (ids, mask), dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # the guard that fixes an axis is the answer
        return {"part": "torch.export", "input": "prefill", "dims": f"{type(exc).__name__}: {exc}"[:3000]}
    return {"part": "torch.export", "input": "prefill", "dims": f"ok; range constraints {program.range_constraints}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--name", default="onnx_axes")
    args = ap.parse_args()
    from export.onnx_export import export_onnx

    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", vocab_size=512, d_model=64, n_layers=4, pattern="MAMA", ffn_hidden=128,
                      attention={"n_heads": 4, "n_kv_heads": 2}, mamba={"d_state": 16, "headdim": 16, "chunk_size": 16})
    model = HybridLM(cfg).eval()
    rows = [export_guard(model)]
    print(rows[0], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            export_onnx(model, tmp)
        except Exception as exc:  # export's own check refusing a fixed axis is an answer too
            rows.append({"part": "export_onnx", "dims": f"{type(exc).__name__}: {exc}"[:3000]})
        else:
            for name in ("prefill.onnx", "decode.onnx"):
                rows += graph_dims(Path(tmp) / name)
    for row in rows[1:]:
        print(row, flush=True)
    meta = environment(torch.device("cpu")) | {"torch": torch.__version__}
    write_results(args.name, rows, meta, ["part", "graph", "input", "dims"], args.out,
                  title=f"ONNX export axes under torch {torch.__version__}")


if __name__ == "__main__":
    main()
