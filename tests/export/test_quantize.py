"""Weight-only quantization: each CPU method exports (card numbers), saves, loads back identically
and generates; a CUDA-only method fails on CPU with a one-line error that says so."""

from __future__ import annotations

import json

import pytest
import torch

from export import ExportError
from export.hf import hf_torch_ops
from export.loading import load_checkpoint
from export.quantize import METHODS, check_runnable, load_quantized, quantize_model, save_quantized
from model.bundle import load_bundle
from model.generation import SamplingParams, generate
from model.wgrad import Linear

CPU = torch.device("cpu")


def need_package(method: str) -> None:
    """Skip (with the reason) where the method's quantization library is not installed."""
    package = METHODS[method].library
    pytest.importorskip(package, reason=f"{method} needs {package}, not installed here")


@pytest.mark.parametrize("fmt,backend,method,data", [
    ("int8", "torchao", "torchao-int8", "--eval-text"),
    ("int8", "bitsandbytes", "bnb-int8", "--eval-text"),
    ("nf4", "torchao", "bnb-nf4", "--manifest"),
])
def test_quantized_export_loads_and_generates(fmt, backend, method, data, tiny_bundle_dir, eval_text, val_manifest,
                                              tmp_path, export_cli):
    need_package(method)
    out = tmp_path / fmt
    source = str(eval_text) if data == "--eval-text" else val_manifest
    rc = export_cli.main(["--checkpoint", str(tiny_bundle_dir), "--format", fmt, "--output", str(out),
                          data, source, "--set", f"export.int8_backend={backend}",
                          "--set", "export.eval_tokens=2048", "--set", "export.throughput_new_tokens=4"])
    assert rc == 0
    numbers = json.loads((out / "export_report.json").read_text())["numbers"]
    print(f"{method}: {json.dumps(numbers)}")
    assert numbers["size ratio"] < 0.8
    assert numbers[f"perplexity, {method}"] > 1 and numbers[f"decode tokens/s, {method}"] > 0
    assert json.loads((out / "quantization.json").read_text())["method"] == method

    bundle = load_checkpoint(out, CPU)  # the path launch/generate.py takes
    tokens = generate(bundle.model, [[1, 40, 41, 42]], SamplingParams(max_new_tokens=6))
    assert len(tokens[0]) == 6 and all(0 <= t < bundle.model.cfg.vocab_size for t in tokens[0])


@pytest.mark.parametrize("method", ["torchao-int8", "bnb-int8", "bnb-nf4"])
def test_save_load_is_exact(method, tiny_bundle_dir, tmp_path):
    need_package(method)
    model = load_bundle(tiny_bundle_dir).model
    ids = torch.randint(4, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    q = quantize_model(model, METHODS[method], 64, CPU)
    save_quantized(q, METHODS[method], 64, tmp_path)
    with torch.no_grad():
        before = q(ids)
        after = load_quantized(tmp_path, CPU)(ids)
    assert torch.equal(before, after)
    # Mamba2's in_proj and out_proj are both quantized (the fused scan hands a swapped out_proj its output)
    mixer = q.layers[0].mixer
    assert all(type(lin) is not Linear or type(lin.weight) is not torch.nn.Parameter
               for lin in (mixer.in_proj, mixer.out_proj))


def test_int4_on_cpu_is_a_one_line_cuda_error(tiny_bundle_dir, tmp_path, export_cli, capsys):
    with pytest.raises(ExportError, match="needs CUDA"):
        check_runnable(METHODS["torchao-int4"], CPU)
    rc = export_cli.main(["--checkpoint", str(tiny_bundle_dir), "--format", "int4", "--output", str(tmp_path / "o"),
                          "--set", "export.device=cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "needs CUDA" in err
    assert not (tmp_path / "o").exists()


def test_quantized_export_needs_evaluation_text(tiny_bundle_dir, tmp_path, export_cli, capsys):
    rc = export_cli.main(["--checkpoint", str(tiny_bundle_dir), "--format", "nf4", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--eval-text" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("method,tolerance", [("torchao-int8", 1e-4), ("bnb-int8", 1e-4), ("bnb-nf4", 1e-2)])
def test_quantized_folder_loads_in_plain_transformers(method, tolerance, tiny_bundle_dir, tmp_path):
    """AutoModelForCausalLM reads the folder through transformers' own quantizer (TorchAoConfig /
    BitsAndBytesConfig in config.json) and matches our reload: tolerance relative to the largest logit
    (NF4: the two libraries' CPU kernels round the dequantized matmul differently)."""
    need_package(method)
    from transformers import AutoModelForCausalLM

    from export.quantize import _cpu_packing_guard

    bundle = load_bundle(tiny_bundle_dir)
    tok = bundle.tokenizer
    special = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    save_quantized(quantize_model(bundle.model, METHODS[method], 64, CPU), METHODS[method], 64, tmp_path, special)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    library = {"torchao-int8": "torchao", "bnb-int8": "bitsandbytes", "bnb-nf4": "bitsandbytes"}[method]
    assert theirs.config.quantization_config.quant_method.value == library
    mamba = theirs.model.layers[0].mamba
    if library == "bitsandbytes":
        import bitsandbytes as bnb

        assert isinstance(mamba.in_proj, bnb.nn.Linear8bitLt if method == "bnb-int8" else bnb.nn.Linear4bit)
        for module in theirs.modules():  # bitsandbytes' AVX512 CPU repacking needs out_features % 32 (see docs)
            if isinstance(module, bnb.nn.Linear4bit):
                _cpu_packing_guard(module)
    else:
        assert type(mamba.in_proj.weight).__name__ == "Int8Tensor"
    ids = torch.randint(4, bundle.model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), hf_torch_ops():  # Bamba's PyTorch code on the CPU, whatever CUDA kernels import here
        ours = load_quantized(tmp_path, CPU)(ids).float()
        hf = theirs(ids).logits.float()
    ours = ours[..., : hf.size(-1)]
    assert (hf - ours).abs().max() <= tolerance * ours.abs().max()
