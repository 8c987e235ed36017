"""Decode tokens/s and memory at long contexts: our hybrid vs its Hugging Face export vs all-attention.

For each context length (default 1K, 8K, 32K tokens) every model prefills a random prompt, then
greedily decodes `--new-tokens` tokens one at a time with its cache; the decode steps are timed
(prefill is reported apart), after one untimed step. Models:
  ours        HybridLM of the preset, execution path model.impl=auto (kernels on CUDA)
  hf          the same weights as transformers' BambaForCausalLM (built in memory by the exporter's
              own `export.hf.bamba_config` + `to_hf_state_dict`, i.e. exactly what --format hf writes)
  attention   an all-attention model (pattern of only `A`) of the same parameter count: the MLP is
              widened to absorb the Mamba2 mixers' weights (rounded to a multiple of 64)
  ours_graph  ours, decoding through the static cache replayed as one CUDA graph per token (CUDA only)
Memory: the decoding state (KV + conv + SSM) in bytes for every model, and on CUDA the peak
allocated memory during the run. Weights are random (`--checkpoint` loads real ones instead): decode
speed does not depend on the values.

Writes bench/results/decode_throughput_<preset>.{json,md,png} (device, date, command included).

    python bench/decode_throughput.py --preset 1.3b                  # GPU: bf16, contexts 1K/8K/32K
    python bench/decode_throughput.py --smoke                        # CPU plumbing check, tiny preset
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from bench.common import RESULTS, environment, hf_torch_path, pyplot, save_figure, sync, write_results  # noqa: E402
from bench.peers import attention_twin  # noqa: E402
from model import HybridLM, ModelConfig  # noqa: E402
from model.sizing import count_params  # noqa: E402

DEFAULT_CONTEXTS, DEFAULT_NEW_TOKENS = "1024,8192,32768", 64
COLUMNS = ["model", "context", "params_m", "impl", "prefill_s", "decode_tokens_per_s", "decode_ms_per_token",
           "state_mb", "peak_mem_gb", "tokens_agree_with_ours"]


def state_bytes(obj: object) -> int:
    """Bytes of every tensor reachable in a cache object (ours or transformers')."""
    seen: set[int] = set()

    def walk(x: object) -> int:
        if isinstance(x, torch.Tensor):
            if id(x) in seen:
                return 0
            seen.add(id(x))
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        if hasattr(x, "__dict__"):
            return sum(walk(v) for v in vars(x).values())
        return 0

    return walk(obj)


class OursRunner:
    """prefill + step through HybridLM's own cache; with `graph_capacity`, the static cache replayed
    as a CUDA graph (model/decode_graph.py), capture included in the prefill time."""

    def __init__(self, model: HybridLM, graph_capacity: int | None = None) -> None:
        self.model, self.graph_capacity = model, graph_capacity

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        logits, self.cache = self.model.prefill(ids)
        self.graphed = None
        if self.graph_capacity is not None:
            from model.decode_graph import GraphedDecodeStep

            self.cache.make_static(ids.size(1) + self.graph_capacity)
            self.graphed = GraphedDecodeStep(self.model, self.cache)
        return logits

    def step(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        return self.graphed(tok) if self.graphed is not None else self.model.step(tok, self.cache)

    def state(self) -> int:
        return self.cache.memory_bytes()


class HFRunner:
    """prefill + step through transformers' forward with past_key_values (the generate() loop, unrolled)."""

    def __init__(self, model) -> None:
        self.model = model

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        return out.logits[:, -1]

    def step(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        position = torch.full((tok.size(0), 1), pos, dtype=torch.long, device=tok.device)
        out = self.model(tok.unsqueeze(1), past_key_values=self.cache, use_cache=True, position_ids=position)
        self.cache = out.past_key_values
        return out.logits[:, -1]

    def state(self) -> int:
        return state_bytes(self.cache)


def build_hf(model: HybridLM):
    """transformers' BambaForCausalLM holding `model`'s weights, on its device and dtype."""
    from transformers import BambaForCausalLM

    from export.hf import bamba_config, to_hf_state_dict

    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    hf_cfg = bamba_config(model.cfg, dtype, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
    with torch.device(device):
        hf = BambaForCausalLM(hf_cfg).to(dtype)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    if unexpected or not set(missing) <= {"lm_head.weight"}:  # a tied head shares the embedding
        raise RuntimeError(f"HF weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return hf.eval()


@torch.inference_mode()
def measure(name: str, runner, ids: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[dict, list[int]]:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    logits = runner.prefill(ids)
    sync(device)
    prefill_s = time.perf_counter() - t0
    ctx = ids.size(1)
    tok = logits.argmax(-1)
    tokens = [int(tok[0])]
    tok = runner.step(tok, ctx).argmax(-1)  # untimed: lazy init, allocator and kernel warm-up
    tokens.append(int(tok[0]))
    sync(device)
    t0 = time.perf_counter()
    for i in range(new_tokens):
        tok = runner.step(tok, ctx + 1 + i).argmax(-1)
        tokens.append(int(tok[0]))
    sync(device)
    dt = time.perf_counter() - t0
    row = {
        "model": name, "context": ctx, "prefill_s": prefill_s,
        "decode_tokens_per_s": ids.size(0) * new_tokens / dt, "decode_ms_per_token": 1e3 * dt / new_tokens,
        "state_mb": runner.state() / 2**20,
    }
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row, tokens


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["model"] for r in rows):
        ok = [r for r in rows if r["model"] == name and "decode_tokens_per_s" in r]
        ctx = [r["context"] for r in ok]
        ax1.plot(ctx, [r["decode_tokens_per_s"] for r in ok], marker="o", label=name)
        ax2.plot(ctx, [r["state_mb"] for r in ok], marker="o", label=name)
    for ax, label in ((ax1, "decode tokens/s"), (ax2, "decoding state (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--checkpoint", help="bundle whose weights (and config) replace the preset's random ones")
    ap.add_argument("--contexts", default=DEFAULT_CONTEXTS, help="comma-separated prompt lengths")
    ap.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS, help="timed decode steps per context")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--models", default="ours,hf,attention")
    ap.add_argument("--smoke", action="store_true", help="CPU check: tiny preset, contexts 64/128/256, 8 tokens")
    ap.add_argument("--out", help="result name (default decode_throughput_<preset>[_smoke])")
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON/markdown/PNG go")
    args = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401  (fail before any measurement)
    except ImportError:
        print("error: the plot needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    if args.smoke:  # explicit --contexts / --new-tokens still win
        args.preset = "tiny"
        args.contexts = args.contexts if args.contexts != DEFAULT_CONTEXTS else "64,128,256"
        args.new_tokens = args.new_tokens if args.new_tokens != DEFAULT_NEW_TOKENS else 8
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    if args.checkpoint:
        from model.bundle import load_bundle

        ours = load_bundle(args.checkpoint, device=device, dtype=dtype).model
        cfg = ours.cfg
    else:
        cfg = ModelConfig(preset=args.preset)
        ours = HybridLM(cfg).to(device=device, dtype=dtype).eval()
    contexts = [int(c) for c in args.contexts.split(",")]
    cfg = cfg.model_copy(update={"max_seq_len": max(cfg.max_seq_len, max(contexts) + args.new_tokens + 2)})
    ours.cfg = cfg
    ours.set_impl()
    wanted = args.models.split(",")
    models: dict[str, tuple[object, int, str]] = {}
    if "ours" in wanted:
        models["ours"] = (OursRunner(ours), count_params(cfg), ours.impl)
    if "ours_graph" in wanted:
        if device.type != "cuda":
            print("error: ours_graph needs a CUDA device", file=sys.stderr)
            return 2
        models["ours_graph"] = (OursRunner(ours, graph_capacity=args.new_tokens + 2), count_params(cfg),
                                f"{ours.impl} + CUDA graph")
    if "hf" in wanted:
        models["hf"] = (HFRunner(build_hf(ours)), count_params(cfg), "transformers Bamba")
    if "attention" in wanted:
        twin_cfg = attention_twin(cfg)
        twin = HybridLM(twin_cfg).to(device=device, dtype=dtype).eval()
        twin.set_impl()
        models["attention"] = (OursRunner(twin), count_params(twin_cfg), twin.impl)
    rows, reference = [], {}
    for ctx in contexts:
        ids = torch.randint(4, cfg.vocab_size, (args.batch, ctx), generator=torch.Generator().manual_seed(ctx))
        ids = ids.to(device)
        for name, (runner, params, impl) in models.items():
            try:
                with hf_torch_path(device):
                    row, tokens = measure(name, runner, ids, args.new_tokens, device)
            except torch.OutOfMemoryError:
                row, tokens = {"model": name, "context": ctx, "decode_tokens_per_s": None, "state_mb": None,
                               "prefill_s": "OOM"}, None
            row.update(params_m=params / 1e6, impl=impl)
            if name == "ours":
                reference[ctx] = tokens
            elif name in ("hf", "ours_graph") and tokens is not None and ctx in reference:
                row["tokens_agree_with_ours"] = sum(a == b for a, b in zip(tokens, reference[ctx]))
                row["tokens_agree_with_ours"] = f"{row['tokens_agree_with_ours']}/{len(tokens)}"
            rows.append(row)
            print({k: v for k, v in row.items()}, flush=True)
    name = args.out or f"decode_throughput_{cfg.preset or 'checkpoint'}{'_smoke' if args.smoke else ''}"
    meta = environment(device) | {"dtype": str(dtype).removeprefix("torch."), "batch": args.batch,
                                  "new_tokens": args.new_tokens, "pattern": cfg.layer_pattern}
    title = f"decode at long context: {cfg.preset or 'checkpoint'} on {meta['device']}"
    write_results(name, rows, meta, COLUMNS, out_dir=args.results_dir, title=title)
    plot([r for r in rows if r.get("decode_tokens_per_s") is not None], args.results_dir / f"{name}.png", title)
    print(f"wrote {args.results_dir / name}.json/.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
