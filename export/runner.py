"""One function per export format: write the files, measure what the card reports, write the card.

Each `run_*` takes a loaded checkpoint (`model.bundle.Bundle`), the resolved RunConfig and an
output folder, and returns the numbers it measured (also in the folder's export_report.json).
`final` is where the folder will live once complete (launch/export.py writes into a temporary
folder and renames it into place): the card's usage lines name it.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from config.schema import RunConfig
from export import ExportError
from export.card import onnx_usage, write_card
from export.hf import hf_torch_ops, export_hf, import_hf, write_hf_tokenizer
from export.measure import (
    decode_tokens_per_s,
    file_bytes,
    manifest_validation_tokens,
    perplexity,
    text_tokens,
)
from export.quantize import (
    check_runnable,
    load_quantized,
    quantize_model,
    resolve_method,
    save_quantized,
)
from model.bundle import TOKENIZER_JSON, TOKENIZER_MODEL, Bundle, save_bundle
from model.generation import SamplingParams, generate, left_pad
from model.hybrid import HybridLM
from model.weights import WEIGHTS_NAME

log = logging.getLogger(__name__)


def sample_prompts(model: HybridLM, length: int, seed: int = 0) -> list[list[int]]:
    """Two deterministic random prompts, `length` and `length // 2 + 1` tokens (ids >= 4: no specials)."""
    gen = torch.Generator().manual_seed(seed)
    hi = model.cfg.vocab_size
    return [torch.randint(4, hi, (n,), generator=gen).tolist() for n in (length, length // 2 + 1)]


def _copy_side_files(src: Path, out: Path) -> None:
    for name in (TOKENIZER_JSON, TOKENIZER_MODEL, "meta.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)


def hf_parity_prompts(model: HybridLM, tokens: int) -> list[list[int]]:
    """`sample_prompts` over more than 3 SSD chunks, the last one partial: within one whole chunk neither
    the chunk-to-chunk state passing nor the scans' padding is exercised, and the difference read 0.0."""
    q = model.cfg.mamba.chunk_size
    n = max(tokens, 3 * q)
    return sample_prompts(model, n + q // 2 if n % q == 0 else n)


@torch.inference_mode()
def hf_parity(model: HybridLM, hf_dir: Path, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """Float32 CPU comparison of our model and transformers' load of `hf_dir`: logits and greedy tokens.
    Both run their PyTorch code (`set_impl("reference")`, `hf_torch_ops`), even where kernels import."""
    from transformers import AutoModelForCausalLM

    ours = copy.deepcopy(model).float().cpu().eval()
    ours.set_impl("reference")
    theirs = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids, mask = left_pad(prompts, pad_id=0, device=torch.device("cpu"))
    full = torch.tensor([prompts[0], prompts[0][::-1]])  # two unpadded rows: every position compared, batched
    with hf_torch_ops():
        ref = ours(full)
        got = theirs(full).logits[..., : ours.cfg.vocab_size]
        greedy = generate(ours, prompts, SamplingParams(max_new_tokens=new_tokens))
        hf_out = theirs.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[:, ids.size(1):].tolist()
    match = sum(a == b for g, h in zip(greedy, hf_out) for a, b in zip(g, h))
    q = ours.cfg.mamba.chunk_size
    return {
        "transformers class": type(theirs).__name__,
        "parity prompt tokens (SSD chunks)": f"{ids.size(1)} ({-(-ids.size(1) // q)} of {q})",
        "max abs logit diff (float32, CPU)": float((ref - got).abs().max()),
        "max abs logit": float(ref.abs().max()),
        "greedy tokens equal (batch of 2, left-padded)": f"{match}/{sum(len(g) for g in greedy)}",
    }


HF_PARITY_RTOL = 1e-3  # of the largest logit; both sides float32 on the CPU, so only the op order differs


def check_hf_parity(numbers: dict[str, Any]) -> None:
    """ExportError when transformers' load computes another model than ours (the export is then not kept)."""
    diff, largest = numbers["max abs logit diff (float32, CPU)"], numbers["max abs logit"]
    if not diff <= HF_PARITY_RTOL * max(1.0, largest):
        raise ExportError(
            f"transformers' BambaForCausalLM disagrees with this model: max abs logit difference {diff:.3g} (largest "
            f"logit {largest:.3g}, allowed {HF_PARITY_RTOL:g} of it), so the export was not kept; check that the "
            "installed transformers is the version requirements.txt pins, or export --format onnx")


def run_hf(bundle: Bundle, run_cfg: RunConfig, out: Path, final: Path | None = None) -> dict[str, Any]:
    """BambaForCausalLM folder + tokenizer; verified by logits parity and an exact import round trip."""
    exp = run_cfg.export
    model = bundle.model
    export_hf(model, bundle.tokenizer, out)
    numbers: dict[str, Any] = {}
    if exp.verify:
        numbers = hf_parity(model, out, hf_parity_prompts(model, exp.parity_tokens), exp.parity_new_tokens)
        check_hf_parity(numbers)
        back = import_hf(out).state_dict()
        numbers["import round trip bit-exact"] = all(
            torch.equal(v.cpu(), back[k].to(v.dtype)) for k, v in model.state_dict().items())
    write_card(
        out, fmt="hf", source=bundle.folder, meta=bundle.meta, run_cfg=run_cfg, numbers=numbers,
        what="A Hugging Face transformers `BambaForCausalLM` folder (no custom code) with its tokenizer. "
             "`hybrid_lm_config.json` keeps our ModelConfig for an exact import back "
             "(`python launch/export.py --import-hf THIS --output BUNDLE`).",
        usage=f"from transformers import AutoModelForCausalLM, AutoTokenizer\n"
              f"tok = AutoTokenizer.from_pretrained('{final or out}')\n"
              f"model = AutoModelForCausalLM.from_pretrained('{final or out}')\n"
              f"ids = tok('def main():', return_tensors='pt').input_ids\n"
              f"print(tok.decode(model.generate(ids, max_new_tokens=32)[0]))",
        notes=[f"vocabulary padded to {model.cfg.padded_vocab_size} (a multiple of 128); ids >= "
               f"{model.cfg.vocab_size} are listed in generation_config.json's suppress_tokens"]
        if model.cfg.padded_vocab_size != model.cfg.vocab_size else None,
    )
    return numbers


def run_import_hf(hf_dir: Path, run_cfg: RunConfig, out: Path, final: Path | None = None) -> dict[str, Any]:
    """A Bamba folder -> our bundle (weights, config, tokenizer, meta), verified against transformers."""
    model = import_hf(hf_dir)
    save_bundle(model, hf_dir, out, meta={"imported_from": str(hf_dir)})
    numbers: dict[str, Any] = {}
    if run_cfg.export.verify:
        numbers = hf_parity(model, hf_dir, hf_parity_prompts(model, run_cfg.export.parity_tokens),
                            run_cfg.export.parity_new_tokens)
    write_card(
        out, fmt="import from hf", source=hf_dir, meta={}, run_cfg=run_cfg, numbers=numbers,
        what="A consolidated checkpoint (bundle) imported from a Hugging Face Bamba folder.",
        usage=f"from model.bundle import load_bundle\nbundle = load_bundle('{final or out}')",
    )
    return numbers


@torch.inference_mode()
def onnx_parity(model: HybridLM, onnx_dir: Path, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """onnxruntime vs PyTorch (reference path): prefill and per-step logits, and greedy tokens."""
    import numpy as np

    from export.onnx_runtime import OnnxLM

    ort_lm = OnnxLM(onnx_dir)
    ids_np, mask_np = ort_lm.padded_batch(prompts, pad_id=0)
    ids, mask = torch.from_numpy(ids_np), torch.from_numpy(mask_np)
    ref_logits, cache = model.prefill(ids, mask)
    got_logits, states = ort_lm.prefill(ids_np, mask_np)
    rel = lambda a, b: float(np.abs(a - b.float().numpy()).max() / b.abs().max())  # noqa: E731
    prefill_err, step_err = rel(got_logits, ref_logits), 0.0
    token = ref_logits.argmax(-1)
    for _ in range(new_tokens):
        mask_np = np.concatenate([mask_np, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
        got_logits, states = ort_lm.step(token.numpy(), mask_np, states)
        ref_logits = model.step(token, cache)
        step_err = max(step_err, rel(got_logits, ref_logits))
        token = ref_logits.argmax(-1)
    ours = generate(model, prompts, SamplingParams(max_new_tokens=new_tokens))
    theirs = ort_lm.greedy(prompts, new_tokens)
    match = sum(a == b for g, h in zip(ours, theirs) for a, b in zip(g, h))
    return {
        "prefill logits max rel. error": prefill_err,
        f"decode-step logits max rel. error ({new_tokens} steps)": step_err,
        "greedy tokens equal (onnxruntime loop vs PyTorch)": f"{match}/{sum(len(g) for g in ours)}",
        "onnxruntime providers": ",".join(ort_lm.prefill_session.get_providers()),
    }


def run_onnx(bundle: Bundle, run_cfg: RunConfig, out: Path, final: Path | None = None) -> dict[str, Any]:
    """prefill.onnx + decode.onnx of the reference path, verified in onnxruntime."""
    from export.onnx_export import export_onnx

    exp = run_cfg.export
    model = bundle.model
    if exp.dtype == "auto" and model.embed.weight.dtype != torch.float32:
        model = copy.deepcopy(model).float()  # onnxruntime's CPU kernels want float32
    info = export_onnx(model, out, exp.onnx_opset)
    write_hf_tokenizer(bundle.tokenizer, out, model.cfg.max_seq_len)
    numbers: dict[str, Any] = {}
    if exp.verify:
        ref = copy.deepcopy(model).cpu().eval()
        ref.set_impl("reference")
        numbers = onnx_parity(ref, out, sample_prompts(model, exp.parity_tokens), exp.parity_new_tokens)
    write_card(
        out, fmt="onnx", source=bundle.folder, meta=bundle.meta, run_cfg=run_cfg, numbers=numbers,
        what=f"Two ONNX graphs of the reference (pure PyTorch) path, exported with {info['exporter']}: "
             f"`prefill.onnx` (input_ids, attention_mask -> logits, present.*) and `decode.onnx` "
             f"(input_ids, attention_mask, past.* -> logits, present.*), dynamic batch and sequence axes: "
             "prompts of any length run in plain onnxruntime (`onnx_config.json` lists the cache tensors; "
             "this project's greedy loop is `export.onnx_runtime.OnnxLM`).",
        usage=onnx_usage(final or out),
    )
    return numbers


def validation_tokens(run_cfg: RunConfig, bundle: Bundle) -> torch.Tensor:
    """Manifest validation split (data.manifest) or export.eval_text, at most export.eval_tokens."""
    exp = run_cfg.export
    if run_cfg.data.manifest and (Path(run_cfg.data.manifest).is_file() or not exp.eval_text):
        return manifest_validation_tokens(run_cfg.data.manifest, exp.eval_tokens)
    if exp.eval_text:
        return text_tokens(exp.eval_text, bundle.tokenizer, exp.eval_tokens)
    raise ExportError("quantized exports report perplexity: pass --manifest MANIFEST or --eval-text FILE "
                      "(or --set export.verify=false to skip the measurements)")


def run_quantized(bundle: Bundle, run_cfg: RunConfig, out: Path, fmt: str, device: torch.device,
                  final: Path | None = None) -> dict[str, Any]:
    """Weight-only quantized folder; reports size, perplexity delta and decode tokens/s vs the float model."""
    exp = run_cfg.export
    method = resolve_method(fmt, exp.int8_backend)
    check_runnable(method, device)
    model = bundle.model.to(device)
    tokens = validation_tokens(run_cfg, bundle) if exp.verify else None
    numbers: dict[str, Any] = {}
    if tokens is not None:
        base = perplexity(model, tokens, exp.eval_seq_len)
        numbers["validation tokens scored"] = base["tokens"]
        numbers["perplexity, float"] = base["ppl"]
        numbers["decode tokens/s, float"] = decode_tokens_per_s(model, exp.parity_tokens, exp.throughput_new_tokens)
    quantized = quantize_model(copy.deepcopy(model), method, exp.quant_group_size, device)
    tok = bundle.tokenizer
    special = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    save_quantized(quantized, method, exp.quant_group_size, out, special)  # before any forward: see save_quantized
    _copy_side_files(bundle.folder, out)
    write_hf_tokenizer(tok, out, model.cfg.max_seq_len)  # tokenizer_config.json: AutoTokenizer loads the folder
    del quantized
    reloaded = load_quantized(out, device)
    float_size = (bundle.folder / WEIGHTS_NAME).stat().st_size
    quant_size = file_bytes(out, WEIGHTS_NAME)
    numbers["model.safetensors MiB, float"] = float_size / 2**20
    numbers[f"model.safetensors MiB, {method.name}"] = quant_size / 2**20
    numbers["size ratio"] = quant_size / float_size
    if tokens is not None:
        q = perplexity(reloaded, tokens, exp.eval_seq_len)
        numbers[f"perplexity, {method.name}"] = q["ppl"]
        numbers["perplexity delta (abs)"] = q["ppl"] - numbers["perplexity, float"]
        numbers["perplexity delta (%)"] = 100 * (q["ppl"] / numbers["perplexity, float"] - 1)
        numbers[f"decode tokens/s, {method.name}"] = decode_tokens_per_s(
            reloaded, exp.parity_tokens, exp.throughput_new_tokens)
        numbers["device"] = str(device)
    write_card(
        out, fmt=fmt, source=bundle.folder, meta=bundle.meta, run_cfg=run_cfg, numbers=numbers,
        what=f"{method.summary}: the block Linears quantized (Mamba2 out_proj, embedding, head, norms, conv "
             "and dt/A/D kept in the checkpoint dtype). On-disk format: a Hugging Face Bamba folder whose "
             "config.json carries transformers' own quantization_config, + hybrid_lm_config.json + "
             "quantization.json (see export/quantize.py and docs/export.md).",
        usage=f"from transformers import AutoModelForCausalLM, AutoTokenizer\n"
              f"model = AutoModelForCausalLM.from_pretrained('{final or out}', device_map='{device.type}')\n"
              f"tokenizer = AutoTokenizer.from_pretrained('{final or out}')\n"
              f"# or here: export.quantize.load_quantized('{final or out}', torch.device('{device.type}')), or\n"
              f"# python launch/generate.py --checkpoint {final or out} --prompt 'def main():'",
        notes=[f"{method.name} runs on CUDA only" if method.cuda_only else f"{method.name} runs on CPU and CUDA"],
    )
    return numbers
