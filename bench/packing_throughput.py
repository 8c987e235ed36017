"""Cost of document-aware packing: training-step throughput with `document` vs `continuous` packing.

Sequences are packed from the REAL document-length distribution of a curated manifest (the train
split's `.ds.index` files: consecutive documents fill each sequence, the last one split at the
boundary, as the data loader does). Each step is forward + backward + a fused AdamW update of the
preset in bf16 on the kernel path; `document` passes seq_idx (kept on the host, as the trainer does)
and restarting positions (Mamba2 state and conv reset, attention within documents through
flash-attn varlen), `document_flex` the same with FlexAttention's document mask, `continuous`
passes neither. The cost is that of the faster document mode. Also checks on the kernel path that
a packed sequence gives each document the logits it gets alone.

    python bench/packing_throughput.py --manifest outputs/embedded/manifest.json --preset 1.3b --seq-len 8192
    python bench/packing_throughput.py --manifest outputs/embedded/manifest.json --smoke
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bench.common import bench_model, environment, matmul_peak_tflops, median, rel_err, time_fn, write_results
from model import ModelConfig, positions_from_seq_idx, train_flops_per_token


def document_lengths(manifest: Path) -> np.ndarray:
    """Token lengths of every train document (EOS included), in shard order."""
    meta = json.loads(manifest.read_text())
    lengths = []
    for source in meta["splits"]["train"]["sources"]:
        for shard in source["shards"]:
            ends = np.fromfile(manifest.parent / shard["index"], dtype=np.uint64).astype(np.int64)
            lengths.append(np.diff(ends, prepend=0))
    return np.concatenate(lengths)


def packed_seq_idx(lengths: np.ndarray, seq_len: int, n_rows: int) -> torch.Tensor:
    """(n_rows, seq_len) document index per token, filling rows with consecutive documents."""
    rows, doc, offset = [], 0, 0
    for _ in range(n_rows):
        ids, fill = [], 0
        while fill < seq_len:
            take = min(int(lengths[doc % len(lengths)]) - offset, seq_len - fill)
            ids.append(np.full(take, len(ids)))
            fill += take
            offset += take
            if offset == lengths[doc % len(lengths)]:
                doc, offset = doc + 1, 0
        rows.append(np.concatenate(ids))
    return torch.from_numpy(np.stack(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--modes", default="continuous,document,document_flex")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    preset, seq, iters = ("tiny", 128, 2) if args.smoke else (args.preset, args.seq_len, args.iters)
    lengths = document_lengths(args.manifest)
    n_rows = 4
    seq_idx = packed_seq_idx(lengths, seq, n_rows)  # host tensor, as the data loader hands it over
    cfg = ModelConfig(preset=preset)
    torch.manual_seed(0)
    model = bench_model(cfg, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    ids = torch.randint(0, cfg.vocab_size, (n_rows, seq + 1), device=device)
    peak = matmul_peak_tflops(device, n=1024 if args.smoke else 8192)
    flops = train_flops_per_token(cfg, seq)
    rows, step_no, used = [], [0], []  # used: the packed row of every step, in order

    def train_step(packing: str) -> None:
        r = step_no[0] % n_rows  # rotate through the packed rows
        step_no[0] += 1
        used.append(r)
        x, y = ids[r:r + 1, :-1], ids[r:r + 1, 1:].clone()
        sid = pos = None
        if packing != "continuous":
            sid = seq_idx[r:r + 1]
            pos = positions_from_seq_idx(sid).to(device)
            y[:, :-1][(sid[:, 1:] != sid[:, :-1]).to(device)] = -100  # cross-document targets are not scored
        model.loss(x, y, position_ids=pos, seq_idx=sid).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    modes = args.modes.split(",")
    for packing in modes:  # every mode and row once before any timing: first-call costs (autotune,
        model.set_attn_backend("flex" if packing == "document_flex" else cfg.attn_backend)  # compile,
        for _ in range(n_rows):  # allocator growth) must not land in the first mode measured
            train_step(packing)
    for packing in modes:
        model.set_attn_backend("flex" if packing == "document_flex" else cfg.attn_backend)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = time_fn(lambda: train_step(packing), device, warmup=3, iters=iters)
        t = median(times)
        by_row = {r: [dt for dt, u in zip(times, used[-iters:]) if u == r] for r in range(n_rows)}
        row = {"preset": preset, "packing": packing, "seq_len": seq, "tokens_per_s": seq / t, "step_ms": 1e3 * t,
               "mfu": seq / t * flops / (peak * 1e12),
               # per packed row (its document count): tells which rows a mode is slow on
               "ms_by_row": "; ".join(f"{int(seq_idx[r].max()) + 1} docs {1e3 * median(v):.1f}"
                                      for r, v in by_row.items() if v)}
        if device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        rows.append(row)
        print(row, flush=True)
    best_document = max((r for r in rows if r["packing"] != "continuous"), key=lambda r: r["tokens_per_s"])
    cost = 1 - best_document["tokens_per_s"] / rows[modes.index("continuous")]["tokens_per_s"]
    # packed == each document alone, kernel path (the faster document mode), first packed row
    model.set_attn_backend("flex" if best_document["packing"] == "document_flex" else cfg.attn_backend)
    model.eval()
    with torch.no_grad():
        sid = seq_idx[:1]
        packed = model(ids[:1, :-1], seq_idx=sid).float()
        sid = sid.to(device)
        starts = torch.nonzero(torch.diff(sid[0], prepend=sid[0, :1] - 1)).flatten().tolist() + [seq]
        alone = torch.cat([model(ids[:1, a:b]).float() for a, b in zip(starts[:-1], starts[1:])], dim=1)
    parity = rel_err(packed, alone)
    docs_per_row = [int(seq_idx[r].max()) + 1 for r in range(n_rows)]
    meta = environment(device) | {"matmul_peak_tflops": peak, "document_packing_cost": cost,
                                  "fastest_document_mode": best_document["packing"],
                                  "packed_vs_alone_logits_rel_err": parity, "dtype": str(model.embed.weight.dtype),
                                  "documents_per_row": docs_per_row, "impl": model.impl,
                                  "mean_document_tokens": float(lengths.mean()), "manifest": str(args.manifest)}
    print(f"document packing cost {100 * cost:.2f}%; packed vs alone logits rel err {parity:.2e}; "
          f"documents per row {docs_per_row}")
    write_results("packing_throughput" + ("_smoke" if args.smoke else ""), rows, meta,
                  ["preset", "packing", "seq_len", "tokens_per_s", "mfu", "step_ms", "ms_by_row", "peak_mem_gb"], args.out,
                  title=f"Document vs continuous packing ({preset}, 1 x {seq}, bf16, fwd+bwd+AdamW); "
                        f"cost {100 * cost:.2f}%, packed-vs-alone rel err {parity:.1e}")


if __name__ == "__main__":
    main()
