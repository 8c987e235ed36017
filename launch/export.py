"""Export a checkpoint: Hugging Face (Bamba), ONNX, or weight-quantized; or import a Hugging Face folder
(Bamba, or a dense Granite 4.0-H GraniteMoeHybridForCausalLM) into a bundle.

    python launch/export.py --checkpoint CKPT --format hf --output exports/hf
    python launch/export.py --checkpoint CKPT --format onnx --output exports/onnx
    python launch/export.py --checkpoint CKPT --format nf4 --output exports/nf4 --manifest M.json
    python launch/export.py --import-hf exports/hf --output checkpoints/imported
    hybrid-lm convert granite-4.0-h-micro --output checkpoints/granite   (the same import)
    (--config RUN.yaml and --set section.key=value as every entrypoint; export.* in config/sections.py)

Several formats in one call (`--format hf,onnx` or export.formats) go to OUTPUT/<format>.
Every output folder gets README.md (the card), run_config.yaml and export_report.json.
OUTPUT is written as a whole into a temporary folder beside it and renamed into place once every
format is done (a failed export leaves nothing); an OUTPUT that exists and is not empty is replaced
only with --force. Errors are one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

import torch  # noqa: E402

from config.atomic import staged_dir  # noqa: E402
from config.console import quiet_libraries  # noqa: E402
from export import ExportError  # noqa: E402
from export.hf import check_exportable  # noqa: E402
from export.loading import (  # noqa: E402
    checkpoint_model_config, cli_errors, load_checkpoint, pick_device, pick_dtype, resolve_run_config,
)
from export.quantize import check_runnable, is_quantized_folder, resolve_method  # noqa: E402

FORMATS = ("hf", "onnx", "int8", "nf4", "int4")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="consolidated checkpoint folder (model.safetensors + config.json)")
    src.add_argument("--import-hf", type=Path, help="a Bamba or dense GraniteMoeHybrid folder to import into a "
                     "bundle at --output")
    p.add_argument("--format", help=f"comma-separated, from {', '.join(FORMATS)} (default: export.formats)")
    p.add_argument("--output", type=Path, help="output folder (default: export.output_dir)")
    p.add_argument("--force", action="store_true", help="replace an OUTPUT folder that holds files")
    p.add_argument("--manifest", help="curation manifest whose validation split scores perplexity (sets data.manifest)")
    p.add_argument("--eval-text", help="text file scored for perplexity when no manifest is given")
    p.add_argument("--config", help="run config YAML (path or name under config/runs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--verbose", action="store_true",
                   help="print the libraries' notices too (transformers, torchao, onnxscript INFO)")
    return p.parse_args(argv)


def requested_formats(spec: str | None, default: list[str]) -> list[str]:
    formats = [f.strip() for f in spec.split(",") if f.strip()] if spec else list(default)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ExportError(f"unsupported format {bad[0] if bad else spec!r}: choose from {', '.join(FORMATS)}")
    return formats


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries(args.verbose)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if args.manifest:
        if not Path(args.manifest).is_file():
            raise ExportError(f"manifest {args.manifest} does not exist")
        overrides.append(f"data.manifest={args.manifest}")
    if args.eval_text:
        overrides.append(f"export.eval_text={args.eval_text}")
    source = args.checkpoint or args.import_hf
    model_cfg = checkpoint_model_config(source)
    run_cfg = resolve_run_config(model_cfg, source, args.config, overrides)
    out = args.output or Path(run_cfg.export.output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise ExportError(f"output {out} exists and is not empty: pass --force to replace it, or another --output")

    if args.import_hf:
        if args.format:
            raise ExportError("--import-hf writes a bundle; drop --format")
        from export import runner  # heavy imports (transformers, onnx) only once the arguments are checked

        with staged_dir(out) as tmp:
            numbers = runner.run_import_hf(args.import_hf, run_cfg, tmp, final=out)
        print(json.dumps({"output": str(out), "numbers": numbers}, indent=2, default=str))
        return 0
    formats = requested_formats(args.format, run_cfg.export.formats)
    if is_quantized_folder(args.checkpoint):
        raise ExportError(f"{args.checkpoint} is already quantized: export from the float checkpoint")
    device = pick_device(run_cfg.export.device)
    if "hf" in formats:
        check_exportable(model_cfg)
    for fmt in set(formats) & {"int8", "nf4", "int4"}:
        check_runnable(resolve_method(fmt, run_cfg.export.int8_backend), device)
    from export import runner

    report = {}
    with staged_dir(out) as staged:
        for fmt in formats:
            target, final = (staged / fmt, out / fmt) if len(formats) > 1 else (staged, out)
            # Fresh weights per format: quantization and dtype changes must not leak into the next one.
            where = device if fmt not in ("hf", "onnx") else torch.device("cpu")  # HF/ONNX files are written from CPU
            bundle = load_checkpoint(args.checkpoint, where, pick_dtype(run_cfg.export.dtype), run_cfg.model.impl)
            if fmt == "hf":
                report[fmt] = runner.run_hf(bundle, run_cfg, target, final)
            elif fmt == "onnx":
                report[fmt] = runner.run_onnx(bundle, run_cfg, target, final)
            else:
                report[fmt] = runner.run_quantized(bundle, run_cfg, target, fmt, device, final)
            logging.info("%s export done (%s)", fmt, final)
    print(json.dumps({"output": str(out), "numbers": report}, indent=2, default=str))
    return 0


def convert(argv: list[str] | None = None) -> int:
    """`hybrid-lm convert HF_DIR --output DIR [...]`: the import (`--import-hf HF_DIR`) under its own name."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print("usage: hybrid-lm convert HF_DIR --output DIR [--force] [--config RUN.yaml] [--set KEY=VALUE]",
              file=sys.stderr)
        return 2
    return main(["--import-hf", *argv])


if __name__ == "__main__":
    sys.exit(main())
