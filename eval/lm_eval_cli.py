"""lm-eval's own command line with the `hybrid` backend registered.

    python -m eval.lm_eval_cli --model hybrid --model_args checkpoint=CKPT --batch_size 16 \
        --tasks arc_easy,hellaswag --device cuda --output_path results/
    python -m eval.lm_eval_cli ls tasks

The stock `lm_eval` console script does not import this project, so it cannot see the backend;
this module imports it (registration happens on import of eval.lm_backend) and hands over to
lm-eval's CLI. `--batch_size` and `--device` are lm-eval's own flags (it passes them to the backend
itself; repeating them in --model_args fails with "got multiple values"). Unlike eval/run.py it does not force offline mode and resolves a task's relative
`data_files` against the working directory, as lm-eval does.
"""

import eval.lm_backend  # noqa: F401  (registers "hybrid")
from lm_eval.__main__ import cli_evaluate

if __name__ == "__main__":
    cli_evaluate()
