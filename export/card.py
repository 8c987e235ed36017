"""What every export writes beside its files: README.md (the card), run_config.yaml, export_report.json.

The card says what the folder holds, which checkpoint (and training step) it came from, the numbers
measured while exporting, and how to load it. export_report.json holds the same numbers for tools.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from config.atomic import atomic_write_bytes, atomic_write_json
from config.schema import RunConfig, save_run_config
from export.loading import RUN_CONFIG_NAME
from export.measure import file_bytes
from model.mixers import block_type
from model.sizing import count_params

REPORT_NAME = "export_report.json"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_card(out_dir: str | Path, *, fmt: str, what: str, source: str | Path, meta: dict, run_cfg: RunConfig,
               numbers: dict[str, Any], usage: str, notes: list[str] | None = None) -> Path:
    """Write README.md, run_config.yaml and export_report.json into `out_dir`."""
    out = Path(out_dir)
    cfg = run_cfg.model
    save_run_config(run_cfg, out / RUN_CONFIG_NAME)
    report = {
        "format": fmt,
        "source": str(source),
        "source_meta": meta,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "numbers": numbers,
        "notes": notes or [],
    }
    atomic_write_json(out / REPORT_NAME, report)
    step = meta.get("step", "unknown")
    lines = [
        f"# {cfg.preset or 'hybrid'} model: {fmt} export",
        "",
        f"{what}",
        "",
        f"- Source checkpoint: `{source}` (step {step})",
        f"- Model: {count_params(cfg) / 1e6:.1f}M parameters, d_model {cfg.d_model}, {cfg.n_layers} layers, "
        f"pattern `{cfg.layer_pattern}` ({pattern_legend(cfg.layer_pattern)}), vocab {cfg.vocab_size}",
        f"- Created: {report['created']}",
        f"- Files: {file_bytes(out) / 2**20:.2f} MiB in this folder",
    ]
    extra = {k: v for k, v in meta.items() if k != "step" and isinstance(v, (str, int, float))}
    if extra:
        lines.append("- Source metadata: " + ", ".join(f"{k}={v}" for k, v in sorted(extra.items())))
    lines += ["", "## Measured during export", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in numbers.items()] or ["| (not measured: export.verify=false) | |"]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Use", "", "```python", usage.strip(), "```", "",
              "`run_config.yaml` is the resolved run config of this export; `export_report.json` holds the numbers above.", ""]
    atomic_write_bytes(out / "README.md", "\n".join(lines).encode())
    return out / "README.md"


def pattern_legend(pattern: str) -> str:
    """'M = mamba2, A = attention' for the block types a pattern uses, in order of first use."""
    return ", ".join(f"{k} = {block_type(k).name}" for k in dict.fromkeys(pattern))


def onnx_usage(folder: str | Path) -> str:
    """The ONNX card's example: plain onnxruntime + tokenizers, any prompt length, top-k sampling."""
    return f"""import json
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

folder = '{folder}'
past_names = json.load(open(f'{{folder}}/onnx_config.json'))['past']
prefill = ort.InferenceSession(f'{{folder}}/prefill.onnx', providers=['CPUExecutionProvider'])
decode = ort.InferenceSession(f'{{folder}}/decode.onnx', providers=['CPUExecutionProvider'])
tok = Tokenizer.from_file(f'{{folder}}/tokenizer.json')
eos = tok.token_to_id('</s>')

ids = np.array([tok.encode('def main():', add_special_tokens=False).ids], dtype=np.int64)  # (1, l), any l
mask = np.ones_like(ids)  # a batch: left-pad rows to the longest, mask 0 on the padding
logits, *cache = prefill.run(None, {{'input_ids': ids, 'attention_mask': mask}})
rng, new = np.random.default_rng(0), []
for _ in range(32):  # sample: temperature 0.8, top-k 40
    top = np.argsort(logits[0])[-40:]
    p = np.exp((logits[0, top] - logits[0, top].max()) / 0.8)
    token = int(rng.choice(top, p=p / p.sum()))
    if token == eos:
        break
    new.append(token)
    mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)  # one more column per step
    feeds = {{'input_ids': np.array([[token]], np.int64), 'attention_mask': mask, **dict(zip(past_names, cache))}}
    logits, *cache = decode.run(None, feeds)
print(tok.decode(new))"""
