"""Import of GraniteMoeHybridForCausalLM folders (dense Granite 4.0-H): logits parity with transformers
(float32, reference path), the convert entrypoint, the loaders reading the folder directly, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from export.hf import hf_torch_ops, import_hf
from export.loading import load_checkpoint
from model.bundle import load_bundle

REL_TOL = 1e-4  # max |ours - transformers| / max |transformers|, float32


@pytest.fixture(scope="module")
def granite_dir(tmp_path_factory, test_tokenizer_dir, granite_factory):
    return granite_factory(tmp_path_factory.mktemp("granite"), test_tokenizer_dir)


def max_rel_error(folder, ids: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ours = import_hf(folder)
    ours.set_impl("reference")
    with torch.no_grad(), hf_torch_ops():
        ref = theirs(ids).logits[..., : ours.cfg.vocab_size]
        got = ours(ids)
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("position_embedding", ["nope", "rope"])
def test_logits_parity(position_embedding, granite_dir, tmp_path, test_tokenizer_dir, granite_factory):
    folder = granite_dir if position_embedding == "nope" else granite_factory(
        tmp_path / "rope", test_tokenizer_dir, seed=1, position_embedding_type="rope",
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, tie_word_embeddings=False)
    cfg = import_hf(folder).cfg
    assert cfg.attention.rope is (position_embedding == "rope") and cfg.layer_pattern == "MMAMA"
    assert (cfg.scales.embedding, cfg.scales.residual, cfg.scales.attention, cfg.scales.logits_divisor) == \
        (12.0, 0.246, 0.0078125, 8.0)
    ids = torch.randint(4, 512, (2, 56), generator=torch.Generator().manual_seed(0))  # 3.5 SSD chunks
    err = max_rel_error(folder, ids)
    print(f"granite {position_embedding}: max rel logit error {err:.3g}")
    assert err <= REL_TOL


def test_scales_change_the_logits(granite_dir):
    """The parity above needs every multiplier: our model without one of them is far off."""
    ids = torch.randint(4, 512, (1, 20), generator=torch.Generator().manual_seed(1))
    ours = import_hf(granite_dir)
    with torch.no_grad():
        ref = ours(ids)
        for key in ("embedding", "residual", "attention", "logits_divisor"):
            plain = ours.cfg.model_copy(update={"scales": ours.cfg.scales.model_copy(update={key: 1.0})})
            other = type(ours)(plain)
            other.load_state_dict(ours.state_dict())
            assert float((other(ids) - ref).abs().max()) > 1e-3 * float(ref.abs().max()), key


@pytest.mark.slow
def test_convert_cli_and_direct_loading(granite_dir, tmp_path, export_cli, capsys):
    out = tmp_path / "bundle"
    assert export_cli.main(["--import-hf", str(granite_dir), "--output", str(out)]) == 0
    numbers = json.loads(capsys.readouterr().out)["numbers"]
    assert numbers["transformers class"] == "GraniteMoeHybridForCausalLM"
    assert numbers["max abs logit diff (float32, CPU)"] <= REL_TOL * numbers["max abs logit"]
    done, total = numbers["greedy tokens equal (batch of 2, left-padded)"].split("/")
    assert done == total  # our cached decode == transformers' generate()
    bundle, direct = load_bundle(out), load_checkpoint(granite_dir, torch.device("cpu"))
    assert bundle.model.cfg == direct.model.cfg and bundle.model.cfg.scales.residual == 0.246
    for k, v in direct.model.state_dict().items():
        assert torch.equal(v, bundle.model.state_dict()[k]), k
    # Bamba has no multipliers and always RoPE: the HF export refuses the imported model in one line.
    rc = export_cli.main(["--checkpoint", str(out), "--format", "hf", "--output", str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "model.scales" in err


@pytest.mark.parametrize("override, named", [
    ({"num_local_experts": 4, "num_experts_per_tok": 2}, "MoE experts (num_local_experts=4"),
    ({"hidden_act": "gelu"}, "hidden_act gelu"),
    ({"attention_bias": True}, "attention_bias=true"),
])
def test_unsupported_granite_refused_in_one_line(override, named, tmp_path, export_cli, capsys):
    from transformers import GraniteMoeHybridConfig

    folder = tmp_path / "granite"
    GraniteMoeHybridConfig(hidden_size=64, num_hidden_layers=2, layer_types=["mamba", "attention"],
                           num_attention_heads=4, mamba_n_heads=8, **{"num_local_experts": 0, **override}
                           ).save_pretrained(str(folder))
    rc = export_cli.main(["--import-hf", str(folder), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert named in err and "GraniteMoeHybrid" in err
    assert not (tmp_path / "out").exists()


def test_lm_eval_backend_reads_the_folder_with_its_logit_scaling(granite_dir):
    """eval/lm_backend.py loads the Granite folder directly and its head divides by logits_scaling, as
    HybridLM.forward does."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness (lm_eval) is not installed here")
    from lm_eval.api.instance import Instance

    from eval.lm_backend import HybridEvalLM
    from eval.run import check_checkpoint

    check_checkpoint(granite_dir)  # eval/run.py's early check accepts the folder
    lm = HybridEvalLM(str(granite_dir), device="cpu", batch_size=2)
    context, continuation = "def main():", "\n    return 1"
    [(got, _)] = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)], disable_tqdm=True)
    ctx = lm.tokenizer.encode(context)
    cont = lm.tokenizer.encode(context + continuation)[len(ctx):]
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ctx + cont]))[0, :-1].double(), -1)[len(ctx) - 1:]
    assert got == pytest.approx(float(logp.gather(-1, torch.tensor(cont)[:, None]).sum()), abs=1e-4)
