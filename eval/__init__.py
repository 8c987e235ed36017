"""Evaluation of consolidated checkpoints: lm-eval benchmarks and validation perplexity.

    eval/run.py            the entrypoint (offline by default; one-line errors)
    eval/lm_backend.py     the model as lm-eval backend "hybrid" (loglikelihood, rolling, generate_until)
    eval/lm_eval_cli.py    lm-eval's own CLI with the backend registered (`python -m eval.lm_eval_cli`)
    eval/benchmarks.py     benchmark names -> lm-eval tasks, built up front so missing data fails early
    eval/val_ppl.py        perplexity on the curation manifest's validation split
    eval/report.py         results table, reference scores, the results JSON
    eval/sandbox.py        where model-written code runs (no network, limits)
    eval/errors.py         EvalError

Importing this package imports nothing heavy (lm-eval loads only with the modules that need it).
"""

