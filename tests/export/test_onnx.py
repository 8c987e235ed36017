"""ONNX export of the reference path: onnxruntime matches PyTorch (prefill and decode steps, dynamic
batch and lengths, left padding), and a greedy loop purely in onnxruntime gives PyTorch's tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

for _package in ("onnx", "onnxscript", "onnxruntime"):  # the exporter and the runtime the tests compare
    pytest.importorskip(_package, reason=f"{_package} is not installed here (ONNX export tests need it)")

from export.onnx_runtime import OnnxLM
from model.bundle import load_bundle
from model.generation import SamplingParams, generate
from tests.conftest import built_once

pytestmark = pytest.mark.slow  # launched runs / long exports: the full tier only (README, "Tests")

REL_TOL = 1e-4  # max |ort - torch| / max |torch|, float32


@pytest.fixture(scope="session")
def onnx_dir(padded_bundle_dir, tmp_path_factory, export_cli):
    """One export per test run (the dynamo export dominates the cost), also when xdist hands this module's
    tests to both workers (their padded bundles are the same seeded model): pattern AMMA, vocab 500."""
    def export(out: Path) -> Path:
        assert export_cli.main(["--checkpoint", str(padded_bundle_dir), "--format", "onnx", "--output", str(out),
                                "--set", "export.parity_tokens=40", "--set", "export.parity_new_tokens=8"]) == 0
        return out

    return built_once(tmp_path_factory, "onnx", export)


@pytest.fixture(scope="module")
def model(padded_bundle_dir):
    m = load_bundle(padded_bundle_dir).model
    m.set_impl("reference")
    return m


def rel(a: np.ndarray, b: torch.Tensor) -> float:
    return float(np.abs(a - b.numpy()).max() / b.abs().max())


@pytest.mark.parametrize("lengths", [[4], [70], [4, 70, 17], [70, 70, 70]])
def test_prefill_and_steps_match_pytorch(onnx_dir, model, lengths):
    """Batch 1 and 3, prompt lengths 4 and 70 (not multiples of the 16-token chunk), in plain onnxruntime."""
    lm = OnnxLM(onnx_dir)
    gen = torch.Generator().manual_seed(len(lengths))
    prompts = [torch.randint(4, model.cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    ids_np, mask_np = lm.padded_batch(prompts, pad_id=0)
    assert ids_np.shape == (len(lengths), max(lengths))  # no padding to whole chunks outside the graph
    with torch.no_grad():
        ref, cache = model.prefill(torch.from_numpy(ids_np), torch.from_numpy(mask_np))
        got, states = lm.prefill(ids_np, mask_np)
        errors = [rel(got, ref)]
        token = ref.argmax(-1)
        for _ in range(6):
            mask_np = np.concatenate([mask_np, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
            got, states = lm.step(token.numpy(), mask_np, states)
            ref = model.step(token, cache)
            errors.append(rel(got, ref))
            token = ref.argmax(-1)
    print(f"ONNX rel. errors, lengths {lengths}: prefill {errors[0]:.2g}, steps max {max(errors[1:]):.2g}")
    assert max(errors) < REL_TOL
    # The growing cache has the declared names and shapes.
    names = json.loads((onnx_dir / "onnx_config.json").read_text())["present"]
    assert len(names) == len(states) == 2 * model.cfg.n_layers
    key = states[names.index("present.0.key")]
    assert key.shape == (len(prompts), 2, mask_np.shape[1], model.cfg.head_dim)


def test_onnxruntime_greedy_equals_pytorch(onnx_dir, model):
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(4, model.cfg.vocab_size, (n,), generator=gen).tolist() for n in (2, 33)]
    ort_tokens = OnnxLM(onnx_dir).greedy(prompts, max_new_tokens=12)
    assert ort_tokens == generate(model, prompts, SamplingParams(max_new_tokens=12))


def test_card_reports_parity(onnx_dir):
    report = json.loads((onnx_dir / "export_report.json").read_text())["numbers"]
    assert report["prefill logits max rel. error"] < REL_TOL
    assert report["greedy tokens equal (onnxruntime loop vs PyTorch)"] == "16/16"
    assert (onnx_dir / "prefill.onnx").is_file() and (onnx_dir / "decode.onnx").is_file()


def test_graph_axes_are_symbolic(onnx_dir):
    """Batch, prompt and cache lengths are named (dim_param) axes in both graphs, never baked-in sizes."""
    import onnx

    for name, axes in (("prefill.onnx", {"input_ids": (0, 1), "attention_mask": (0, 1)}),
                       ("decode.onnx", {"input_ids": (0,), "attention_mask": (0, 1), "past.0.key": (0, 2)})):
        inputs = {i.name: i.type.tensor_type.shape.dim for i in onnx.load(str(onnx_dir / name)).graph.input}
        for tensor, dims in axes.items():
            assert all(inputs[tensor][d].dim_param and not inputs[tensor][d].dim_value for d in dims), (name, tensor)


def test_card_example_samples_in_plain_onnxruntime(onnx_dir, tmp_path):
    """The card's usage block runs as written (saved as a file and run): onnxruntime + tokenizers only, a short
    prompt, sampling."""
    import re
    import subprocess
    import sys

    card = (onnx_dir / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "OnnxLM" not in code and "rng.choice" in code
    example = tmp_path / "card_example.py"
    example.write_text(code)
    proc = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_graph_with_a_fixed_batch_is_refused(tmp_path):
    """check_symbolic: a saved graph whose batch axis is a number (what one torch's capture produced) is an
    ExportError naming the axis; symbolic axes pass."""
    import onnx
    from onnx import TensorProto, helper

    from export import ExportError
    from export.onnx_export import check_symbolic

    def save(batch) -> object:
        x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, "length"])
        y = helper.make_tensor_value_info("out", TensorProto.INT64, [batch, "length"])
        graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["out"])], "g", [x], [y])
        path = tmp_path / f"{batch}.onnx"
        onnx.save(helper.make_model(graph), str(path))
        return path

    check_symbolic(save("batch"), {"input_ids": (0, 1)})
    with pytest.raises(ExportError, match=r"fixed sizes where batch and length must be symbolic \(input_ids\[0\]=2\)"):
        check_symbolic(save(2), {"input_ids": (0, 1)})
