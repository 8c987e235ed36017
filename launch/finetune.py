"""Fine-tune a checkpoint, full or LoRA, with DeepSpeed (docs/finetune.md).

    python launch/finetune.py --checkpoint CKPT --data FILE.jsonl [--config finetune_tiny] [--set finetune.method=full ...]
    deepspeed --num_gpus 8 launch/finetune.py --checkpoint CKPT --data FILE.jsonl [--resume auto|PATH|none]
    python launch/finetune.py --merge RUN/final --output DIR     # fold a LoRA adapter into its base: a bundle

Records are {"text": ...} or {"prompt": ..., "response": ...} (loss on the response only). The run
config is --config (fine-tuning settings, default config/runs/finetune_tiny.yaml) with the checkpoint's
model section, then --set overrides. Bad input ends with a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

# run as a script: the repo's packages first (launch/ would otherwise shadow the `export` package)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.pretrain import add_run_flags  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="the checkpoint to fine-tune: a bundle or a Hugging Face folder")
    p.add_argument("--data", help="JSON-lines training records (sets finetune.data)")
    p.add_argument("--config", default="finetune_tiny", help="run config: a YAML path or a name in config/runs/")
    p.add_argument("--tokenizer", help="a tokenizer.json the data is meant for: checked against the checkpoint's")
    p.add_argument("--merge", metavar="ADAPTER_DIR",
                   help="instead of training: fold this LoRA adapter into its base checkpoint, write --output and stop")
    p.add_argument("--output", metavar="DIR", help="folder --merge writes (a bundle)")
    add_run_flags(p)
    args = p.parse_args(argv)
    if args.merge is None and (args.checkpoint is None or args.data is None):
        p.error("--checkpoint and --data are required (or --merge ADAPTER_DIR --output DIR)")
    if args.merge is not None and args.output is None:
        p.error("--merge needs --output DIR")
    return args


def main(argv: list[str] | None = None) -> None:
    from config.console import quiet_libraries
    from train.distributed import env_rank, fail_loudly
    from train.errors import user_errors

    args = parse_args(argv)
    quiet_libraries(args.verbose, env_rank()[0])

    def finetune() -> None:
        from train.finetune import FinetuneTrainer, merge_adapter, run_config

        if args.merge is not None:
            print(f"merged {merge_adapter(args.merge, args.output, args.checkpoint, args.force)}")
            return
        from train.trainer import run

        cfg = run_config(args.checkpoint, args.data, args.config, args.overrides)
        run(cfg, args.resume, args.dry_run, args.force, make=partial(FinetuneTrainer, tokenizer=args.tokenizer))

    fail_loudly(finetune, user_errors())


if __name__ == "__main__":
    main()
