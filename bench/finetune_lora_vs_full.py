"""LoRA vs full fine-tuning of one preset: tokens/s, peak memory and trainable parameters.

Both rows are `launch/finetune.py` runs (a world of one process: the pretraining Trainer, its DeepSpeed
engine under --ds-config, bf16 on CUDA) on the same records and the same randomly initialised checkpoint
of --preset (speed and memory do not depend on trained weights):
  - records: prompt/response pairs cut from Python standard-library sources (on every machine), long
    enough that every row is cut at seq_len + 1 tokens (no padding: the tokens counted are real ones);
  - tokenizer: sentencepiece trained here on the same text by the pipeline's own trainer (the data
    contract's special ids), or --tokenizer's folder (tokenizer.model + tokenizer.json, e.g. a curated
    run's: no datatrove needed), copied into the checkpoint;
  - checkpoint: HybridLM(--preset), bf16 safetensors bundle (half the bytes to write and read).
Columns (from each run's metrics.jsonl):
  tokens_per_s   median of tokens_per_s over the steps after the first --warmup (compile, autotune)
  step_s         median step time over the same steps
  peak_mem_gb    max over all steps of mem_gb (peak allocated device memory per step; CPU: peak RSS)
  trainable / total params, trainable_pct   full: every parameter; LoRA: r x (in + out) per targeted Linear
                 (train/lora.py's selection), over the base's parameters plus those
Writes <out>/<name>.{json,md}; --name defaults to finetune_lora_vs_full_<preset>[_smoke].

    python bench/finetune_lora_vs_full.py --preset 1.3b --out $OUT          # one H100 (needs peft)
    python bench/finetune_lora_vs_full.py --smoke --out /tmp/ft_smoke       # CPU: tiny preset, 3 steps
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from bench.common import environment, median, write_results  # noqa: E402
from config.recipe import TokenizerConfig  # noqa: E402
from config.schema import load_run_config  # noqa: E402
from model import HybridLM  # noqa: E402
from model.bundle import save_bundle  # noqa: E402
from train.lora import target_modules, trainable_fraction  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NAME = "finetune_lora_vs_full"
COLUMNS = ["method", "status", "tokens_per_s", "step_s", "peak_mem_gb", "trainable_params", "total_params",
           "trainable_pct", "final_loss"]


def stdlib_text(max_files: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if 8_000 < p.stat().st_size < 200_000)[:max_files]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def write_records(texts: list[str], seq_len: int, path: Path) -> int:
    """Prompt/response records of ~6 characters per wanted token (rows cut at seq_len + 1); the prompt is the
    first eighth. Returns the record count."""
    size = 6 * seq_len
    with path.open("w") as f:
        chunks = [t[i:i + size] for t in texts for i in range(0, len(t) - size, size)]
        for chunk in chunks:
            f.write(json.dumps({"prompt": chunk[: size // 8], "response": chunk[size // 8:]}) + "\n")
    return len(chunks)


def make_tokenizer(texts: list[str], folder: Path, given: Path | None) -> None:
    """tokenizer.model + tokenizer.json in `folder`: copied from `given`, or a 4096-piece sentencepiece trained
    on `texts` (the pipeline's trainer, which imports datatrove)."""
    folder.mkdir(parents=True, exist_ok=True)
    if given is not None:
        for name in ("tokenizer.model", "tokenizer.json"):
            if not (given / name).is_file():
                raise SystemExit(f"error: --tokenizer {given} has no {name}: pass a curated run's tokenizer folder")
            shutil.copyfile(given / name, folder / name)
        return
    from pipeline.spm_tokenizer import JSON_NAME, spm_to_hf, train_sentencepiece

    sample = folder / "tokenizer_text.txt"
    sample.write_text("\n".join(line for t in texts for line in t.splitlines() if line.strip()))
    model_file = train_sentencepiece(sample, folder / "tokenizer", TokenizerConfig(vocab_size=4096))
    spm_to_hf(model_file).save(str(folder / JSON_NAME))


def make_checkpoint(preset: str, texts: list[str], folder: Path, device: torch.device,
                    tokenizer: Path | None) -> HybridLM:
    """A random-init bf16 bundle of `preset` with make_tokenizer's tokenizer; the model is initialised on
    `device` (a 1.3B init is minutes on CPU) and returned on the CPU."""
    make_tokenizer(texts, folder, tokenizer)
    cfg = load_run_config(None, [f"model.preset={preset}"]).model
    torch.manual_seed(0)
    with device:
        model = HybridLM(cfg).to(torch.bfloat16)
    save_bundle(model, folder, folder / "checkpoint", {"source": "random init (bench)"})
    model = model.cpu()
    torch.cuda.empty_cache()  # the runs are other processes: leave them the whole device
    return model


def run_one(method: str, checkpoint: Path, data: Path, sets: list[str], out: Path) -> dict:
    cmd = [sys.executable, str(REPO / "launch" / "finetune.py"), "--checkpoint", str(checkpoint), "--data", str(data),
           "--resume", "none", "--set", f"finetune.method={method}", "--set", f"train.output_dir={out}",
           *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    print(proc.stdout[-2000:], proc.stderr[-2000:] if proc.returncode else "", sep="\n", flush=True)
    if proc.returncode != 0:
        return {"status": f"failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1][:200]}"}
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "tokens_per_s" in s]
    return {"status": "ok", "steps": steps}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=14, help="optimizer steps per run (one micro-batch each)")
    ap.add_argument("--warmup", type=int, default=4, help="first steps left out of the medians")
    ap.add_argument("--ds-config", default="ds_configs/zero2.json")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--targets", default="attention,mamba_in,mlp", help="finetune.lora.targets, comma-separated")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="folder with tokenizer.model + tokenizer.json (default: train one on the records' text)")
    ap.add_argument("--smoke", action="store_true", help="CPU check: tiny preset, short rows, 3 steps")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset, args.seq_len, args.micro_batch, args.steps, args.warmup = "tiny", 64, 2, 3, 1
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    targets = args.targets.split(",")
    sets = [f"train.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}",
            f"train.global_batch_tokens={args.seq_len * args.micro_batch}", f"train.max_steps={args.steps}",
            "train.warmup_steps=1", "train.eval_every=0", "train.save_every=0", "train.save_final=false",
            "train.log_every=1", f"train.ds_config={args.ds_config}", "train.wandb.mode=disabled",
            f"train.precision={'bf16' if cuda else 'fp32'}", "finetune.val_fraction=0",
            f"finetune.lora.r={args.lora_r}", f"finetune.lora.targets=[{','.join(targets)}]"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ft_bench_") as tmp:
        tmp = Path(tmp)
        texts = stdlib_text(60 if args.smoke else 200)
        model = make_checkpoint(args.preset, texts, tmp, device, args.tokenizer)
        n_records = write_records(texts, args.seq_len, tmp / "records.jsonl")
        base = trainable_fraction(model)[1]
        adapters = sum(args.lora_r * (lin.in_features + lin.out_features)
                       for lin in map(model.get_submodule, target_modules(model, targets)))
        for method in ("lora", "full"):
            trainable, total = (adapters, base + adapters) if method == "lora" else (base, base)
            result = run_one(method, tmp / "checkpoint", tmp / "records.jsonl", sets, tmp / f"run_{method}")
            row = {"method": method, "status": result["status"], "trainable_params": trainable, "total_params": total,
                   "trainable_pct": 100 * trainable / total}
            if result["status"] == "ok":
                timed = result["steps"][args.warmup:] or result["steps"]
                row |= {"tokens_per_s": median([s["tokens_per_s"] for s in timed]),
                        "step_s": median([s["step_time_s"] for s in timed]),
                        "peak_mem_gb": max(s["mem_gb"] for s in result["steps"]),
                        "final_loss": result["steps"][-1]["loss"]}
            rows.append(row)
            print(row, flush=True)
    meta = {**environment(device), "preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
            "steps": args.steps, "warmup": args.warmup, "ds_config": args.ds_config, "records": n_records,
            "lora": {"r": args.lora_r, "targets": targets}}
    name = args.name or f"{NAME}_{args.preset}{'_smoke' if args.smoke else ''}"
    path = write_results(name, rows, meta, COLUMNS, args.out,
                         title=f"LoRA vs full fine-tuning, {args.preset}, {args.micro_batch} x {args.seq_len} tokens/step")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
