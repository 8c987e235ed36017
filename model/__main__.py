"""`python -m model list [--json]`: the presets with their sizes and layer patterns."""

from __future__ import annotations

import argparse
import json

import torch

from model.config import ModelConfig
from model.hybrid import HybridLM
from model.presets import PRESETS
from model.sizing import count_params


def preset_rows(verify: bool = True) -> list[dict]:
    """One row per preset; with `verify`, the count is checked against a meta-device model."""
    rows = []
    for name in PRESETS:
        cfg = ModelConfig(preset=name)
        total = count_params(cfg)
        if verify:
            with torch.device("meta"):
                built = sum(p.numel() for p in HybridLM(cfg).parameters())
            if built != total:
                raise SystemExit(f"internal error: formula {total} != instantiated {built} for {name}")
        rows.append({
            "preset": name,
            "params": total,
            "non_embedding_params": count_params(cfg, include_embedding=False),
            "layers": cfg.n_layers,
            "d_model": cfg.d_model,
            "heads": cfg.attention.n_heads,
            "kv_heads": cfg.attention.n_kv_heads,
            "mamba_heads": cfg.n_ssm_heads,
            "d_state": cfg.mamba.d_state,
            "pattern": cfg.layer_pattern,
        })
    return rows


def _fmt(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="print the presets", add_help=False)
    args, rest = parser.parse_known_args(argv)
    list_presets(rest)


def list_presets(argv: list[str] | None = None) -> None:
    """`python -m model list` / `hybrid-lm list`: the presets as a table, or JSON with --json."""
    parser = argparse.ArgumentParser(prog="python -m model list", description="print the presets")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    rows = preset_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    head = f"{'preset':<7} {'params':>9} {'non-emb':>9} {'layers':>6} {'d_model':>7} {'heads':>7} {'mamba h':>7} {'d_state':>7}  pattern"
    print(head)
    for r in rows:
        print(
            f"{r['preset']:<7} {_fmt(r['params']):>9} {_fmt(r['non_embedding_params']):>9} {r['layers']:>6} "
            f"{r['d_model']:>7} {str(r['heads']) + '/' + str(r['kv_heads']):>7} {r['mamba_heads']:>7} "
            f"{r['d_state']:>7}  {r['pattern']}"
        )


if __name__ == "__main__":
    main()
