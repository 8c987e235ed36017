"""The SSD backward's C.B and intra-chunk decay gradients: model/ssd_cb_grad.py's one kernel against
mamba_ssm's two (`_chunk_scan_bwd_dcb` + `_chunk_scan_bwd_ddAcs_stable`, what it replaces).

Inputs at the preset's Mamba2 widths for one sequence of each length, packed with documents (seq_idx),
as the training step makes them: x and dout bf16; dt and its chunk sums from mamba_ssm's
`_chunk_cumsum_fwd` (softplus, dt_bias); C.B float32 from `_bmm_chunk_fwd` (zero between documents).
Rows per length: GPU time of each path (bench/block_costs.time_part: CUDA-graph replay, the sums after
our kernel included), ours at each tile config of `--tiles` (BLOCKxWARPSxSTAGES), and each path's
relative errors of dCB and ddA against float64 from the definition (`decay_grad_float64`).

    python experiments/kernels/ssd_cb_grad.py --preset 1.3b --seq-lens 8192,16384 --tiles 64x4x3,64x4x4,64x8x3,32x4x3
    python experiments/kernels/ssd_cb_grad.py --smoke     # CPU, under Triton's interpreter only (the kernels are Triton):
                                            # tests/model/test_kernels_interpreted.py runs it
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repo's packages first

from bench.block_costs import mamba_ssm_cb_and_decay_grads, time_part  # noqa: E402
from bench.common import add_run_options, environment, rel_err, write_results  # noqa: E402
from model import ModelConfig  # noqa: E402

COLUMNS = ["path", "seq_len", "ms", "err_dcb", "err_ddA"]


def decay_grad_float64(x: torch.Tensor, dt: torch.Tensor, dA_cumsum: torch.Tensor, dout: torch.Tensor, CB: torch.Tensor,
                       seq_idx: torch.Tensor, heads_per_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """In float64 from the definition, with G_h[t, s] = (dout_t . x_s) dt_s exp(a_t - a_s) for s <= t in a
    chunk and one document (a: dA_cumsum): dCB[t, s] = sum_h G_h[t, s] (b, c, g, chunk, chunk) and ddA_i =
    sum over pairs t >= i > s of CB[t, s] G_h[t, s] (b, h, c, chunk). x, dout (b, l, h, p); dt, dA_cumsum
    (b, h, c, chunk); seq_idx (b, l)."""
    b, seqlen, h, p = x.shape
    c, q = dt.shape[2], dt.shape[3]
    pad = c * q - seqlen
    xs, dys = (torch.nn.functional.pad(t.double(), (0, 0, 0, 0, 0, pad)).view(b, c, q, h, p) for t in (x, dout))
    doc = torch.nn.functional.pad(seq_idx, (0, pad), value=-1).view(b, c, q)
    same = (doc[..., :, None] == doc[..., None, :]).tril()[:, :, None]  # (b, c, 1, t, s)
    a = dA_cumsum.double().transpose(1, 2)  # (b, c, h, q)
    g = (torch.einsum("bcthp,bcshp->bchts", dys, xs) * dt.double().transpose(1, 2)[:, :, :, None, :]
         * torch.exp((a[..., :, None] - a[..., None, :]).tril()) * same)
    dcb = g.view(b, c, h // heads_per_group, heads_per_group, q, q).sum(3)
    pair = (g * CB.double().repeat_interleave(heads_per_group, dim=2)).tril(-1)
    del g
    idx = torch.arange(q, device=x.device)
    between = ((idx[:, None, None] <= idx[None, :, None]) & (idx[None, None, :] < idx[:, None, None])).double()
    return dcb, torch.einsum("bchts,its->bchi", pair, between).transpose(1, 2)


def inputs(cfg: ModelConfig, seq_len: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Seeded kernel inputs at cfg's widths, one sequence of `seq_len` tokens in 4 documents."""
    from mamba_ssm.ops.triton import ssd_bmm, ssd_chunk_state

    m, h = cfg.mamba, cfg.n_ssm_heads
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype)

    bounds = sorted(torch.randperm(seq_len - 1, generator=gen)[:3].add(1).tolist())
    seq_idx = torch.zeros(1, seq_len, dtype=torch.int32)
    for b in bounds:
        seq_idx[:, b:] += 1
    seq_idx = seq_idx.to(device)
    A = -torch.empty(h).uniform_(*m.a_init_range, generator=gen).to(device)
    dt_bias = torch.empty(h).uniform_(-4.0, -2.0, generator=gen).to(device)
    dA_cumsum, dt = ssd_chunk_state._chunk_cumsum_fwd(rand(1, seq_len, h, scale=0.5), A, m.chunk_size,
                                                      dt_bias=dt_bias, dt_softplus=True)
    C, B = (rand(1, seq_len, m.n_groups, m.d_state, scale=m.d_state ** -0.5) for _ in range(2))
    return {"x": rand(1, seq_len, h, m.headdim), "dt": dt, "dA_cumsum": dA_cumsum,
            "dout": rand(1, seq_len, h, m.headdim),
            "CB": ssd_bmm._bmm_chunk_fwd(C, B, m.chunk_size, seq_idx=seq_idx, output_dtype=torch.float32),
            "seq_idx": seq_idx, "ngroups": m.n_groups}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--seq-lens", default="8192,16384")
    ap.add_argument("--tiles", default="64x4x3", help="our kernel's tile configs, BLOCKxWARPSxSTAGES")
    add_run_options(ap, iters=50)
    args = ap.parse_args(argv)
    import model.ssd_cb_grad as ours

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        cfg = ModelConfig(preset="tiny", mamba={"chunk_size": 64, "n_groups": 2})
        seq_lens, tiles = [150], ["64x4x3", "32x4x3"]
    else:
        cfg, seq_lens, tiles = ModelConfig(preset=args.preset), [int(s) for s in args.seq_lens.split(",")], \
            args.tiles.split(",")
    preset = "tiny" if args.smoke else args.preset
    meta = environment(device) | {"preset": preset, "heads": cfg.n_ssm_heads, "headdim": cfg.mamba.headdim,
                                  "chunk_size": cfg.mamba.chunk_size, "n_groups": cfg.mamba.n_groups}
    rows = []
    for seq in seq_lens:
        kw = inputs(cfg, seq, device, dtype)
        want_dcb, want_ddA = decay_grad_float64(kw["x"], kw["dt"], kw["dA_cumsum"], kw["dout"], kw["CB"],
                                                kw["seq_idx"], cfg.n_ssm_heads // cfg.mamba.n_groups)
        paths = [("mamba_ssm dcb + ddAcs_stable", mamba_ssm_cb_and_decay_grads, {})]
        for tile in tiles:
            block, warps, stages = (int(v) for v in tile.split("x"))
            paths.append((f"ours {tile}", ours.cb_and_decay_grads,
                          {"BLOCK": block, "WARPS": warps, "STAGES": stages}))
        for label, fn, constants in paths:
            with mock.patch.multiple(ours, **constants) if constants else contextlib.nullcontext():
                dcb, ddA = fn(**kw)  # also the warm-up on CPU (interpreted: no compile to wait for)
                ms = time_part(lambda fn=fn, kw=kw: fn(**kw), [], kw["x"], device, 1 if args.smoke else args.iters,
                               cpu_warmup=0)
            row = {"path": label, "seq_len": seq, "ms": ms, "err_dcb": rel_err(dcb, want_dcb),
                   "err_ddA": rel_err(ddA, want_ddA)}
            rows.append(row)
            print(row, flush=True)
        del kw, want_dcb, want_ddA
    title = f"SSD backward: C.B and intra-chunk decay gradients, one kernel vs mamba_ssm's two ({preset})"
    write_results(args.name or f"ssd_cb_grad_{preset}" + ("_smoke" if args.smoke else ""), rows, meta, COLUMNS,
                  args.out, title=title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
