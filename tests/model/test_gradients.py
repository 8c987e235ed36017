"""Autograd of the hybrid against finite differences (activation checkpointing: tests/train/test_activation_checkpointing.py)."""

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
