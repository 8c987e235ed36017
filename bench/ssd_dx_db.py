"""The SSD backward's x, dt, D and B gradients: model/ssd_dx_db.py's one kernel against mamba_ssm's two
(`_chunk_scan_chunk_state_bwd_dx` + `_chunk_state_bwd_db`, what it replaces).

Inputs at the preset's Mamba2 widths for one sequence of each length in 4 documents (bench/ssd_cb_grad.inputs:
x, dout, B bf16, dt and its chunk sums from mamba_ssm's `_chunk_cumsum_fwd`, C.B float32), plus the states'
gradients dS (bf16, as the state passing hands them over) and D. Rows per length: GPU time of each path
(bench/block_costs.time_part: CUDA-graph replay, the sums after the kernels included), ours at each config of
`--tiles` (BLOCK_MxBLOCK_KxHEADSxWARPSxSTAGES), and each path's largest relative error over dx, ddt, dD, dB
and the decay gradient against float64 from the definition (`x_and_b_grads_float64`), and the decay
gradient's own.

    python bench/ssd_dx_db.py --preset 1.3b --seq-lens 8192,16384 --tiles 64x32x8x4x2,64x64x8x4x2,32x32x4x4x2
    python bench/ssd_dx_db.py --smoke     # CPU, under Triton's interpreter only (the kernels are Triton):
                                          # tests/model/test_kernels_interpreted.py runs it
"""

from __future__ import annotations

import argparse
import contextlib
from unittest import mock

import torch
import torch.nn.functional as F

from bench.block_costs import mamba_ssm_x_and_b_grads, time_part
from bench.common import add_run_options, environment, rel_err, write_results
from bench.ssd_cb_grad import inputs
from model import ModelConfig

COLUMNS = ["path", "seq_len", "ms", "err_max", "err_ddA"]
OUTPUTS = ("dx", "ddt", "dD", "dB", "ddA")
TILE_CONSTANTS = ("BLOCK_M", "BLOCK_K", "HEADS", "WARPS", "STAGES")


def x_and_b_grads_float64(x: torch.Tensor, dt: torch.Tensor, dA_cumsum: torch.Tensor, B: torch.Tensor,
                          CB: torch.Tensor, dout: torch.Tensor, dstates: torch.Tensor, D: torch.Tensor,
                          seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """model.ssd_dx_db.x_and_b_grads' outputs in float64 from the definition (its module doc): dx (b, l, h, p),
    ddt (b, h, c, chunk), dD (h,), dB (b, l, g, n), ddA (b, h, c, chunk). Shapes as there; C.B is used as given
    (zero across documents), the chunk-end decay is zeroed for positions of an earlier document."""
    b, seqlen, h, p = x.shape
    c, q = dt.shape[2], dt.shape[3]
    g, n = B.shape[2], B.shape[3]
    pad = c * q - seqlen
    xs, dys = (F.pad(t.double(), (0, 0, 0, 0, 0, pad)).view(b, c, q, h, p) for t in (x, dout))
    Bh = F.pad(B.double(), (0, 0, 0, 0, 0, pad)).view(b, c, q, g, n).repeat_interleave(h // g, dim=3)
    doc = seq_idx if seq_idx is not None else torch.zeros(b, seqlen, dtype=torch.int32, device=x.device)
    doc = torch.cat([doc, doc[:, -1:].expand(b, pad)], dim=1).view(b, c, q)  # the padding in the last document
    a = dA_cumsum.double().permute(0, 2, 3, 1)  # (b, c, q, h)
    dts = dt.double().permute(0, 2, 3, 1)
    scale = torch.exp((a[:, :, -1:] - a).clamp(max=0)) * (doc == doc[..., -1:])[..., None]  # (b, c, q, h)
    dS = dstates.double()
    state = scale[..., None] * torch.einsum("bcshn,bchpn->bcshp", Bh, dS)
    decay = torch.exp((a[:, :, :, None] - a[:, :, None]).clamp(max=0)).permute(0, 1, 4, 2, 3).tril()  # (b,c,h,t,s)
    cb = CB.double().repeat_interleave(h // g, dim=2) * decay
    acc = state + torch.einsum("bchts,bcthp->bcshp", cb, dys)
    dx = acc * dts[..., None] + D.double()[:, None] * dys
    ddt = (acc * xs).sum(-1)
    dB = torch.einsum("bcshp,bchpn->bcshn", xs * (scale * dts)[..., None], dS).view(b, c, q, g, h // g, n).sum(4)
    d = dts * (state * xs).sum(-1)
    ddA = d.cumsum(2) - d  # exclusive prefix sums within each chunk
    return (dx.reshape(b, c * q, h, p)[:, :seqlen], ddt.permute(0, 3, 1, 2), (dys * xs).sum((0, 1, 2, 4)),
            dB.reshape(b, c * q, g, n)[:, :seqlen], ddA.permute(0, 3, 1, 2))


def grad_inputs(cfg: ModelConfig, seq_len: int, device: torch.device, dtype: torch.dtype) -> dict:
    """The arguments of model.ssd_dx_db.x_and_b_grads, seeded: bench/ssd_cb_grad.inputs plus dS and D."""
    kw = inputs(cfg, seq_len, device, dtype)
    m, h = cfg.mamba, cfg.n_ssm_heads
    gen = torch.Generator().manual_seed(1)
    nchunks = kw["dt"].shape[2]
    dstates = torch.randn(1, nchunks, h, m.headdim, m.d_state, generator=gen).to(device=device, dtype=dtype)
    D = (1.0 + 0.2 * torch.randn(h, generator=gen)).to(device)
    return {"x": kw["x"], "dt": kw["dt"], "dA_cumsum": kw["dA_cumsum"], "B": kw["B"], "CB": kw["CB"],
            "dout": kw["dout"], "dstates": dstates, "D": D, "seq_idx": kw["seq_idx"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--seq-lens", default="8192,16384")
    ap.add_argument("--tiles", default="64x32x8x4x2",
                    help="our kernel's configs, BLOCK_MxBLOCK_KxHEADSxWARPSxSTAGES, comma-separated")
    add_run_options(ap, iters=50)
    args = ap.parse_args(argv)
    import model.ssd_dx_db as ours

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        cfg = ModelConfig(preset="tiny", mamba={"chunk_size": 64, "n_groups": 2})
        seq_lens, tiles = [150], ["64x32x8x4x2", "32x16x1x4x2"]
    else:
        cfg, seq_lens, tiles = ModelConfig(preset=args.preset), [int(s) for s in args.seq_lens.split(",")], \
            args.tiles.split(",")
    preset = "tiny" if args.smoke else args.preset
    meta = environment(device) | {"preset": preset, "heads": cfg.n_ssm_heads, "headdim": cfg.mamba.headdim,
                                  "d_state": cfg.mamba.d_state, "chunk_size": cfg.mamba.chunk_size,
                                  "n_groups": cfg.mamba.n_groups}
    rows = []
    for seq in seq_lens:
        kw = grad_inputs(cfg, seq, device, dtype)
        want = x_and_b_grads_float64(**kw)
        paths = [("mamba_ssm dx + db", mamba_ssm_x_and_b_grads, {})]
        for tile in tiles:
            paths.append((f"ours {tile}", ours.x_and_b_grads,
                          dict(zip(TILE_CONSTANTS, (int(v) for v in tile.split("x"))))))
        for label, fn, constants in paths:
            with mock.patch.multiple(ours, **constants) if constants else contextlib.nullcontext():
                got = fn(**kw)
                ms = time_part(lambda fn=fn, kw=kw: fn(**kw), [], kw["x"], device, 3 if args.smoke else args.iters)
            errs = {name: rel_err(t, w) for name, t, w in zip(OUTPUTS, got, want)}
            row = {"path": label, "seq_len": seq, "ms": ms, "err_max": max(errs.values()), "err_ddA": errs["ddA"]}
            rows.append(row)
            print(row, errs, flush=True)
        del kw, want
    title = f"SSD backward: x, dt, D and B gradients, one kernel vs mamba_ssm's two ({preset})"
    write_results(args.name or f"ssd_dx_db_{preset}" + ("_smoke" if args.smoke else ""), rows, meta, COLUMNS,
                  args.out, title=title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
