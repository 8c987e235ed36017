"""Kernel path vs reference path on the same weights (GPU evidence for the model package).

For each preset: forward logits and every parameter gradient of the kernel path (mamba_ssm Triton SSD,
causal_conv1d, SDPA / flash-attn) against the pure-PyTorch reference path, relative error per tensor
(||kernel - ref|| / ||ref||):
  - float32: both paths in float32 (TF32 off for torch matmuls; Triton's float32 dots use TF32);
  - bf16: kernel path with bf16 weights/activations against the reference in float32 on the same
    (bf16-rounded) weights, i.e. the error a bf16 run actually has.
Packed documents (seq_idx + restarting positions): kernel vs reference, and packed vs each document
run alone on the kernel path. Decoding: kernel prefill + steps vs the reference full forward.

    python bench/kernel_parity.py                 # on a CUDA machine with requirements-cuda.txt
    python bench/kernel_parity.py --smoke         # CPU plumbing check: reference vs reference, tiny
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from bench.common import environment, rel_err, write_results  # noqa: E402
from model import HybridLM, ModelConfig  # noqa: E402


def lognormal_doc_lengths(total: int, mean: float, gen: torch.Generator) -> list[int]:
    """Document lengths summing to `total` (lognormal, like real curated documents)."""
    lens, left = [], total
    while left > 0:
        n = int(torch.distributions.LogNormal(torch.log(torch.tensor(mean)), 1.0).sample().item()) + 1
        lens.append(min(n, left))
        left -= lens[-1]
    return lens


def run_paths(model: HybridLM, impl: str, ids: torch.Tensor, seq_idx: torch.Tensor | None, dtype: torch.dtype):
    """Logits and parameter grads of `model` (a private copy cast to dtype) on path `impl`."""
    m = copy.deepcopy(model).to(dtype)
    m.set_impl(impl)
    logits = m(ids, seq_idx=seq_idx)
    # A fixed random projection of the logits as the loss: every logit gets a gradient.
    g = torch.Generator(device=ids.device).manual_seed(1)
    w = torch.randn(logits.shape, generator=g, device=ids.device, dtype=torch.float32)
    (logits.float() * w).sum().div(logits.numel() ** 0.5).backward()
    grads = {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}
    return logits.detach().float(), grads


def compare(ref: tuple, test: tuple) -> dict:
    logits_ref, g_ref = ref
    logits_t, g_t = test
    errs = {n: rel_err(g_t[n], g_ref[n]) for n in g_ref}
    worst = max(errs, key=errs.get)
    vals = sorted(errs.values())
    return {
        "logits_rel_err": rel_err(logits_t, logits_ref),
        "grad_rel_err_median": vals[len(vals) // 2],
        "grad_rel_err_max": errs[worst],
        "grad_worst_tensor": worst,
        "per_tensor": errs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny preset, reference vs reference")
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    ap.add_argument("--cases", default="float32,bf16,float32 packed,bf16 packed",
                    help="comma-separated subset of the kernel-vs-reference cases (each new dtype/packing costs "
                         "a Triton compile on first use)")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    kernel_impl = "reference" if args.smoke else "kernels"
    presets = ["tiny"] if args.smoke else args.presets.split(",")
    seq = 48 if args.smoke else args.seq_len
    rows, details = [], {}
    meta = environment(device) | {"seq_len": seq, "batch": args.batch, "kernel_impl": kernel_impl,
                                  "note": "smoke: reference vs reference on CPU" if args.smoke else ""}
    name_out = "kernel_parity_smoke" if args.smoke else "kernel_parity"

    def record(row: dict) -> None:
        """Append a row and rewrite the results (a run cut by a time limit keeps what it measured)."""
        rows.append(row)
        print(row, flush=True)
        out = write_results(name_out, rows, meta, ["preset", "case", "logits_rel_err", "grad_rel_err_median",
                                                   "grad_rel_err_max", "grad_worst_tensor"],
                            args.out, title="Kernel path vs reference path (same weights)")
        (out.parent / f"{name_out}_per_tensor.json").write_text(json.dumps(details, indent=1) + "\n")

    for name in presets:
        torch.manual_seed(0)
        cfg = ModelConfig(preset=name)
        model = HybridLM(cfg).to(device)
        ids = torch.randint(0, cfg.vocab_size, (args.batch, seq), device=device)
        gen = torch.Generator().manual_seed(0)
        lens = lognormal_doc_lengths(seq, seq / 4, gen)
        sid = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)]).to(device).expand(args.batch, seq)
        bf16_model = copy.deepcopy(model).to(torch.bfloat16).float()  # weights rounded to bf16
        cases = [
            ("float32", model, None, torch.float32, torch.float32),
            ("bf16", bf16_model, None, torch.bfloat16, torch.float32),
            ("float32 packed", model, sid, torch.float32, torch.float32),
            ("bf16 packed", bf16_model, sid, torch.bfloat16, torch.float32),
        ]
        for label, base, seq_idx, k_dtype, r_dtype in [c for c in cases if c[0] in args.cases.split(",")]:
            ref = run_paths(base, "reference", ids, seq_idx, r_dtype)
            test = run_paths(base, kernel_impl, ids, seq_idx, k_dtype)
            res = compare(ref, test)
            details[f"{name} {label}"] = res.pop("per_tensor")
            record({"preset": name, "case": label, **res})
        # packed == unpacked on the kernel path (per document, logits)
        for dtype in (torch.float32, torch.bfloat16):
            m = copy.deepcopy(model).to(dtype)
            m.set_impl(kernel_impl)
            with torch.no_grad():
                packed = m(ids[:1], seq_idx=sid[:1]).float()
                alone, start = [], 0
                for n in lens:
                    alone.append(m(ids[:1, start:start + n]).float())
                    start += n
            record({"preset": name, "case": f"packed vs alone ({str(dtype).split('.')[-1]}, kernels)",
                    "logits_rel_err": rel_err(packed, torch.cat(alone, 1)), "documents": len(lens)})
        # decoding on the kernel path vs the reference full forward (float32)
        m = copy.deepcopy(model)
        m.set_impl(kernel_impl)
        with torch.no_grad():
            n_prompt = seq // 2
            n_steps = min(32, seq - n_prompt + 1)
            logits, cache = m.prefill(ids[:, :n_prompt])
            steps = [logits]
            for t in range(n_prompt, n_prompt + n_steps - 1):
                steps.append(m.step(ids[:, t], cache))
            m.set_impl("reference")
            full = m(ids[:, : n_prompt + n_steps - 1])[:, n_prompt - 1:]
        record({"preset": name, "case": "decode (kernel steps) vs full forward (ref), float32",
                "logits_rel_err": rel_err(torch.stack(steps, 1), full)})
        del model, bf16_model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for r in rows:
        print({k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in r.items()})


if __name__ == "__main__":
    main()
