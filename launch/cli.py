"""`hybrid-lm SUBCOMMAND ARGS...`: the console script of `pip install .`, one name per stage.

    hybrid-lm curate   = python pipeline/curate.py      hybrid-lm export   = python launch/export.py
    hybrid-lm pretrain = python launch/pretrain.py      hybrid-lm generate = python launch/generate.py
    hybrid-lm eval     = python eval/run.py             hybrid-lm list     = python -m model list
    hybrid-lm finetune = python launch/finetune.py
    hybrid-lm convert HF_DIR ... = python launch/export.py --import-hf HF_DIR ...
    hybrid-lm adapt    = python launch/adapt.py

ARGS go to that entrypoint's `main` unchanged, so each subcommand has the same flags, help, output
and exit codes as the script. `hybrid-lm pretrain` and `hybrid-lm finetune` are a world of one process; for
several, launch the script as usual (`deepspeed --num_gpus 8 launch/pretrain.py ...`).
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable

SUBCOMMANDS = {  # name -> (module, function, what it does)
    "curate": ("pipeline.curate", "main", "curate a data recipe into token shards + manifest.json"),
    "pretrain": ("launch.pretrain", "main", "pretrain with DeepSpeed (a world of one process)"),
    "finetune": ("launch.finetune", "main", "fine-tune a checkpoint, full or LoRA (a world of one process)"),
    "eval": ("eval.run", "main", "evaluate a checkpoint: lm-eval benchmarks, validation perplexity"),
    "export": ("launch.export", "main", "export a checkpoint: hf, onnx, int8, nf4, int4"),
    "convert": ("launch.export", "convert", "import a Bamba / dense Granite 4.0-H HF folder into a bundle"),
    "adapt": ("launch.adapt", "main", "train the hybrid wrapper of a pretrained HF transformer, or generate"),
    "generate": ("launch.generate", "main", "generate text from a checkpoint"),
    "list": ("model.__main__", "list_presets", "print the model presets"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, _, text) in SUBCOMMANDS.items()]
    return "usage: hybrid-lm SUBCOMMAND [ARGS...]   (hybrid-lm SUBCOMMAND --help for its flags)\n" + "\n".join(lines)


def entrypoint(name: str) -> Callable[[list[str]], int | None]:
    """The `main(argv)` that `hybrid-lm NAME` runs."""
    module, function, _ = SUBCOMMANDS[name]
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in SUBCOMMANDS:
        print(f"hybrid-lm: unknown subcommand {argv[0]!r}; choose one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    sys.argv = [f"hybrid-lm {argv[0]}", *argv[1:]]  # argparse's prog in the subcommand's help and errors
    return entrypoint(argv[0])(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
