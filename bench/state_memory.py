"""The hybrid variants of part 2 on one GPU: training speed and memory, and decoding state and speed by context.

Variants (config/ablations/variants2.yaml's, each at the preset's parameter count through
model/variants.match_ffn, as the ablation runner trains them):
  strategic      the preset's own strategic hybrid
  hierarchical   every Mamba2 block an `H` block (slow per-span state, model/mixers/hierarchical.py)
  bridges        strategic + model.bridges (model/bridges.py)
  compression2/4 strategic + model.mamba.state_compression 2 / 4 (model/state_compression.py)

Training: forward+backward of the whole model at `--batch` x `--seq-len` (bench/fwd_bwd_throughput.py's
measure: bf16, kernel path, no optimizer): tokens/s and peak memory.
Decoding: for every context in `--contexts` a random prompt is prefilled, then `--new-tokens` greedy steps
are timed (bench/decode_throughput.py's measure, eager steps): decode tokens/s, the whole decoding state
(`state_mb`: KV caches + conv + recurrent states) and the Mamba2 recurrent states alone (`ssm_state_mb`,
what state_compression shrinks; H's slow state is counted in state_mb).

    python bench/state_memory.py --preset small --out $OUT     # GPU
    python bench/state_memory.py --smoke --out /tmp/x          # CPU plumbing check on the tiny preset
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from bench.common import add_run_options, bench_model, environment, median, write_results  # noqa: E402
from bench.decode_throughput import OursRunner  # noqa: E402
from bench.decode_throughput import measure as measure_decode  # noqa: E402
from bench.fwd_bwd_throughput import measure as measure_training  # noqa: E402
from model import ModelConfig  # noqa: E402
from model.cache import HybridCache, MambaState  # noqa: E402
from model.sizing import count_params  # noqa: E402
from model.variants import VARIANTS, match_ffn  # noqa: E402

COLUMNS = ["part", "variant", "pattern", "params", "batch", "seq_len", "context", "impl", "tokens_per_s",
           "tokens_per_s_spread", "peak_mem_gb", "decode_tokens_per_s", "decode_tokens_per_s_spread", "prefill_s",
           "state_mb", "ssm_state_mb"]


def variants(base: ModelConfig) -> dict[str, ModelConfig]:
    """The five configs, each matched to the base's parameter count."""
    strategic = VARIANTS["strategic"].apply(base)
    raw = {  # the baseline first, then the variant whose claim is a memory factor (a run cut short keeps them)
        "strategic": strategic,
        **{f"compression{f}": strategic.model_copy(
            update={"mamba": strategic.mamba.model_copy(update={"state_compression": f})}) for f in (4, 2)},
        "hierarchical": VARIANTS["hierarchical"].apply(base),
        "bridges": strategic.model_copy(update={"bridges": True}),
    }
    target = count_params(base)
    return {name: match_ffn(ModelConfig.model_validate(cfg.model_dump()), target) for name, cfg in raw.items()}


def recurrent_bytes(cache: HybridCache) -> int:
    """Bytes of the Mamba2 recurrent states of every layer (also those inside R, G and H blocks)."""
    states = [st if isinstance(st, MambaState) else getattr(st, "ssm", None) for st in cache.layers]
    return sum(s.ssm.numel() * s.ssm.element_size() for s in states if isinstance(s, MambaState))


def spread(values: list[float]) -> float:
    """(max - min) / median of one measurement over the rounds: the noise band a difference must exceed."""
    return (max(values) - min(values)) / median(values) if len(values) > 1 else 0.0


def summarize(runs: dict[tuple, list[dict]], key: str) -> list[dict]:
    """One row per (part, variant, context): the round whose `key` is the median (the upper middle one for an
    even count), with the spread over rounds."""
    rows = []
    for round_rows in runs.values():
        ok = [r for r in round_rows if key in r]
        if not ok:
            rows.append(round_rows[-1])  # every round failed: the last error row
            continue
        ok.sort(key=lambda r: r[key])
        rows.append(ok[len(ok) // 2] | {"rounds": len(ok), f"{key}_spread": spread([r[key] for r in ok])})
    return rows


def measure_variant(name: str, cfg: ModelConfig, args: argparse.Namespace, contexts: list[int],
                    device: torch.device) -> list[dict]:
    """One round of one variant: its training row, then a decode row per context (an error is a row)."""
    head = {"variant": name, "pattern": cfg.layer_pattern, "params": count_params(cfg)}
    try:
        row = measure_training(cfg, args.batch, args.seq_len, False, False, device, args.iters)
        row = {"part": "training", **head} | row | {"preset": args.preset}  # matched configs name no preset
    except Exception as exc:  # an OOM or a kernel failure is a row, not the end of the run
        row = {"part": "training", **head, "impl": f"{type(exc).__name__}: {exc}"[:200]}
    rows = [row]
    model = bench_model(cfg, device).eval()
    runner = OursRunner(model)
    for ctx in contexts:
        ids = torch.randint(0, cfg.vocab_size, (1, ctx), device=device)
        try:
            row = {"part": "decode", **head, "impl": model.impl}
            row |= measure_decode(name, runner, ids, args.new_tokens, device)[0]
            row["ssm_state_mb"] = recurrent_bytes(runner.cache) / 2**20
            del row["model"]
        except Exception as exc:
            row = {"part": "decode", **head, "context": ctx, "impl": f"{type(exc).__name__}: {exc}"[:200]}
        runner.cache = None
        rows.append(row)
    del model, runner
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768", help="comma-separated prompt lengths")
    ap.add_argument("--new-tokens", type=int, default=64, help="timed decode steps per context")
    ap.add_argument("--rounds", type=int, default=3,
                    help="times every variant is measured, round-robin (the median round is reported)")
    add_run_options(ap, iters=10)
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        # 128 tokens: two of the tiny preset's 64-token spans, so H's slow state is trained
        args.preset, args.seq_len, args.batch, args.contexts, args.new_tokens, args.iters = "tiny", 128, 1, "64", 2, 1
        args.rounds = min(args.rounds, 2)
    base = ModelConfig(preset=args.preset)
    contexts = [int(c) for c in args.contexts.split(",")]
    out_name = (args.name or f"state_memory_{args.preset}") + ("_smoke" if args.smoke else "")
    configs = variants(base)
    runs: dict[tuple, list[dict]] = {}
    # Round-robin rather than one variant after another: the first variant measured pays for the process's
    # warm-up (kernel autotuning, allocator growth, clocks), and drift over the run lands on every variant
    # alike; the spread over rounds says which differences are noise.
    for _ in range(args.rounds):
        for name, cfg in configs.items():
            for row in measure_variant(name, cfg, args, contexts, device):
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
                runs.setdefault((row["part"], name, row.get("context")), []).append(row)
        # after every round: a run cut short by its time limit keeps the rounds it finished
        rows = summarize({k: v for k, v in runs.items() if k[0] == "training"}, "tokens_per_s") + \
            summarize({k: v for k, v in runs.items() if k[0] == "decode"}, "decode_tokens_per_s")
        write_results(out_name, rows, environment(device) | {"preset": args.preset, "rounds": args.rounds},
                      COLUMNS, args.out,
                      title=f"Hybrid variants part 2: training and decoding memory and speed ({args.preset})")


if __name__ == "__main__":
    main()
