"""Our layer-pattern variants against local HF causal LMs: forward time (mean +- std), memory, throughput.

    python bench/hf_compare.py --hf /models/granite-4.0-nano,/models/llama --preset small \\
        --variants strategic,alternating,all_mamba,all_attention --match-hf --seq-len 2048 --batch 4

Every model runs the same inference forward (torch.no_grad, every position's logits, no cache) on the
same random token ids (b, l), below the smallest vocabulary of all models:
  ours  HybridLM of the preset with the variant's pattern (model/variants.py), random init, its fastest
        path (kernels on CUDA); with --match-hf its SwiGLU width is sized to the first HF model's
        parameter count (model.variants.match_ffn; within 3%)
  hf    AutoModelForCausalLM.from_pretrained(FOLDER) (local files only), its own attention default
bf16 on CUDA, float32 on CPU. Per model: `--iters` timed forwards after `--warmup` untimed ones.
  forward_ms, forward_ms_std   mean and sample std of the timed forwards
  tokens_per_s                 b * l / mean
  peak_mem_gb                  peak allocated device memory over the timed forwards (GPU only)
  activation_gb                that peak minus what was allocated before them (the weights)
  speed_vs_hf                  the first HF model's mean time / this model's (> 1: faster)
  mem_reduction_vs_hf          1 - this peak / the first HF model's peak
A model that fails (out of memory, any error) gets its status in the row; the others still run.
Writes <out>/<name>.{json,md} (bench/common.write_results).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from bench.common import bench_model, environment, hf_torch_path, sync, time_fn, write_results
from bench.peers import run_guarded
from model import ModelConfig, count_params
from model.variants import VARIANTS, match_ffn

COLUMNS = ["model", "pattern", "params", "seq_len", "batch", "forward_ms", "forward_ms_std", "tokens_per_s",
           "peak_mem_gb", "activation_gb", "speed_vs_hf", "mem_reduction_vs_hf", "status"]


def load_hf(folder: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A local HF causal LM, in eval mode, on `device` in `dtype` (nothing downloaded)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True).to(device).eval()


def vocab_size(model: nn.Module) -> int:
    return model.get_input_embeddings().num_embeddings


def forward_call(model: nn.Module, ids: torch.Tensor, hf: bool):
    @torch.no_grad()
    def call() -> torch.Tensor:
        return model(input_ids=ids, use_cache=False).logits if hf else model(ids)

    return call


def measure(model: nn.Module, hf: bool, ids: torch.Tensor, warmup: int, iters: int) -> dict:
    """Time and memory of `iters` forwards of ids (b, l)."""
    device = ids.device
    call = forward_call(model, ids, hf)
    call()  # untimed: kernel autotuning and allocator warm-up at this shape
    sync(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_fn(call, device, warmup, iters)
    mean = statistics.fmean(times)
    row = {"forward_ms": 1e3 * mean, "forward_ms_std": 1e3 * statistics.stdev(times) if iters > 1 else None,
           "tokens_per_s": ids.numel() / mean}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        row.update(peak_mem_gb=peak / 1e9, activation_gb=(peak - before) / 1e9)
    return row


def our_configs(preset: str, variants: list[str], match_target: int | None) -> dict[str, ModelConfig]:
    base = ModelConfig(preset=preset)
    out = {}
    for name in variants:
        cfg = VARIANTS[name].apply(base)
        out[name] = match_ffn(cfg, match_target) if match_target else cfg
    return out


def compare(hf_folders: list[Path], preset: str, variants: list[str], match_hf: bool, seq_len: int, batch: int,
            warmup: int, iters: int, device: torch.device) -> list[dict]:
    """One row per model: the HF models first, then our variants (module doc)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hf_models = {f"hf:{f.name}": load_hf(f, device, dtype) for f in hf_folders}  # bad folder: fail before timing
    hf_params = {n: sum(p.numel() for p in m.parameters()) for n, m in hf_models.items()}
    first_params = next(iter(hf_params.values()), None)
    ours = our_configs(preset, variants, first_params if match_hf else None)
    vocab = min([*(vocab_size(m) for m in hf_models.values()), *(c.vocab_size for c in ours.values())])
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for name in list(hf_models):
        model = hf_models.pop(name)  # held by this loop only: freed before the next model is timed
        rows.append({"model": name, "pattern": "-", "params": hf_params[name],
                     **run_guarded(lambda m=model: measure(m, True, ids, warmup, iters), device)})
        del model
    for name, cfg in ours.items():
        def run_ours(cfg: ModelConfig = cfg) -> dict:
            model = bench_model(cfg.model_copy(update={"max_seq_len": max(cfg.max_seq_len, seq_len)}), device).eval()
            return measure(model, False, ids, warmup, iters)

        rows.append({"model": f"ours:{name}", "pattern": cfg.layer_pattern, "params": count_params(cfg),
                     **run_guarded(run_ours, device)})
    ref = rows[0] if hf_folders and rows[0]["status"] == "ok" else None
    for r in rows:
        r.update(seq_len=seq_len, batch=batch)
        if ref is not None and r["status"] == "ok":
            r["speed_vs_hf"] = ref["forward_ms"] / r["forward_ms"]
            if ref.get("peak_mem_gb") and r.get("peak_mem_gb"):
                r["mem_reduction_vs_hf"] = 1 - r["peak_mem_gb"] / ref["peak_mem_gb"]
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="comma-separated local HF causal LM folders (the first is the reference)")
    ap.add_argument("--preset", default="small", help="our model size (model/presets.py)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--match-hf", action="store_true", help="size our variants to the first HF model's parameters")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    ap.add_argument("--name", default="hf_compare")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folders = [Path(f) for f in args.hf.split(",")]
    variants = args.variants.split(",")
    problems = [f"{f} is not a HF model folder (no config.json)" for f in folders if not (f / "config.json").is_file()]
    problems += [f"variant {v!r} is unknown; choose from {', '.join(VARIANTS)}" for v in variants if v not in VARIANTS]
    if args.iters < 2:
        problems.append("--iters must be >= 2 (the std needs two forwards)")
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    try:
        with hf_torch_path(device):
            rows = compare(folders, args.preset, variants, args.match_hf, args.seq_len, args.batch, args.warmup,
                           args.iters, device)
    except ValueError as exc:  # an unknown preset, a parameter count match_ffn cannot reach
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    path = write_results(args.name, rows, environment(device), COLUMNS, args.out,
                         title="Our variants vs HF causal LMs: inference forward")
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
