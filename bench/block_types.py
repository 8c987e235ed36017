"""The block types side by side: kernel path vs float64 reference, and training speed and memory of a preset
whose attention blocks are swapped for each new block type.

Parity: each mixer alone (the preset's widths, `--parity-seq` tokens, 2 documents per row) runs on the
kernel path in bf16 and on the reference path in float64 with the same weights; the rows give the relative
error of the output and of the input gradient. Mamba2 (`M`) and attention (`A`) are the yardstick: a new
block type's kernel path is as exact as theirs when its errors are of the same size.

Speed: forward+backward of the whole model (bench/fwd_bwd_throughput.py's measure: bf16, kernel path,
`model.loss`, no optimizer; the optimizer's cost depends on the parameter count alone) at `--batch` x `--seq-len`, for the preset's own pattern and for
the same pattern with every attention block replaced by each other block type (`A` -> `R`, `G`, `H`).
MFU counts each block type's model FLOPs (model/sizing.py; the routed block at its capacity bound).

    python bench/block_types.py --preset small --seq-len 4096 --batch 4
    python bench/block_types.py --smoke          # CPU plumbing check on the tiny preset
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from bench.common import (  # noqa: E402
    add_run_options,
    environment,
    matmul_peak_tflops,
    rel_err,
    write_results,
)
from bench.fwd_bwd_throughput import measure  # noqa: E402
from model import ModelConfig  # noqa: E402
from model.config import ATTENTION, MAMBA  # noqa: E402
from model.documents import positions_from_seq_idx  # noqa: E402
from model.mixers import MixerContext, block_types  # noqa: E402
from model.sizing import count_params  # noqa: E402


def mixer_parity(cfg: ModelConfig, letter: str, seq: int, device: torch.device) -> dict:
    """One mixer of block type `letter`: bf16 kernel path vs float64 reference path on the same weights."""
    from model.documents import DocumentLayout
    from model.layers import RotaryEmbedding

    torch.manual_seed(0)
    ref = block_types()[letter](cfg, 0).to(device=device, dtype=torch.float64)
    fast = block_types()[letter](cfg, 0).to(device=device, dtype=torch.bfloat16)
    fast.load_state_dict(ref.state_dict())
    ref.set_impl("reference")
    fast.set_impl("kernels" if device.type == "cuda" else "reference")
    seq_idx = torch.cat([torch.zeros(seq // 3, dtype=torch.long), torch.ones(seq - seq // 3, dtype=torch.long)])
    seq_idx = seq_idx.expand(2, seq).to(device)
    positions = positions_from_seq_idx(seq_idx)
    rope = RotaryEmbedding(cfg.head_dim, cfg.attention.rope_theta)
    x = torch.randn(2, seq, cfg.d_model, device=device, dtype=torch.float64)
    grad = torch.randn_like(x)
    out = {}
    for name, mixer, dtype in (("ref", ref, torch.float64), ("fast", fast, torch.bfloat16)):
        docs = DocumentLayout.build(seq_idx, device, boundaries=mixer is fast and device.type == "cuda")
        ctx = MixerContext(rope=rope(positions, dtype), positions=positions, docs=docs)
        xi = x.detach().to(dtype).requires_grad_()
        y = mixer(xi, ctx)
        y.backward(grad.to(dtype))
        out[name] = (y.detach(), xi.grad)
    return {"part": "parity", "block": letter, "name": block_types()[letter].name, "seq_len": seq,
            "impl": fast.impl, "err_out": rel_err(out["fast"][0], out["ref"][0]),
            "err_dx": rel_err(out["fast"][1], out["ref"][1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--parity-seq", type=int, default=1024)
    ap.add_argument("--slots", type=int, default=256, help="gated.slots of the G rows (the design's 256-512)")
    add_run_options(ap, iters=10)
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    preset, seq, batch, pseq = ("tiny", 64, 1, 48) if args.smoke else (args.preset, args.seq_len, args.batch,
                                                                        args.parity_seq)
    # smoke: H spans of 16 tokens, so that the 64-token rows complete some and train the slow state
    base = ModelConfig(preset=preset, gated={"slots": 8 if args.smoke else args.slots},
                       hierarchical={"span": 16} if args.smoke else {})
    peak = matmul_peak_tflops(device, n=1024 if args.smoke else 8192)
    meta = environment(device) | {"matmul_peak_tflops": peak, "preset": preset}
    name = (args.name or "block_types") + ("_smoke" if args.smoke else "")
    rows = [mixer_parity(base, letter, pseq, device) for letter in block_types()]
    for letter in block_types():
        if letter == MAMBA:
            continue
        pattern = base.layer_pattern.replace(ATTENTION, letter)  # letter A: the preset's own pattern
        cfg = base.model_copy(update={"pattern": pattern})
        try:
            row = {"part": "speed", "pattern": pattern, "params": count_params(cfg)}
            row |= measure(cfg, batch, seq, False, False, device, 2 if args.smoke else args.iters)
            row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / (peak * 1e12)
        except Exception as exc:  # an OOM or a kernel failure is a row, not the end of the run
            row = {"part": "speed", "pattern": pattern, "impl": f"{type(exc).__name__}: {exc}"[:200]}
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_results(name, rows, meta, ["part", "block", "name", "pattern", "params", "batch", "seq_len", "impl",
                                     "err_out", "err_dx", "tokens_per_s", "mfu", "peak_mem_gb", "routed_fraction",
                                     "step_ms", "first_step_s"],
                  args.out, title=f"Block types: kernel-path parity and training speed ({preset})")


if __name__ == "__main__":
    main()
