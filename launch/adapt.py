"""The hybrid wrapper of a pretrained transformer: train the added Mamba2 paths, or generate with them.

    python launch/adapt.py --base HF_DIR --data DATA --output OUT [--config RUN.yaml] [--set adapt.layers=4 ...]
    deepspeed --num_gpus 8 launch/adapt.py --base HF_DIR --data DATA --output OUT [--resume auto|PATH|none]
    python launch/adapt.py --adapter OUT --prompt "def main():" [--max-new-tokens 64] [--base HF_DIR]

Training: the base (a local Llama / Qwen2/3 / Gemma folder) is frozen; its top adapt.layers decoder layers
each gain a Mamba2 path, a per-channel gate (zero at init) and an optional memory bank (adapt.* in
config/sections.py; DATA is a curation manifest.json or a .jsonl file of {"text": ...} records). The run is
the pretraining Trainer's (adapt/training.py): the DeepSpeed engine over the added parameters only, train.*
settings (run config: the schema's defaults <- --config <- the flags <- --set; no model section: the
architecture is the base's), checkpoints and --resume, metrics.jsonl and the eval loss. OUT
(train.output_dir) gets checkpoints/, metrics.jsonl and final/: only the added weights
(adapter.safetensors), adapter_config.json (naming the base folder), run_config.yaml and adapt_report.json
(the trainable fraction, first and last loss). Generation: greedy (or --temperature) continuation of each
--prompt with the saved wrapper (OUT or OUT/final), decoded with the base's KV cache plus the Mamba2 states.
Errors are one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from config.console import quiet_libraries  # noqa: E402
from config.loader import ConfigError  # noqa: E402
from export.loading import cli_errors  # noqa: E402
from launch.pretrain import add_run_flags  # noqa: E402

if TYPE_CHECKING:
    from config.schema import RunConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="Hugging Face folder of the base transformer (sets adapt.base)")
    p.add_argument("--data", help="manifest.json or a .jsonl file of {\"text\": ...} records (sets adapt.data)")
    p.add_argument("--output", help="output folder (sets train.output_dir)")
    p.add_argument("--config", help="run config (train.*, adapt.*): a YAML path or a name in config/runs/")
    p.add_argument("--adapter", type=Path, help="instead of training: generate with this saved wrapper")
    p.add_argument("--prompt", action="append", default=[], help="prompt text for --adapter (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    add_run_flags(p)
    return p.parse_args(argv)


def run_config(args: argparse.Namespace) -> RunConfig:
    """--config <- adapt.base, adapt.data and train.output_dir from --base, --data and --output <- --set."""
    from config.loader import apply_overrides, read_yaml, validate
    from config.schema import RunConfig, resolve_run_path

    flags = [f"adapt.base={args.base}"] if args.base else []
    flags += [f"adapt.data={args.data}"] if args.data else []
    flags += [f"train.output_dir={args.output}"] if args.output else []
    data = apply_overrides(read_yaml(resolve_run_path(args.config)) if args.config else {}, [*flags, *args.overrides])
    adapt = data.get("adapt")
    if not (isinstance(adapt, dict) and adapt.get("base")):  # else the schema would ask for a model section
        raise ConfigError("adapt.base is not set: pass --base HF_DIR (a local Hugging Face model folder)")
    return validate(RunConfig, data)


def train(args: argparse.Namespace) -> NoReturn:
    from train.distributed import env_rank, fail_loudly
    from train.errors import user_errors

    quiet_libraries(args.verbose, env_rank()[0])

    def adapt() -> None:
        from adapt.training import AdaptTrainer
        from train.trainer import run

        run(run_config(args), args.resume, args.dry_run, args.force, make=AdaptTrainer)

    fail_loudly(adapt, user_errors())


def generate_text(args: argparse.Namespace) -> dict:
    from adapt.wrapper import load_adapted, load_tokenizer
    from model.generation import SamplingParams, generate

    if not args.prompt:
        raise ConfigError("--adapter generates from --prompt TEXT: pass at least one")
    model = load_adapted(args.adapter, args.base)
    tok = load_tokenizer(model.base_folder)
    prompts = [tok(p, add_special_tokens=False).input_ids for p in args.prompt]
    if not all(prompts):
        raise ConfigError("a --prompt is empty after tokenization: pass some text")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=0)
    rows = generate(model, prompts, params, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id or 0, cuda_graph=False)
    return {"completions": [tok.decode(r) for r in rows]}


@cli_errors
def generate_main(args: argparse.Namespace) -> int:
    quiet_libraries(args.verbose)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(generate_text(args), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int | None:
    """Generation returns its exit code; training ends the process (train.distributed.fail_loudly)."""
    args = parse_args(argv)
    if args.adapter:
        return generate_main(args)
    train(args)
    return None


if __name__ == "__main__":
    sys.exit(main())
