"""Curate a recipe into token shards + manifest.json (the format pretraining reads).

    python pipeline/curate.py --recipe embedded                       # local, small, CPU
    python pipeline/curate.py --recipe production_100b --executor slurm
    python pipeline/curate.py --recipe production_100b --data-root /mirrors   # hub sources from local mirrors

Stages and outputs: pipeline/stages.py and docs/curation.md. Rerunning the same command resumes.
Bad input (recipe key, missing path, unreachable source, unavailable eval set) exits 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", required=True, help="Recipe name in data_recipes/ (no .yaml) or a YAML path.")
    p.add_argument("--output", help="Output folder (default: outputs/<recipe name>).")
    p.add_argument("--executor", choices=["local", "slurm", "ray"], default="local")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="Local executor: tasks run at once (default: CPU cores).")
    p.add_argument("--limit-docs", type=int, help="Read at most N documents per source (quick runs).")
    p.add_argument("--data-root", help="Folder of local hub mirrors: DIR/<hub_id>/ (see docs/curation.md).")
    p.add_argument("--verbose", action="store_true",
                   help="print datatrove's per-task lines and stats too (always in work/logs/<stage>/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override a recipe key, e.g. --set output.validation_fraction=0.02 (repeatable).")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from config.console import quiet_libraries

    quiet_libraries(args.verbose)
    from config.loader import ConfigError
    from config.recipe import load_recipe
    from pipeline.errors import CurationError

    try:
        recipe, base_dir = load_recipe(args.recipe, args.overrides)
        if args.limit_docs is not None:
            if args.limit_docs < 1:
                raise ConfigError(f"--limit-docs must be >= 1, got {args.limit_docs}")
            for source in recipe.sources:
                source.limit = min(args.limit_docs, source.limit or args.limit_docs)
        from pipeline.executors import build_executors, run_executors
        from pipeline.layout import Layout
        from pipeline.preflight import preflight
        from pipeline.report import format_report
        from pipeline.stages import build_stages

        layout = Layout(Path(args.output or f"outputs/{recipe.name}").resolve())
        tokenizer = preflight(recipe, base_dir, layout, args.data_root)
        stages = build_stages(recipe, base_dir, layout, args.data_root, tokenizer)
        executors = build_executors(args.executor, stages, layout, recipe.cluster, args.workers, args.verbose)
        run_executors(args.executor, executors, stages, recipe.cluster)
    except (ConfigError, CurationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    if args.executor == "local":
        print(format_report(json.loads(layout.report.read_text())))
        print(f"manifest: {layout.manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
