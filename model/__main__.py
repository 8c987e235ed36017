"""`python -m model list [--json]`: the presets with their sizes and layer patterns, the block types, and
the named layer-pattern variants (model/variants.py) on the `small` preset. `--json`: {"presets": [...],
"block_types": [...], "mlp_kinds": [...], "options": [...], "variants": [...]}.
`python -m model stats CKPT --text "..."`: what each block type measures on a text (router fractions,
gate means, memory read mass per slot: the design's `get_gate_statistics`)."""

from __future__ import annotations

import argparse
import json

import torch

from model.config import HierarchicalConfig, MambaConfig, ModelConfig
from model.hybrid import HybridLM
from model.mixers import block_types
from model.mlps import mlp_kinds
from model.presets import PRESETS
from model.sizing import count_params
from model.variants import variant_rows


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


def mlp_kind_rows() -> list[dict]:
    """One row per registered MLP kind (`model.mlp`)."""
    return [{"name": name, "description": cls.description, "hf_export": cls.hf_export} for name, cls in mlp_kinds().items()]


def block_type_rows() -> list[dict]:
    """One row per registered block type: letter, name, one-line description, the design it comes from."""
    return [{"letter": k, "name": cls.name, "description": cls.description, "design": cls.design,
             "hf_export": cls.hf_layer_type is not None, "onnx_export": cls.onnx}
            for k, cls in block_types().items()]


# Model options of the hybrid variants that are not block types: key -> the config class that holds the field.
OPTIONS = {"model.bridges": ModelConfig, "model.mamba.state_compression": MambaConfig,
           "model.hierarchical.span": HierarchicalConfig, "model.hierarchical.width": HierarchicalConfig}


def option_rows() -> list[dict]:
    """One row per hybrid-variant option: its key, default and description (the config schema's)."""
    rows = []
    for key, schema in OPTIONS.items():
        field = schema.model_fields[key.rsplit(".", 1)[1]]
        rows.append({"key": key, "default": field.default, "description": field.description})
    return rows


def print_statistics(checkpoint: str, text: str) -> None:
    """Run `text` through a consolidated checkpoint and print every layer's block statistics."""
    from model.bundle import load_bundle
    from model.mixers.gated import GatedMemoryMixer

    bundle = load_bundle(checkpoint)
    ids = bundle.tokenizer(text, return_tensors="pt").input_ids
    if ids.numel() == 0:
        raise SystemExit("error: --text is empty: pass some text to measure the blocks on")
    with torch.no_grad():
        bundle.model(ids)
    print(f"{ids.size(1)} tokens through {checkpoint} (pattern {bundle.model.cfg.layer_pattern})")
    for i, layer in enumerate(bundle.model.layers):
        stats = layer.mixer.statistics()
        line = ", ".join(f"{k} {v:.4f}" for k, v in stats.items()) or "-"
        print(f"layer {i:>3} {layer.kind} {layer.mixer.name:<13} {line}")
        if isinstance(layer.mixer, GatedMemoryMixer) and layer.mixer.memory_query is not None:
            mass = layer.mixer.memory_read_mass()
            top = mass.topk(min(5, mass.numel()))
            slots = ", ".join(f"{int(j)}: {float(v):.4f}" for v, j in zip(top.values, top.indices))
            print(f"{'':>10} memory read mass, top slots: {slots}")


def _fmt(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="print the presets, block types, MLP kinds and named variants", add_help=False)
    stats = sub.add_parser("stats", help="print each block's statistics on a text")
    stats.add_argument("checkpoint", help="consolidated checkpoint folder (model.safetensors, tokenizer.json)")
    stats.add_argument("--text", required=True, help="the text to run through the model")
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "stats":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        print_statistics(args.checkpoint, args.text)
        return
    list_presets(rest)


def list_presets(argv: list[str] | None = None) -> None:
    """`python -m model list` / `hybrid-lm list`: the presets, block types, MLP kinds and named variants as
    tables, or JSON with --json."""
    parser = argparse.ArgumentParser(prog="python -m model list",
                                     description="print the presets, block types, MLP kinds and named variants")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    rows, kinds, mlps, variants = preset_rows(), block_type_rows(), mlp_kind_rows(), variant_rows()
    options = option_rows()
    if args.json:
        print(json.dumps({"presets": rows, "block_types": kinds, "mlp_kinds": mlps, "options": options,
                          "variants": variants}, indent=2))
        return
    head = f"{'preset':<7} {'params':>9} {'non-emb':>9} {'layers':>6} {'d_model':>7} {'heads':>7} {'mamba h':>7} {'d_state':>7}  pattern"
    print(head)
    for r in rows:
        print(
            f"{r['preset']:<7} {_fmt(r['params']):>9} {_fmt(r['non_embedding_params']):>9} {r['layers']:>6} "
            f"{r['d_model']:>7} {str(r['heads']) + '/' + str(r['kv_heads']):>7} {r['mamba_heads']:>7} "
            f"{r['d_state']:>7}  {r['pattern']}"
        )
    print("\nblock types (model.pattern letters)")
    for k in kinds:
        print(f"  {k['letter']}  {k['name']:<13} {k['description']}  [{k['design']}]")
    print("\nMLP kinds (model.mlp)")
    for m in mlps:
        print(f"  {m['name']:<8} {m['description']}")
    print("\nhybrid options (--set KEY=VALUE)")
    for o in options:
        print(f"  {o['key']:<31} default {o['default']!s:<5} {o['description']}")
    print(f"\n{'variant':<13} {'params':>9} {'matched':>9} {'ffn':>5}  pattern       (preset {variants[0]['preset']}; "
          "matched: ffn_hidden sized to the preset's count)")
    for v in variants:
        print(f"{v['variant']:<13} {_fmt(v['params']):>9} {_fmt(v['matched_params']):>9} {v['matched_ffn_hidden']:>5}  "
              f"{v['pattern']:<13} {v['description']}")


if __name__ == "__main__":
    main()
