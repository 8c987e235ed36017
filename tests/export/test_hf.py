"""Hugging Face (Bamba) export: transformers loads it with no custom code, logits and greedy tokens
match ours in float32 on CPU, the tokenizer loads with AutoTokenizer, and the import is bit-exact."""

from __future__ import annotations

import json

import pytest
import torch

from export import ExportError
from export.hf import (
    GROUPED_GATED_NORM_SINCE,
    bamba_norms_per_group,
    hf_torch_ops,
    import_hf,
    model_config_from_bamba,
    read_hf_config,
)
from model.bundle import load_bundle
from model.generation import SamplingParams, generate, left_pad

LOGIT_TOL = 1e-4  # float32, same op order up to SDPA/einsum blocking


@pytest.fixture(scope="module", params=["tiny_bundle_dir", "padded_bundle_dir"])
def exported(request, tmp_path_factory, export_cli):
    src = request.getfixturevalue(request.param)
    if load_bundle(src).model.cfg.mamba.n_groups > 1 and not bamba_norms_per_group():
        pytest.skip(f"transformers < {GROUPED_GATED_NORM_SINCE} normalizes Bamba's gated RMSNorm over all SSM groups "
                    "(the export refuses n_groups > 1 there: test_old_transformers_refuses_grouped_norm)")
    out = tmp_path_factory.mktemp(f"hf_{request.param}")
    assert export_cli.main(["--checkpoint", str(src), "--format", "hf", "--output", str(out)]) == 0
    return src, out


def test_transformers_loads_with_matching_logits(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = exported
    ours = load_bundle(src).model
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(theirs).__name__ == "BambaForCausalLM"
    assert theirs.config.rope_parameters["partial_rotary_factor"] == 1.0
    ids = torch.randint(4, ours.cfg.vocab_size, (2, 45), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), hf_torch_ops():  # Bamba's PyTorch code on CPU, whatever kernels import here
        ref, got = ours(ids), theirs(ids).logits
    assert got.shape[-1] == ours.cfg.padded_vocab_size
    diff = float((ref - got[..., : ours.cfg.vocab_size]).abs().max())
    print(f"HF logits max abs diff ({src.name}, vocab {ours.cfg.vocab_size}): {diff:.3g}")
    assert diff < LOGIT_TOL

    tok = AutoTokenizer.from_pretrained(str(out))
    text = "def parse(self, line):\n    return line.split()"
    assert tok(text, add_special_tokens=False).input_ids == load_bundle(src).tokenizer(text, add_special_tokens=False).input_ids
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)

    # Left-padded batch through transformers' own generate() == our cached generation.
    prompts = [ids[0, :30].tolist(), ids[1, :11].tolist()]
    padded, mask = left_pad(prompts, 0, torch.device("cpu"))
    with hf_torch_ops():
        hf_tokens = theirs.generate(padded, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[:, padded.size(1):].tolist()
    assert hf_tokens == generate(ours, prompts, SamplingParams(max_new_tokens=12))


def test_padding_ids_suppressed_and_card_written(exported):
    src, out = exported
    cfg = load_bundle(src).model.cfg
    gen = json.loads((out / "generation_config.json").read_text())
    padding = list(range(cfg.vocab_size, cfg.padded_vocab_size))
    assert gen.get("suppress_tokens") == (padding or None)
    report = json.loads((out / "export_report.json").read_text())
    assert report["numbers"]["import round trip bit-exact"] is True
    assert report["numbers"]["max abs logit diff (float32, CPU)"] < LOGIT_TOL
    assert "step" in (out / "README.md").read_text() and (out / "run_config.yaml").is_file()


def test_import_round_trip_is_exact(exported, export_cli, tmp_path):
    src, out = exported
    original = load_bundle(src).model
    back = import_hf(out)
    assert back.cfg.model_dump(exclude={"impl"}) == original.cfg.model_dump(exclude={"impl"})
    for k, v in original.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    # The CLI path writes a loadable bundle.
    bundle_dir = tmp_path / "bundle"
    assert export_cli.main(["--import-hf", str(out), "--output", str(bundle_dir), "--set", "export.verify=false"]) == 0
    reloaded = load_bundle(bundle_dir)
    assert all(torch.equal(v, reloaded.model.state_dict()[k]) for k, v in original.state_dict().items())


def test_import_without_our_config_derives_it(exported, tmp_path):
    """A Bamba folder from elsewhere (no hybrid_lm_config.json): the config is derived from Bamba's."""
    import shutil

    src, out = exported
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    (bare / "hybrid_lm_config.json").unlink()
    ours = load_bundle(src).model
    back = import_hf(bare)
    assert back.cfg.layer_pattern == ours.cfg.layer_pattern and back.cfg.head_dim == ours.cfg.head_dim
    ids = torch.randint(4, ours.cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(back(ids)[..., : ours.cfg.vocab_size], ours(ids))


def test_partial_rotary_bamba_is_refused(exported):
    _, out = exported
    hf = read_hf_config(out)
    hf.rope_parameters = {**hf.rope_parameters, "partial_rotary_factor": 0.5}
    with pytest.raises(ExportError, match="partial_rotary_factor"):
        model_config_from_bamba(hf)


def test_qk_norm_export_refused_in_one_line(qk_norm_bundle_dir, tmp_path, export_cli, capsys):
    rc = export_cli.main(["--checkpoint", str(qk_norm_bundle_dir), "--format", "hf", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "qk_norm" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cpu_work_never_calls_cuda_kernels_that_import(exported, monkeypatch):
    """causal_conv1d / mamba_ssm importable (faked), model on CPU: our model resolves to the reference
    path, and the HF parity check runs transformers' Bamba on its PyTorch code; neither calls a kernel.
    The check's prompt spans several SSD chunks and reports the real float32 difference."""
    import functools
    import inspect
    from types import SimpleNamespace

    from transformers.models.bamba import modeling_bamba

    import model.kernels as kernels
    import model.layers
    import model.mamba2
    from export.hf import HF_KERNEL_FUNCS
    from export.runner import hf_parity, hf_parity_prompts

    called = []

    def cuda_only(name, torch_fn=None):
        def kernel(*args, **kwargs):
            called.append(name)
            raise RuntimeError("Expected x.is_cuda() to be true")
        return functools.wraps(torch_fn)(kernel) if torch_fn else kernel

    for name in HF_KERNEL_FUNCS:  # as transformers wires them when the packages import
        monkeypatch.setattr(modeling_bamba, name, cuda_only(name, inspect.unwrap(getattr(modeling_bamba, name))))
    fake = SimpleNamespace(**{op: cuda_only(op) for op in (
        "chunk_scan", "split_conv1d_scan", "split_conv1d_scan_saved", "state_update", "rmsnorm_gated",
        "add_rms_norm", "swiglu", "conv", "update")})
    for module in (kernels, model.mamba2, model.layers):
        for accessor in ("mamba_ops", "conv_ops"):
            if hasattr(module, accessor):
                monkeypatch.setattr(module, accessor, lambda: fake)
    src, out = exported
    ours = load_bundle(src).model
    assert ours.set_impl() == "reference"
    prompts = hf_parity_prompts(ours, 64)
    numbers = hf_parity(ours, out, prompts, new_tokens=4)
    assert called == []
    q = ours.cfg.mamba.chunk_size
    assert len(prompts[0]) > 3 * q and len(prompts[0]) % q  # several chunks, the last one partial
    assert numbers["parity prompt tokens (SSD chunks)"] == f"{len(prompts[0])} ({-(-len(prompts[0]) // q)} of {q})"
    diff = numbers["max abs logit diff (float32, CPU)"]
    print(f"HF parity over {len(prompts[0])} tokens ({src.name}): max abs logit diff {diff:.3g}")
    assert diff < LOGIT_TOL


@pytest.mark.parametrize("kind", ["linear", "ntk", "yarn"])
def test_rope_scaling_exports_with_matching_logits(kind, tiny_bundle_dir, tmp_path):
    """model.attention.rope_scaling travels as Bamba's rope_parameters: transformers' logits match ours
    at positions past the original length, and the derived config (no hybrid_lm_config.json) builds the
    same tables (ntk comes back as plain RoPE at its raised base)."""
    from transformers import AutoModelForCausalLM

    from export.hf import export_hf
    from model import HybridLM
    from tests.export.conftest import small_config

    torch.manual_seed(5)
    scaling = {"type": kind, "factor": 4.0, "original_max_seq_len": 16}
    ours = HybridLM(small_config(attention={"n_heads": 4, "n_kv_heads": 2, "rope_scaling": scaling},
                                 max_seq_len=64)).eval()
    out = export_hf(ours, load_bundle(tiny_bundle_dir).tokenizer, tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.randint(4, ours.cfg.vocab_size, (1, 60), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), hf_torch_ops():
        diff = float((ours(ids) - theirs(ids).logits[..., : ours.cfg.vocab_size]).abs().max())
    assert diff < LOGIT_TOL, diff
    (out / "hybrid_lm_config.json").unlink()
    derived = model_config_from_bamba(read_hf_config(out))
    back = HybridLM(derived).eval()
    back.load_state_dict(ours.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(back(ids), ours(ids), rtol=0, atol=1e-5)
    assert (derived.attention.rope_scaling is None) == (kind == "ntk")


def test_unsupported_rope_type_is_refused(exported):
    _, out = exported
    hf = read_hf_config(out)
    hf.rope_parameters = {**hf.rope_parameters, "rope_type": "longrope"}
    with pytest.raises(ExportError, match="rope_type longrope"):
        model_config_from_bamba(hf)


def test_old_transformers_refuses_grouped_norm(padded_bundle_dir, tiny_bundle_dir, tmp_path, export_cli, monkeypatch,
                                               capsys):
    """transformers 5.17's Bamba (the GPU image's) normalizes the gated RMSNorm over all groups: exporting
    n_groups = 2 there stops with one line before writing anything; n_groups = 1 exports as before."""
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    assert export_cli.main(["--checkpoint", str(padded_bundle_dir), "--format", "hf",
                            "--output", str(tmp_path / "grouped")]) == 2
    assert "mamba.n_groups=2 with transformers 5.17.0" in capsys.readouterr().err
    assert not (tmp_path / "grouped").exists()
    assert export_cli.main(["--checkpoint", str(tiny_bundle_dir), "--format", "hf", "--output", str(tmp_path / "one"),
                            "--set", "export.verify=false"]) == 0


def test_failed_parity_keeps_no_export(tiny_bundle_dir, tmp_path, export_cli, monkeypatch, capsys):
    """A transformers load that computes another model (here: its logits' difference faked to 0.5) fails the
    export with one line, and the output folder is not created."""
    import export.runner as runner

    real = runner.hf_parity
    off = {"max abs logit diff (float32, CPU)": 0.5}
    monkeypatch.setattr(runner, "hf_parity", lambda *a, **k: {**real(*a, **k), **off})
    args = ["--checkpoint", str(tiny_bundle_dir), "--format", "hf", "--output", str(tmp_path / "o")]
    assert export_cli.main(args) == 2
    assert "disagrees with this model: max abs logit difference 0.5" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
