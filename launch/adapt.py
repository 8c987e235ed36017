"""The hybrid wrapper of a pretrained transformer: train the added Mamba2 paths, or generate with them.

    python launch/adapt.py --base HF_DIR --data DATA --output OUT [--config RUN.yaml] [--set adapt.layers=4 ...]
    python launch/adapt.py --adapter OUT --prompt "def main():" [--max-new-tokens 64] [--base HF_DIR]

Training: the base (a local Llama / Qwen2/3 / Gemma folder) is frozen; its top adapt.layers decoder layers
each gain a Mamba2 path, a per-channel gate (zero at init) and an optional memory bank (adapt.* and train.*
in config/sections.py; DATA is a curation manifest.json or a .jsonl file of {"text": ...} records). OUT gets
only the added weights (adapter.safetensors), adapter_config.json (naming the base folder),
run_config.yaml, metrics.jsonl and adapt_report.json (the trainable fraction, first and last loss). OUT is
written into a temporary folder and renamed into place at the end; an OUT that holds files is replaced only
with --force. Generation: greedy (or --temperature) continuation of each --prompt with the saved wrapper,
decoded with the base's KV cache plus the Mamba2 states. Errors are one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from config.console import quiet_libraries  # noqa: E402
from config.loader import ConfigError  # noqa: E402
from export.loading import cli_errors  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="Hugging Face folder of the base transformer (sets adapt.base)")
    p.add_argument("--data", help="manifest.json or a .jsonl file of {\"text\": ...} records (sets adapt.data)")
    p.add_argument("--output", type=Path, help="output folder (default: train.output_dir)")
    p.add_argument("--force", action="store_true", help="replace an OUTPUT folder that holds files")
    p.add_argument("--adapter", type=Path, help="instead of training: generate with this saved wrapper")
    p.add_argument("--prompt", action="append", default=[], help="prompt text for --adapter (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--config", help="run config YAML with adapt and train sections")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--verbose", action="store_true", help="print the libraries' notices too")
    return p.parse_args(argv)


def train(args: argparse.Namespace) -> dict:
    from adapt.data import training_windows
    from adapt.training import train_added
    from adapt.wrapper import wrap
    from config.atomic import atomic_write_bytes, atomic_write_json, staged_dir
    from config.loader import dump_yaml, load
    from config.schema import AdaptRunConfig
    from train.errors import TrainingError

    overrides = list(args.overrides)
    overrides += [f"adapt.base={args.base}"] if args.base else []
    overrides += [f"adapt.data={args.data}"] if args.data else []
    cfg = load(AdaptRunConfig, args.config, overrides)
    if cfg.adapt.base is None or cfg.adapt.data is None:
        raise ConfigError("adapt.base and adapt.data are required: pass --base HF_DIR and --data DATA")
    out = args.output or Path(cfg.train.output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise ConfigError(f"output {out} exists and is not empty: pass --force to replace it, or another --output")
    from transformers import AutoTokenizer

    base = Path(cfg.adapt.base)
    model = wrap(base, cfg.adapt)
    sample = training_windows(cfg.adapt.data, base, AutoTokenizer.from_pretrained(str(base)), cfg.train.seq_len)
    added, total = model.trainable_fraction()
    logging.info("trainable: %d of %d parameters (%.3f%%)", added, total, 100 * added / total)
    try:
        records = train_added(model, sample, cfg.train)
    except TrainingError as exc:
        raise ConfigError(str(exc)) from None
    report = {"trainable parameters": added, "all parameters": total, "trainable fraction": added / total,
              "adapted layers": model.layer_indices, "steps": len(records),
              "first loss": records[0]["loss"], "last loss": records[-1]["loss"]}
    with staged_dir(out) as tmp:
        model.save_added(tmp)
        atomic_write_bytes(tmp / "run_config.yaml", dump_yaml(cfg).encode())
        atomic_write_bytes(tmp / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
        atomic_write_json(tmp / "adapt_report.json", report)
    return {"output": str(out), **report}


def generate_text(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from adapt.wrapper import load_adapted
    from model.generation import SamplingParams, generate

    if not args.prompt:
        raise ConfigError("--adapter generates from --prompt TEXT: pass at least one")
    model = load_adapted(args.adapter, args.base)
    tok = AutoTokenizer.from_pretrained(str(model.base_folder))
    prompts = [tok(p, add_special_tokens=False).input_ids for p in args.prompt]
    if not all(prompts):
        raise ConfigError("a --prompt is empty after tokenization: pass some text")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=0)
    rows = generate(model, prompts, params, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id or 0, cuda_graph=False)
    return {"completions": [tok.decode(r) for r in rows]}


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries(args.verbose)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = generate_text(args) if args.adapter else train(args)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
