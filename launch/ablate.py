"""Train variants of one run config on the same data, one after another, and compare them (docs/experiments.md).

    python launch/ablate.py --config small --variants config/ablations/patterns.yaml --tokens 50000000 \\
        --seeds 1,2 --output outputs/ablation_small --set data.manifest=PATH/manifest.json [--eval] [--gpus N]

Each variant x seed trains through launch/pretrain.py (experiments/ablation.py); a finished one is
skipped, an interrupted one resumes. OUTPUT/report.md, report.json, loss.png and throughput_memory.png
are rewritten after the runs, and when a run stops early (experiments/report.py). Every run config is
validated first: bad input (the variants file, a key, the token budget) ends with one line and exit code 2,
before any training.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first


def seed_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="base run config: a YAML path or a name in config/runs/")
    p.add_argument("--variants", required=True, type=Path, help="variants YAML (experiments/ablation.py)")
    p.add_argument("--tokens", required=True, type=int, help="training tokens per run (rounded down to whole steps)")
    p.add_argument("--seeds", type=seed_list, help="comma-separated train.seed values (default: the config's)")
    p.add_argument("--output", required=True, type=Path, help="folder of the runs and the report")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base config key for every variant (repeatable)")
    p.add_argument("--gpus", type=int, default=1,
                   help="processes per run: 1 = one process; N > 1 = the DeepSpeed launcher with N GPUs")
    p.add_argument("--only", type=lambda t: t.split(","), metavar="NAME[,NAME]",
                   help="train only these variants now; the report still covers every variant (those not run yet "
                   "are marked unfinished): split an ablation over several machines or sessions")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing, only write the report from the run folders under --output (restored from "
                   "the files `bench/run.sh ablation:*` brings back); the curated data need not be here")
    p.add_argument("--eval", action="store_true",
                   help="evaluate each final export with eval/run.py (the run config's eval section, --set eval.*)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from config.loader import ConfigError
    from config.manifest import ManifestError
    from experiments.ablation import check_same_data, load_variants, plan, train
    from experiments.report import write_report

    args = parse_args(argv)
    try:
        if args.gpus < 1:
            raise ConfigError(f"--gpus must be >= 1, got {args.gpus}")
        specs = load_variants(args.variants)
        unknown = sorted(set(args.only or []) - {v.name for v in specs})
        if unknown:
            raise ConfigError(f"--only {unknown[0]}: no such variant in {args.variants} "
                              f"({', '.join(v.name for v in specs)})")
        runs = plan(args.config, args.overrides, specs, args.seeds, args.tokens, args.output,
                    check_data=not args.report_only)
        check_same_data(runs)
    except (ConfigError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "launch/ablate.py", *(sys.argv[1:] if argv is None else argv)])
    budget = runs[0].cfg.train.max_steps * runs[0].cfg.train.global_batch_tokens
    if args.report_only:
        print(f"report: {write_report(runs, budget, args.output, command)}")
        return 0
    for i, run in enumerate(runs, 1):
        head = f"[{i}/{len(runs)}] {run.variant} seed {run.seed} ({run.out})"
        if args.only and run.variant not in args.only:
            print(f"{head}: not in --only, left for another call", flush=True)
            continue
        if run.finished:
            print(f"{head}: finished, skipped", flush=True)
        else:
            print(f"{head}: training", flush=True)
            rc = train(args.config, args.overrides, run, args.gpus)
            if rc != 0 or not run.finished:
                why = f"failed (exit code {rc})" if rc else "stopped before its last step"
                # the report so far (unfinished runs marked): a job cut by its time limit still leaves one
                write_report(runs, budget, args.output, command)
                print(f"error: {run.variant} seed {run.seed} {why}: see {run.out}/launch.log; rerun the same "
                      "command to resume", file=sys.stderr)
                return rc or 1
        if args.eval and not (run.out / "final" / "eval_results.json").is_file():
            from eval.run import main as evaluate

            rc = evaluate(["--checkpoint", str(run.out / "final")])
            if rc:
                return rc
    print(f"report: {write_report(runs, budget, args.output, command)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
