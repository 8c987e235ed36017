"""Cost of document-aware packing: training-step throughput with `document` vs `continuous` packing.

Sequences are packed from the REAL document-length distribution of a curated manifest (the train split's
`.ds.index` files: consecutive documents fill each sequence, the last one split at the boundary, as the data
loader does). Each step is forward + backward + a fused AdamW update of the preset in bf16 on the kernel path;
`document` passes seq_idx (kept on the host, as the trainer does) and restarting positions (Mamba2 state and
conv reset, attention within documents through flash-attn varlen), `document_flex` the same with
FlexAttention's document mask, `continuous` passes neither. `continuous_graph` and `document_graph` run the
same steps with the forward and backward replayed as CUDA graphs (train/graph_step.py; packed documents
through fixed-capacity cu_seqlens). `grad_rel_err`: a graphed mode's gradients against its eager mode's on the
same batch and weights, and, on the eager row, a second eager step against the first (the kernels' own
run-to-run spread, the floor the graphed error is read against). The cost is that of the faster document mode
against continuous packing, eager and graphed apart. Also checks on the kernel path that a packed sequence
gives each document the logits it gets alone.

    python bench/packing_throughput.py --manifest outputs/embedded/manifest.json --preset 1.3b --seq-len 8192
    python bench/packing_throughput.py --manifest outputs/embedded/manifest.json \
        --modes continuous,document,continuous_graph,document_graph
    python bench/packing_throughput.py --manifest outputs/embedded/manifest.json --smoke
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from bench.common import (  # noqa: E402
    add_run_options,
    bench_model,
    environment,
    matmul_peak_tflops,
    median,
    rel_err,
    time_fn,
    write_results,
)
from model import ModelConfig, positions_from_seq_idx, train_flops_per_token  # noqa: E402
from train.graph_step import graph_training_forward  # noqa: E402

GRAPH_MODES = ("continuous_graph", "document_graph")


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
    ap.add_argument("--modes", default="continuous,document,document_flex,continuous_graph,document_graph",
                    help="the *_graph modes need CUDA (left out with --smoke)")
    add_run_options(ap, iters=8)
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
    modes = [m for m in args.modes.split(",") if device.type == "cuda" or m not in GRAPH_MODES]
    graphs = None
    if any(m in GRAPH_MODES for m in modes):
        graphs = graph_training_forward(model, ids[:1, :-1], documents=True)  # steps captured on first use
    graph_err: dict[str, tuple[float, str]] = {}

    def batch(r: int, packing: str) -> tuple[torch.Tensor, ...]:
        """Row r as (input_ids, labels, position_ids, seq_idx): the last two None when continuous."""
        x, y = ids[r:r + 1, :-1], ids[r:r + 1, 1:].clone()
        sid = pos = None
        if not packing.startswith("continuous"):
            sid = seq_idx[r:r + 1]
            pos = positions_from_seq_idx(sid).to(device)
            y[:, :-1][(sid[:, 1:] != sid[:, :-1]).to(device)] = -100  # cross-document targets are not scored
        return x, y, pos, sid

    def select(packing: str) -> None:
        """The attention backend and the forward (graphed or eager) of a mode."""
        model.set_attn_backend("flex" if packing == "document_flex" else cfg.attn_backend)
        vars(model).pop("forward", None)  # the class's eager forward
        if packing in GRAPH_MODES:
            model.forward = graphs

    def train_step(packing: str) -> None:
        r = step_no[0] % n_rows  # rotate through the packed rows
        step_no[0] += 1
        used.append(r)
        x, y, pos, sid = batch(r, packing)
        model.loss(x, y, position_ids=pos, seq_idx=sid).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    names = [n for n, _ in model.named_parameters()]

    def gradients(packing: str, r: int) -> list[torch.Tensor]:
        """Every parameter's gradient of one step on row r (copies); no update."""
        select(packing)
        x, y, pos, sid = batch(r, packing)
        model.loss(x, y, position_ids=pos, seq_idx=sid).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.zero_grad(set_to_none=True)
        return grads

    def grads_rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> tuple[float, str]:
        """||got - want|| / ||want|| over all gradients, accumulated per tensor in float64 (one
        float64 copy of a 1.3B model's gradients would not fit beside the graphs' memory), and the
        three tensors with the largest error of their own."""
        diffs = [float((g.double() - w.double()).pow(2).sum()) for g, w in zip(got, want)]
        norms = [float(w.double().pow(2).sum()) for w in want]
        own = sorted(((d / max(n, 1e-300)) ** 0.5, name) for d, n, name in zip(diffs, norms, names))[-3:]
        worst = "; ".join(f"{name} {err:.2g}" for err, name in reversed(own))
        return (sum(diffs) / max(sum(norms), 1e-300)) ** 0.5, worst

    for packing in modes:  # every mode and row once before any timing: first-call costs (autotune,
        select(packing)  # compile, graph capture, allocator growth) must not land in the first mode measured
        for _ in range(n_rows):
            train_step(packing)
    for packing in GRAPH_MODES:  # the graphed step against the eager one, same weights and batch, and
        if packing in modes:    # the eager step against itself (the kernels' own run-to-run spread)
            eager = packing.removesuffix("_graph")
            r = max(range(n_rows), key=lambda i: int(seq_idx[i].max()))  # the row with the most documents
            want = gradients(eager, r)
            graph_err[packing] = grads_rel_err(gradients(packing, r), want)
            graph_err[eager] = grads_rel_err(gradients(eager, r), want)
    for packing in modes:
        select(packing)
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
        if packing in graph_err:  # graphed rows: vs eager; eager rows: vs a second eager step
            row["grad_rel_err"], row["grad_worst_tensors"] = graph_err[packing]
        if device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        rows.append(row)
        print(row, flush=True)
    select("document")
    speed = {r["packing"]: r["tokens_per_s"] for r in rows}

    def packing_cost(plain: str, documents: tuple[str, ...]) -> float | None:
        """1 - (fastest of `documents`) / `plain` tokens/s, None when not both were measured."""
        measured = [speed[m] for m in documents if m in speed]
        return 1 - max(measured) / speed[plain] if plain in speed and measured else None

    cost = packing_cost("continuous", ("document", "document_flex"))
    cost_graph = packing_cost("continuous_graph", ("document_graph",))
    best_document = max((r for r in rows if r["packing"] in ("document", "document_flex")),
                        key=lambda r: r["tokens_per_s"])
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
                                  "document_packing_cost_graphed": cost_graph,
                                  "fastest_document_mode": best_document["packing"],
                                  "packed_vs_alone_logits_rel_err": parity, "dtype": str(model.embed.weight.dtype),
                                  "documents_per_row": docs_per_row, "impl": model.impl,
                                  "mean_document_tokens": float(lengths.mean()), "manifest": str(args.manifest)}
    graphed = f", {100 * cost_graph:.2f}% graphed" if cost_graph is not None else ""
    print(f"document packing cost {100 * cost:.2f}% eager{graphed}; packed vs alone logits rel err {parity:.2e}; "
          f"documents per row {docs_per_row}")
    write_results(args.name or "packing_throughput" + ("_smoke" if args.smoke else ""), rows, meta,
                  ["preset", "packing", "seq_len", "tokens_per_s", "mfu", "step_ms", "ms_by_row", "peak_mem_gb",
                   "grad_rel_err", "grad_worst_tensors"], args.out,
                  title=f"Document vs continuous packing ({preset}, 1 x {seq}, bf16, fwd+bwd+AdamW); cost "
                        f"{100 * cost:.2f}% eager{graphed}, packed-vs-alone rel err {parity:.1e}")


if __name__ == "__main__":
    main()
