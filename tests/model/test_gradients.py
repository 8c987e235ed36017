"""Autograd of the hybrid against finite differences, and activation checkpointing against plain backward."""

from __future__ import annotations

import torch
from torch.func import functional_call

SSM_PARAMS = ["layers.0.mixer.A_log", "layers.0.mixer.dt_bias", "layers.0.mixer.D", "layers.0.mixer.conv1d.bias"]
ATTN_PARAMS = ["layers.1.mixer.k_norm.weight", "layers.1.mixer_norm.weight"]


def test_gradcheck_small_hybrid(tiny_model) -> None:
    """torch.autograd.gradcheck (float64, its default eps 1e-6 and atol 1e-5 / rtol 1e-3) with respect to
    the embedding output and the SSM/norm parameters, on packed documents spanning two SSD chunks."""
    model = tiny_model(pattern="MA", qk_norm=True, d_model=16, ffn_hidden=16,
                       attention={"n_heads": 2, "n_kv_heads": 1},
                       mamba={"d_state": 4, "headdim": 8, "n_groups": 2, "chunk_size": 4})
    ids = torch.randint(0, model.cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    seq_idx = torch.tensor([[0, 0, 0, 0, 0, 1, 1]])
    proj = torch.randn(1, 7, model.cfg.vocab_size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    names = SSM_PARAMS + ATTN_PARAMS
    params = dict(model.named_parameters())
    h0 = model.embed(ids).detach()

    def f(h: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        handle = model.embed.register_forward_hook(lambda mod, inp, out: h)  # feed h as the embedding output
        try:
            logits = functional_call(model, dict(zip(names, values)), (ids,), {"seq_idx": seq_idx}, strict=False)
        finally:
            handle.remove()
        return (logits * proj).sum(-1)  # (1, 7): one scalar per position

    inputs = (h0.clone().requires_grad_(True), *(params[n].detach().clone().requires_grad_(True) for n in names))
    assert torch.autograd.gradcheck(f, inputs)


def _loss_and_grads(model, ids, labels, seq_idx):
    model.zero_grad()
    loss = model.loss(ids, labels, seq_idx=seq_idx)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def test_activation_checkpointing_same_loss_and_grads(tiny_model, monkeypatch) -> None:
    """Same loss and gradients with checkpointing (float64; recomputation repeats the exact same
    ops, so the tolerance is 1e-12 relative); the checkpointed path must really run."""
    import model.hybrid as hybrid

    model = tiny_model(pattern="MAAM", qk_norm=True).train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 11), generator=g)
    labels = torch.randint(0, model.cfg.vocab_size, (2, 11), generator=g)
    labels[0, 4] = -100
    seq_idx = torch.tensor([[0] * 5 + [1] * 6, [0] * 11])
    loss_ref, grads_ref = _loss_and_grads(model, ids, labels, seq_idx)

    calls = []
    monkeypatch.setattr(hybrid, "checkpoint", lambda *a, **k: calls.append(1) or torch.utils.checkpoint.checkpoint(*a, **k))
    model.activation_checkpointing = True
    loss_ckpt, grads_ckpt = _loss_and_grads(model, ids, labels, seq_idx)
    assert len(calls) == len(model.layers)
    torch.testing.assert_close(loss_ckpt, loss_ref, rtol=1e-12, atol=0)
    for name, g_ref in grads_ref.items():
        torch.testing.assert_close(grads_ckpt[name], g_ref, rtol=1e-12, atol=1e-15, msg=name)
