"""Evaluate a consolidated checkpoint: lm-eval benchmarks and/or validation perplexity.

    python eval/run.py --checkpoint runs/tiny/consolidated --benchmarks standard --compare
    python eval/run.py --checkpoint CKPT --benchmarks arc_easy,hellaswag --num-fewshot 0 --limit 100
    python eval/run.py --checkpoint CKPT --benchmarks local_mc --tasks-dir eval/tasks
    python eval/run.py --checkpoint CKPT --benchmarks val_ppl --manifest outputs/embedded/manifest.json
    python eval/run.py --checkpoint CKPT --benchmarks passkey,position_ppl --manifest M   (eval/long_context.py)

Offline by default: HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 unless already set, so hub tasks run
from the HF datasets cache only. Every requested task is built (its data loaded) before the model
is; a task whose data cannot be reached stops the run with one line. Settings come from the run
config (--config, else the checkpoint's run_config.yaml) section `eval`, `--set section.key=value`
and the flags, in increasing precedence; the checkpoint's run_config.yaml never sets where results are
written or whether code runs (config.schema.USER_ONLY_KEYS). Bad input exits 2 with one line on stderr.
"""

from __future__ import annotations

import os

# Before anything imports datasets / huggingface_hub: both read these once, at import.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from config.atomic import atomic_write_json  # noqa: E402
from config.console import quiet_libraries  # noqa: E402
from config.loader import ConfigError, load, read_yaml, validate  # noqa: E402
from config.schema import RunConfig, load_run_config, without_user_only  # noqa: E402
from config.sections import EvalConfig  # noqa: E402
from eval import sandbox  # noqa: E402
from eval.errors import EvalError  # noqa: E402
from model.bundle import TOKENIZER_JSON  # noqa: E402
from export import ExportError  # noqa: E402
from export.loading import checkpoint_model_config, is_hf_folder  # noqa: E402
from model.weights import WEIGHTS_NAME, CheckpointError  # noqa: E402

log = logging.getLogger("eval.run")
RUN_CONFIG_NAME = "run_config.yaml"  # written beside a consolidated checkpoint by the trainer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Consolidated checkpoint folder (model.safetensors, ...), "
                   "or a Hugging Face Bamba / Granite 4.0-H folder.")
    p.add_argument("--benchmarks", help="Comma-separated lm-eval tasks/groups, 'standard' and/or 'val_ppl'.")
    p.add_argument("--num-fewshot", type=int, help="Few-shot examples for every task.")
    p.add_argument("--limit", type=int, help="Examples per task / val_ppl windows (debugging).")
    p.add_argument("--batch-size", type=int, help="Sequences per forward pass.")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N.")
    p.add_argument("--output", help="Results JSON (default <checkpoint>/eval_results.json).")
    p.add_argument("--tasks-dir", help="Folder of local lm-eval task YAMLs.")
    p.add_argument("--manifest", help="Curation manifest for val_ppl (default data.manifest).")
    p.add_argument("--config", help="Run config YAML or name under config/runs/.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Run-config override (repeatable).")
    p.add_argument("--allow-code-execution", action="store_true", default=None,
                   help="Allow benchmarks that execute model-written code (adds HumanEval to 'standard').")
    p.add_argument("--compare", action="store_true", default=None, help="Add published reference scores.")
    p.add_argument("--verbose", action="store_true",
                   help="print the libraries' notices too (transformers, torchao, onnxscript INFO)")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """Run config (--config, else the checkpoint's, else defaults around its model) + --set + flags."""
    saved = Path(args.checkpoint) / RUN_CONFIG_NAME
    if args.config is not None:
        cfg = load_run_config(args.config, args.set)
    elif saved.is_file():  # the checkpoint's own config: never where to write or whether to run code
        cfg = load(RunConfig, None, args.set, defaults=without_user_only(read_yaml(saved)))
    else:
        cfg = load(RunConfig, None, args.set, defaults={"model": checkpoint_model_config(args.checkpoint).model_dump(mode="json")})
    flags = {
        "benchmarks": [b.strip() for b in args.benchmarks.split(",") if b.strip()] if args.benchmarks else None,
        "num_fewshot": args.num_fewshot, "limit": args.limit, "batch_size": args.batch_size, "device": args.device,
        "output": args.output, "tasks_dir": args.tasks_dir, "manifest": args.manifest,
        "allow_code_execution": args.allow_code_execution, "compare": args.compare,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    cfg.eval = validate(EvalConfig, {**cfg.eval.model_dump(), **given}, prefix="eval.")
    return cfg


def check_checkpoint(folder: Path) -> None:
    """Fail before any heavy work when the folder cannot be a consolidated checkpoint or a Hugging Face
    folder export/loading.py imports (Bamba, dense Granite 4.0-H; their weights may be sharded)."""
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist (pass the consolidated checkpoint folder)")
    checkpoint_model_config(folder)
    for name in (TOKENIZER_JSON,) if is_hf_folder(folder) else (WEIGHTS_NAME, TOKENIZER_JSON):
        if not (folder / name).is_file():
            raise CheckpointError(f"no {name} in {folder}: pass a consolidated checkpoint folder (the trainer's export)")


def check_writable(path: Path) -> None:
    """The output's nearest existing folder must be writable (checked before hours of evaluation)."""
    existing = next(p for p in [path.parent, *path.parent.parents] if p.exists())
    if not os.access(existing, os.W_OK):
        raise EvalError(f"cannot write results to {path}: {existing} is not writable (pass --output)")


def cache_prefix(output: Path, checkpoint: Path, ev: EvalConfig) -> str:
    """sqlite cache of lm-eval responses, keyed by the weights file and what changes scores; lm-eval
    appends '_rank0.db'. A rerun after an interruption answers finished requests from it."""
    w = (checkpoint / WEIGHTS_NAME).resolve()
    stat = w.stat()
    key = f"{w}|{stat.st_size}|{stat.st_mtime_ns}|{ev.dtype}"
    return str(output.parent / ".eval_cache" / hashlib.sha256(key.encode()).hexdigest()[:16])


def run(cfg: RunConfig, command: list[str], checkpoint: Path) -> None:
    from eval import report
    from eval import long_context
    from eval.benchmarks import (
        OWN_TASKS,
        PASSKEY,
        POSITION_PPL,
        VAL_PPL,
        build_task_manager,
        enable_code_execution,
        expand_benchmarks,
        load_tasks,
    )
    from eval.lm_backend import BACKEND_NAME, HybridEvalLM, resolve_device
    from eval.val_ppl import read_manifest, validation_perplexity, verify

    ev = cfg.eval
    if ev.allow_code_execution:
        enable_code_execution()
    names = expand_benchmarks(ev.benchmarks, ev.allow_code_execution)
    task_names = [n for n in names if n not in OWN_TASKS]
    try:
        device = resolve_device(ev.device)
    except ValueError as exc:
        raise EvalError(str(exc)) from None

    # ---- everything that can fail on input, before the model is loaded ----
    output = Path(ev.output) if ev.output else checkpoint / "eval_results.json"
    check_writable(output)
    manifest = None
    if needing := [n for n in (VAL_PPL, POSITION_PPL) if n in names]:
        if (ev.manifest or cfg.data.manifest) is None:
            raise EvalError(f"{' and '.join(needing)} needs a curation manifest: pass --manifest PATH or set data.manifest")
        manifest = read_manifest(ev.manifest or cfg.data.manifest)
        verify(manifest, checkpoint_model_config(checkpoint).vocab_size, checkpoint / TOKENIZER_JSON)
    manager = build_task_manager(task_names, ev.tasks_dir) if task_names else None
    tasks = load_tasks(manager, task_names, ev.allow_code_execution) if task_names else []

    # ---- evaluate ----
    lm = HybridEvalLM(checkpoint, device=str(device), dtype=ev.dtype, batch_size=ev.batch_size)
    results = None
    if tasks:
        from lm_eval import simple_evaluate

        results = simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, num_fewshot=ev.num_fewshot, limit=ev.limit,
            log_samples=False, use_cache=cache_prefix(output, checkpoint, ev) if ev.cache else None,
            confirm_run_unsafe_code=ev.allow_code_execution,
            model_args={"checkpoint": str(checkpoint), "device": str(device), "dtype": ev.dtype,
                        "batch_size": ev.batch_size},
        )
        results["config"]["model"] = BACKEND_NAME
    ppl = None
    if VAL_PPL in names:
        ppl = validation_perplexity(lm.model, manifest, seq_len=ev.val_seq_len or cfg.train.seq_len,
                                    batch_size=ev.batch_size, packing=cfg.data.packing, limit=ev.limit)

    keys = position = None
    if PASSKEY in names:
        try:
            keys = long_context.passkey(lm.model, lm.tokenizer, ev.passkey_lengths, ev.passkey_depths, ev.passkey_samples)
        except ValueError as exc:
            raise EvalError(str(exc)) from None
    if POSITION_PPL in names:
        try:
            position = long_context.position_perplexity(
                lm.model, manifest, ev.position_ppl_seq_len or max(ev.passkey_lengths), ev.position_buckets,
                ev.position_ppl_windows)
        except ValueError as exc:
            raise EvalError(str(exc)) from None

    # ---- report ----
    rows = (report.lm_eval_rows(results) if results else []) + (report.val_ppl_rows(ppl) if ppl else [])
    rows += report.long_context_rows(keys, position)
    shown, cited = [], None
    if ev.compare:
        scores, sources = report.load_references()
        shown = report.attach_references(rows, scores)
        cited = {m: sources[m] for m in shown}
    print(report.format_table(rows, shown))
    doc = report.results_document(results, ppl, rows, report.checkpoint_info(lm.bundle),
                                  ev.model_dump(mode="json"), command, cited)
    if keys or position:
        doc["long_context"] = {"passkey": keys, "position_ppl": position,
                               "plot": str(long_context.plot(keys, position, output.with_suffix(".long_context.png")))}
    atomic_write_json(output, doc)
    log.info("results written to %s", output)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries(args.verbose)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    checkpoint = Path(args.checkpoint)
    try:
        check_checkpoint(checkpoint)
        cfg = resolve_config(args)
        if cfg.eval.allow_code_execution and not sandbox.inside():  # model-written code: no network (eval/sandbox.py)
            return sandbox.rerun_sandboxed([str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)])
        run(cfg, sys.argv if argv is None else ["eval/run.py", *argv], checkpoint)
    except (ConfigError, CheckpointError, ExportError, EvalError, sandbox.SandboxError) as exc:
        print(f"eval: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
