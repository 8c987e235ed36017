"""Evaluation throughput: our lm-eval backend ("hybrid") vs lm-eval's `hf` backend on the same weights.

Workload: the shipped local multiple-choice task (eval/tasks/local_mc), by default with `--docs`
generated documents whose contexts are `--context-tokens` tokens of Python standard-library text
and whose 4 choices are short text pieces (so batches hold real lengths, and no two requests are
identical: lm-eval shares one forward between requests with equal context + continuation[:-1]).
  loglikelihood    every request of the task (docs x 4), requests/s
  generate_until   `--gen-prompts` of the task's prompts, `--gen-tokens` new tokens each, no stop
                   string, tokens/s (generated text re-tokenized, the same count for both backends)
Each backend runs one untimed warm-up pass over a few requests first (allocator, CUDA kernels,
Triton autotune), then the timed passes.

Backends:
  hybrid   eval/lm_backend.py: batches by length, scores only continuation positions, cached decoding
           with eager steps (model arg cuda_graph=false)
  hybrid_graph  the same with cuda_graph=true (generate_until decodes through CUDA graphs; CUDA only;
           the backend's default on CUDA): `same_text_vs_hybrid` is the share of its generated texts
           equal to the eager backend's
  hf       lm_eval.models.huggingface.HFLM on transformers' BambaForCausalLM holding the same weights
           (built in memory by the exporter, export/hf.py); skipped, with the reason in the results,
           when the config cannot be expressed as Bamba or a package is missing (HFLM imports
           `accelerate`; Bamba's fast path needs mamba_ssm + causal_conv1d, as ours does).

Weights: `--checkpoint` (a consolidated bundle) or random weights of `--preset` with a byte-level
BPE trained on standard-library text (speed does not depend on the values).

    python bench/eval_throughput.py --preset 1.3b --docs 500 --context-tokens 256    # GPU, bf16
    python bench/eval_throughput.py --smoke                                          # CPU plumbing check

Writes bench/results/eval_throughput_<name>.{json,md} (device, date, command included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task data is local; nothing to fetch
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from bench.common import environment, sync, write_results  # noqa: E402
from model import HybridLM, ModelConfig  # noqa: E402
from model.bundle import save_bundle  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LOCAL_MC = REPO / "eval" / "tasks" / "local_mc"
COLUMNS = ["backend", "request_type", "requests", "batch_size", "seconds", "requests_per_s", "tokens_per_s",
           "speedup_vs_hf", "max_abs_logprob_diff_vs_hybrid", "same_text_vs_hybrid", "note"]


def stdlib_text(max_chars: int) -> str:
    """Python standard-library sources, sorted (deterministic text present on every machine)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, n = [], 0
    for p in sorted(root.glob("*.py")):
        out.append(p.read_text(encoding="utf-8", errors="replace"))
        n += len(out[-1])
        if n >= max_chars:
            break
    return "".join(out)[:max_chars]


def train_tokenizer(out_dir: Path, vocab_size: int) -> Path:
    """Byte-level BPE (tokenizer.json) with <pad>=0 <s>=1 </s>=2 <unk>=3 on standard-library text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([stdlib_text(4_000_000)], trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    return out_dir


def random_bundle(preset: str, work: Path) -> Path:
    """A consolidated bundle of random weights of `preset` and a fitting tokenizer."""
    torch.manual_seed(0)
    cfg = ModelConfig(preset=preset)
    tok_dir = train_tokenizer(work / "tokenizer", min(cfg.vocab_size, 32000))
    return save_bundle(HybridLM(cfg), tok_dir, work / "bundle", meta={"step": 0, "note": "random weights"})


def task_folder(work: Path, tokenizer, docs: int, context_tokens: int) -> Path:
    """eval/tasks/local_mc, with `docs` generated test documents unless docs == 0 (shipped data)."""
    folder = work / "tasks" / "local_mc"
    shutil.copytree(LOCAL_MC, folder)
    if docs:
        ids = tokenizer.encode(stdlib_text(docs * (context_tokens + 40) * 6))
        step = context_tokens + 40
        with (folder / "test.jsonl").open("w") as fh:
            for i in range(docs):
                chunk = ids[i * step:(i + 1) * step]
                if len(chunk) < step:
                    raise SystemExit(f"not enough text for {docs} documents of {context_tokens} tokens")
                choices = [tokenizer.decode(chunk[context_tokens + 10 * k: context_tokens + 10 * (k + 1)])
                           for k in range(4)]
                fh.write(json.dumps({"question": tokenizer.decode(chunk[:context_tokens]), "choices": choices,
                                     "answer": i % 4}) + "\n")
    return folder.parent


def build_requests(tasks_dir: Path, gen_prompts: int, gen_tokens: int) -> tuple[list, list]:
    """(loglikelihood Instances of the task, generate_until Instances on its first prompts)."""
    from lm_eval.api.instance import Instance

    from eval.benchmarks import build_task_manager, load_tasks

    manager = build_task_manager(["local_mc"], tasks_dir)
    (task,) = load_tasks(manager, ["local_mc"], allow_code_execution=False)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    ll = list(task.instances)
    contexts = list(dict.fromkeys(inst.args[0] for inst in ll))[:gen_prompts]
    kwargs = {"until": [], "max_gen_toks": gen_tokens, "do_sample": False}
    gen = [Instance("generate_until", {}, (c, dict(kwargs)), i) for i, c in enumerate(contexts)]
    return ll, gen


def timed(fn, device: torch.device) -> tuple[object, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def measure(name: str, lm, ll: list, gen: list, tokenizer, batch_size: int, device: torch.device,
            warmup: int) -> tuple[list[dict], list[float], list[str]]:
    """Rows for loglikelihood and generate_until; the loglikelihood values and generated texts (for
    agreement)."""
    lm.loglikelihood(ll[:warmup], disable_tqdm=True)  # untimed warm-up
    lm.generate_until(gen[:max(1, warmup // 4)], disable_tqdm=True)
    scores, t_ll = timed(lambda: lm.loglikelihood(ll, disable_tqdm=True), device)
    texts, t_gen = timed(lambda: lm.generate_until(gen, disable_tqdm=True), device)
    new_tokens = sum(len(tokenizer.encode(t)) for t in texts)
    base = {"backend": name, "batch_size": batch_size}
    rows = [
        base | {"request_type": "loglikelihood", "requests": len(ll), "seconds": t_ll, "requests_per_s": len(ll) / t_ll},
        base | {"request_type": "generate_until", "requests": len(gen), "seconds": t_gen,
                "requests_per_s": len(gen) / t_gen, "tokens_per_s": new_tokens / t_gen},
    ]
    return rows, [s for s, _ in scores], texts


def hf_backend(lm, batch_size: int):
    """lm-eval's HFLM on the exporter's BambaForCausalLM of the same weights, or (None, reason)."""
    try:
        from lm_eval.models.huggingface import HFLM

        from bench.decode_throughput import build_hf
        from export.hf import check_exportable

        check_exportable(lm.model.cfg)
        hf = build_hf(lm.model)
    except Exception as exc:  # noqa: BLE001  (any reason the comparison cannot run is reported, not fatal)
        return None, f"hf backend skipped: {type(exc).__name__}: {exc}"
    return HFLM(pretrained=hf, tokenizer=lm.tokenizer, batch_size=batch_size, max_length=lm.max_length,
                prefix_token_id=lm.prefix_token_id), "transformers BambaForCausalLM (export/hf.py)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="consolidated bundle (default: random weights of --preset)")
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--docs", type=int, default=500, help="generated MC documents (0: the shipped 16)")
    ap.add_argument("--context-tokens", type=int, default=256)
    ap.add_argument("--gen-prompts", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=16, help="requests in the untimed warm-up pass")
    ap.add_argument("--backends", default="hybrid,hf", help="comma-separated, of hybrid, hybrid_graph, hf")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="model dtype (default bfloat16 on CUDA, float32 on CPU); float32 separates the graphed "
                         "decode's arithmetic from bf16 rounding in same_text_vs_hybrid")
    ap.add_argument("--smoke", action="store_true", help="CPU check: tiny preset, shipped task, 4 prompts x 8 tokens")
    ap.add_argument("--out", help="result name under bench/results (default eval_throughput_<preset>)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset, args.docs, args.gen_prompts, args.gen_tokens, args.batch_size, args.warmup = "tiny", 0, 4, 8, 8, 4
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")

    from eval.lm_backend import HybridEvalLM

    with tempfile.TemporaryDirectory(prefix="eval_throughput_") as tmp:
        work = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_bundle(args.preset, work)
        ours = HybridEvalLM(checkpoint, device=str(device), dtype=dtype, batch_size=args.batch_size,
                            cuda_graph=False)
        ll, gen = build_requests(task_folder(work, ours.tokenizer, args.docs, args.context_tokens),
                                 args.gen_prompts, args.gen_tokens)
        rows, reference, reference_texts = [], None, None
        for name in args.backends.split(","):
            if name == "hybrid":
                lm, note = ours, f"model impl {ours.model.impl}"
            elif name == "hybrid_graph":  # the same backend, generate_until decoding through CUDA graphs
                lm = HybridEvalLM(checkpoint, device=str(device), dtype=dtype, batch_size=args.batch_size,
                                  cuda_graph=True)
                note = f"model impl {lm.model.impl}, cuda_graph"
            elif name == "hf":
                lm, note = hf_backend(ours, args.batch_size)
            else:
                raise SystemExit(f"unknown backend {name} (hybrid, hybrid_graph, hf)")
            if lm is None:
                rows.append({"backend": name, "note": note})
                print(note, flush=True)
                continue
            got, scores, texts = measure(name, lm, ll, gen, ours.tokenizer, args.batch_size, device, args.warmup)
            if name == "hybrid":
                reference, reference_texts = scores, texts
            elif reference is not None:
                got[0]["max_abs_logprob_diff_vs_hybrid"] = max(abs(a - b) for a, b in zip(scores, reference))
                got[1]["same_text_vs_hybrid"] = sum(a == b for a, b in zip(texts, reference_texts)) / len(texts)
            for row in got:
                row["note"] = note
                print(row, flush=True)
            rows += got
    by = {(r["backend"], r.get("request_type")): r for r in rows}
    for (backend, kind), row in by.items():
        hf_row = by.get(("hf", kind))
        if backend == "hybrid" and hf_row and "requests_per_s" in hf_row:
            row["speedup_vs_hf"] = row["requests_per_s"] / hf_row["requests_per_s"]
    cfg = ours.model.cfg
    name = args.out or f"eval_throughput_{'checkpoint' if args.checkpoint else args.preset}{'_smoke' if args.smoke else ''}"
    meta = environment(device) | {"dtype": dtype, "pattern": cfg.layer_pattern, "docs": args.docs or 16,
                                  "context_tokens": args.context_tokens if args.docs else "shipped task",
                                  "gen_prompts": len(gen), "gen_tokens": args.gen_tokens}
    path = write_results(name, rows, meta, COLUMNS, title=f"lm-eval throughput on {meta['device']}")
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
