"""Generate text from a checkpoint (bundle, quantized export or Bamba folder) with the model's cache.

    python launch/generate.py --checkpoint CKPT --prompt "def main():"             # streams to stdout
    python launch/generate.py --checkpoint CKPT --input prompts.txt --output results.json
    python launch/generate.py --checkpoint CKPT --interactive                     # /help for commands

One prompt per non-empty line of --input; results.json is written atomically. Decoding defaults
come from export.sampling (config/sections.py); the flags below override them. Prefill runs once,
then every token is one `HybridLM.step` (O(1) per token for Mamba2 layers); on CUDA the kernel path
is used (model.impl=auto). Errors are one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from export import ExportError  # noqa: E402
from export.loading import (  # noqa: E402
    checkpoint_model_config,
    cli_errors,
    load_checkpoint,
    pick_device,
    pick_dtype,
    resolve_run_config,
)

_FLAGS = {  # flag dest -> export.sampling key
    "max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
    "repetition_penalty": "repetition_penalty", "seed": "seed",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="bundle, quantized export, or Bamba / Granite 4.0-H folder")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="one prompt; the completion streams to stdout")
    mode.add_argument("--input", type=Path, help="prompts file, one per non-empty line (needs --output)")
    mode.add_argument("--interactive", action="store_true", help="read prompts and /commands from stdin")
    p.add_argument("--output", type=Path, help="results JSON for --input")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together in --input mode")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--stop", action="append", help="stop string (repeatable); cut from the output")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-stream", action="store_true", help="print the completion once it is finished")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="decode through a CUDA graph (export.cuda_graph; default auto: on for CUDA devices)")
    p.add_argument("--config", help="run config YAML (path or name under config/runs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p.parse_args(argv)


def sampling_overrides(args: argparse.Namespace) -> list[str]:
    """Flags as config overrides (`export.sampling.*`, `export.cuda_graph`), so the schema validates them
    like any config value."""
    out = [f"export.sampling.{key}={getattr(args, dest)}" for dest, key in _FLAGS.items()
           if getattr(args, dest) is not None]
    if args.stop:
        import json

        out.append(f"export.sampling.stop={json.dumps(args.stop)}")
    if args.cuda_graph is not None:
        out.append(f"export.cuda_graph={str(args.cuda_graph).lower()}")
    return out


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_interactive(model, tokenizer, params, stop: list[str], complete) -> None:
    """Prompts and /commands from stdin until /quit or end of input. Ctrl-C stops the reply being
    generated (or clears the line being typed) and returns to the prompt."""
    from export.textgen import HELP, apply_line

    print(f"interactive generation; /help lists the commands\n{HELP}", file=sys.stderr)
    while True:
        write("> ")
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            write("\n")
            continue
        if not line:  # end of input
            write("\n")
            return
        cmd = apply_line(line, params)
        params = cmd.params
        if cmd.message:
            print(cmd.message)
        if cmd.quit:
            return
        if cmd.prompt is not None:
            try:
                complete(model, tokenizer, [cmd.prompt], params, stop, on_text=lambda _row, piece: write(piece))
            except KeyboardInterrupt:
                write(" [stopped]")
            write("\n")


def complete_batches(complete, model, tokenizer, prompts: list[str], batch_size: int, params, stop: list[str]) -> list:
    """Complete `prompts` `batch_size` at a time. With a seed, the run's generator draws one seed per
    prompt up front, so a prompt's sample depends on the seed and its position, not on --batch-size."""
    row_seeds = None
    if params.seed is not None:
        import torch

        run_rng = torch.Generator().manual_seed(params.seed)
        row_seeds = torch.randint(2**62, (len(prompts),), generator=run_rng).tolist()
    results = []
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        results += complete(model, tokenizer, prompts[start:end], params, stop,
                            row_seeds=None if row_seeds is None else row_seeds[start:end])
    return results


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.input is not None and args.output is None:
        raise ExportError("--input needs --output results.json")
    if args.input is not None and not args.input.is_file():
        raise ExportError(f"prompts file {args.input} does not exist")
    if args.batch_size < 1:
        raise ExportError("--batch-size must be >= 1")
    if args.prompt is not None and not args.prompt.strip():
        raise ExportError("--prompt is empty: give the text to continue")
    model_cfg = checkpoint_model_config(args.checkpoint)
    run_cfg = resolve_run_config(model_cfg, args.checkpoint, args.config, args.overrides + sampling_overrides(args))
    s = run_cfg.export.sampling
    from functools import partial

    from config.atomic import atomic_write_json
    from export import textgen
    from model.generation import SamplingParams

    params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                            top_p=s.top_p, repetition_penalty=s.repetition_penalty, seed=s.seed)
    bundle = load_checkpoint(args.checkpoint, pick_device(run_cfg.export.device), pick_dtype(run_cfg.export.dtype),
                             run_cfg.model.impl)
    model, tok = bundle.model, bundle.tokenizer
    if params.max_new_tokens > (limit := run_cfg.model.max_seq_len):
        print(f"warning: export.sampling.max_new_tokens ({params.max_new_tokens}) exceeds model.max_seq_len ({limit}): "
              f"generating at most {limit} tokens", file=sys.stderr)
        params.max_new_tokens = limit
    if run_cfg.export.cuda_graph is True and model.embed.weight.device.type != "cuda":
        raise ExportError("--cuda-graph (export.cuda_graph) needs a CUDA device: set export.device=cuda or drop it")
    complete = partial(textgen.complete, cuda_graph=run_cfg.export.cuda_graph)
    if args.interactive:
        run_interactive(model, tok, params, s.stop, complete)
        return 0
    if args.prompt is not None:
        stream = None if args.no_stream else (lambda _row, piece: write(piece))
        result = complete(model, tok, [args.prompt], params, s.stop, on_text=stream)[0]
        write(("" if stream else result["completion"]) + "\n")
        print(f"[{result['new_tokens']} tokens, {result['tokens_per_s']:.1f} tokens/s, finish: {result['finish']}]",
              file=sys.stderr)
        return 0
    prompts = [line for line in args.input.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ExportError(f"prompts file {args.input} has no prompts")
    results = complete_batches(complete, model, tok, prompts, args.batch_size, params, s.stop)
    atomic_write_json(args.output, {
        "checkpoint": str(args.checkpoint),
        "sampling": s.model_dump(mode="json"),
        "device": str(model.embed.weight.device),
        "execution_path": model.impl,
        "results": results,
    })
    print(f"{len(results)} completions written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
