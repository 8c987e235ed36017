"""Pretrain a hybrid Mamba2/attention LM with DeepSpeed (docs/pretraining.md).

    deepspeed --num_gpus 8 launch/pretrain.py --config 1.3b [--set train.lr=2e-4 ...] [--resume auto|PATH|none]
    torchrun --nproc_per_node 8 launch/pretrain.py --config 1.3b
    deepspeed --num_gpus 2 launch/pretrain.py --config tiny            # CPU: two gloo processes
    python launch/pretrain.py --config tiny --dry-run                  # build everything, then stop
    python launch/pretrain.py --config tiny --export auto              # consolidate a saved checkpoint

Bad input (config key, manifest, shard, checkpoint) ends with a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# run as a script: the repo's packages first (launch/ would otherwise shadow the `export` package)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags of a training run (pretraining and fine-tuning): overrides, resume, dry run, force, verbosity."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. train.lr=1e-3 (repeatable)")
    p.add_argument("--resume", default="auto",
                   help="auto: newest complete checkpoint of train.output_dir (or a fresh start); none: fresh "
                        "start; PATH: a step folder or a folder of them")
    p.add_argument("--dry-run", action="store_true",
                   help="build config, data, model and engine, then stop; writes nothing (no checkpoint is converted "
                        "or loaded: it names the one a run would resume from)")
    p.add_argument("--force", action="store_true",
                   help="let --resume none start over in a folder that holds a run, and --export (or a merge) replace "
                        "an existing destination (both refuse otherwise)")
    p.add_argument("--verbose", action="store_true",
                   help="print the libraries' notices and every rank's warnings too (rank 0's by default)")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config: a YAML path or a name in config/runs/")
    p.add_argument("--export", metavar="CHECKPOINT",
                   help="instead of training: write the consolidated weights of a saved checkpoint "
                        "(a step folder, or auto for the newest) and stop")
    p.add_argument("--export-to", metavar="DIR", help="folder for --export (default <output_dir>/exports/<step>)")
    add_run_flags(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from config.console import quiet_libraries
    from train.distributed import env_rank, fail_loudly
    from train.errors import user_errors

    args = parse_args(argv)
    quiet_libraries(args.verbose, env_rank()[0])

    def pretrain() -> None:
        from config.schema import load_run_config

        cfg = load_run_config(args.config, args.overrides)
        if not args.export:
            from train.plan import preflight

            preflight(cfg)  # CUDA: stop before the start-up when the estimate exceeds the GPU
        from train.trainer import export_checkpoint, run

        if args.export:
            print(f"exported {export_checkpoint(cfg, args.export, args.export_to, args.force)}")
        else:
            run(cfg, args.resume, args.dry_run, args.force)

    fail_loudly(pretrain, user_errors())


if __name__ == "__main__":
    main()
