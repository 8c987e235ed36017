"""Activation checkpointing modes (train/activation_checkpointing.py): the same loss and gradients as
without, for every mode and block selection, on a tiny float64 hybrid with packed documents; the
wrapped path really runs; evaluation and decoding are left alone; the config's bool spelling still works."""

from __future__ import annotations

import pytest
import torch

import train.activation_checkpointing as ac
from config.schema import load_run_config
from model import HybridLM, ModelConfig
from train.activation_checkpointing import apply_activation_checkpointing, remove_activation_checkpointing


def _tiny() -> HybridLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=4, pattern="MAAM", ffn_hidden=48, impl="reference",
                      attention={"n_heads": 4, "n_kv_heads": 2, "qk_norm": True},
                      mamba={"d_state": 8, "headdim": 8, "n_groups": 2, "chunk_size": 4})
    return HybridLM(cfg).double().train()


def _loss_and_grads(model: HybridLM) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 11), generator=g)
    labels = torch.randint(0, model.cfg.vocab_size, (2, 11), generator=g)
    labels[0, 4] = -100
    seq_idx = torch.tensor([[0] * 5 + [1] * 6, [0] * 11])
    model.zero_grad()
    loss = model.loss(ids, labels, seq_idx=seq_idx)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "attention", "mlp", "offload"])
@pytest.mark.parametrize("block_types", [None, "A"])
def test_same_loss_and_grads(mode: str, block_types: str | None, monkeypatch) -> None:
    """float64: recomputation replays the same ops on the same inputs, offload moves saved tensors
    unchanged; relative error <= 1e-10. Each wrapped module must go through checkpoint/save_on_cpu."""
    model = _tiny()
    loss_ref, grads_ref = _loss_and_grads(model)

    calls: list[str] = []
    real_ckpt, real_offload = ac.checkpoint, torch.autograd.graph.save_on_cpu
    monkeypatch.setattr(ac, "checkpoint", lambda *a, **k: calls.append("ckpt") or real_ckpt(*a, **k))
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", lambda **k: calls.append("offload") or real_offload(**k))
    wrapped = apply_activation_checkpointing(model, mode, block_types)
    assert wrapped == ([1, 2] if block_types == "A" else [0, 1, 2, 3])
    loss, grads = _loss_and_grads(model)
    assert calls == ["offload" if mode == "offload" else "ckpt"] * len(wrapped)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=0)
    for name, g_ref in grads_ref.items():
        torch.testing.assert_close(grads[name], g_ref, rtol=1e-10, atol=1e-14, msg=name)
    assert set(dict(model.named_parameters())) == set(grads_ref)  # names (checkpoint keys) unchanged


def test_eval_and_decode_untouched(monkeypatch) -> None:
    """No-grad forwards, eval mode and cached decoding skip the wrapper; remove restores the class forward."""
    model = _tiny()
    apply_activation_checkpointing(model, "full")
    monkeypatch.setattr(ac, "checkpoint", lambda *a, **k: pytest.fail("checkpointed outside training"))
    ids = torch.randint(0, 61, (1, 6))
    with torch.no_grad():
        model(ids)
    model.eval()
    logits, cache = model.prefill(ids)
    model.step(logits.argmax(-1), cache)
    remove_activation_checkpointing(model)
    assert all("forward" not in vars(layer) for layer in model.layers)
    with pytest.raises(ValueError, match="choose one of"):
        apply_activation_checkpointing(model, "selective")


@pytest.mark.parametrize("given, mode", [("true", "full"), ("false", "none"), ("mlp", "mlp")])
def test_config_modes(given: str, mode: str) -> None:
    cfg = load_run_config("tiny", [f"train.activation_checkpointing={given}", "train.checkpoint_block_types=A"])
    assert cfg.train.activation_checkpointing == mode and cfg.train.checkpoint_block_types == "A"
