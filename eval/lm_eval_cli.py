"""lm-eval's own command line with the `hybrid` backend registered and local tasks that work from any
working directory.

    python -m eval.lm_eval_cli --model hybrid --model_args checkpoint=CKPT --batch_size 16 \
        --tasks arc_easy,hellaswag --device cuda --output_path results/
    python -m eval.lm_eval_cli --model hybrid --model_args checkpoint=CKPT --tasks local_mc \
        --include_path eval/tasks
    python -m eval.lm_eval_cli ls tasks

The stock `lm_eval` console script cannot see the backend: lm-eval 0.4.13 has no plugin hook (its
registry takes entry points as lazy placeholders but never looks any up), and the backend registers
itself on import of eval.lm_backend, which this module does before handing over to lm-eval's CLI.
Relative `dataset_kwargs.data_files` of the tasks under `--include_path` are resolved against their
YAML's folder (as eval/run.py does), not the working directory. Unlike eval/run.py it does not force
offline mode. `--batch_size` and `--device` are lm-eval's own flags (it passes them to the backend
itself; repeating them in --model_args fails with "got multiple values").
"""

import eval.lm_backend  # noqa: F401  (registers "hybrid")
from eval.benchmarks import resolve_include_paths
from lm_eval.__main__ import cli_evaluate
from lm_eval.tasks import TaskManager

_build_index = TaskManager.__init__


def _init_resolving(self: TaskManager, *args, **kwargs) -> None:
    """TaskManager.__init__, then the local tasks' data files made absolute (every lm-eval subcommand
    builds its TaskManager through this class)."""
    _build_index(self, *args, **kwargs)
    resolve_include_paths(self)


if __name__ == "__main__":
    TaskManager.__init__ = _init_resolving
    cli_evaluate()
