"""model.wgrad: linear layers whose weight gradients go straight into a bound float32 `main_grad`.

Reference: the float64 sum of the same products (tolerance 1e-6 relative: the CPU path sums float32
products), and, for the model, the gradients autograd gives the same model with nothing bound (1e-5).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import HybridLM, ModelConfig
from model.wgrad import Linear, linear, weight_grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def test_unbound_weights_take_plain_autograd() -> None:
    """Nothing bound: F.linear's output and gradients, one weight or several concatenated."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, requires_grad=True)
    w1, w2 = torch.randn(3, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    y = linear(x, w1, w2)
    assert y.grad_fn is not None and "LinearMainGrad" not in type(y.grad_fn).__name__
    want = F.linear(x, torch.cat([w1, w2]))
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    grads = torch.autograd.grad(y.pow(2).sum(), [x, w1, w2])
    wants = torch.autograd.grad(want.pow(2).sum(), [x, w1, w2])
    for got, expect in zip(grads, wants):
        torch.testing.assert_close(got, expect)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bound_weight_gradients_add_into_main_grad(dtype: torch.dtype) -> None:
    """Two weights concatenated (as the fused SwiGLU's gate and up), the first bound: over two backwards
    its main_grad grows by the float64 sum of dy^T x (from an earlier value), it gets no .grad; the
    unbound one and the input get autograd's gradients."""
    torch.manual_seed(0)
    w_bound = torch.randn(6, 8, dtype=dtype, requires_grad=True)
    w_free = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    earlier = torch.randn(6, 8)
    w_bound.main_grad = earlier.clone()
    want_main = earlier.double()
    for step in range(2):
        x = torch.randn(3, 5, 8, dtype=dtype, requires_grad=True)
        dy = torch.randn(3, 5, 10, dtype=dtype)
        linear(x, w_bound, w_free).backward(dy)
        ref_x, ref_free = torch.autograd.grad(F.linear(x, torch.cat([w_bound, w_free])), [x, w_free], dy)
        want_main += dy[..., :6].reshape(-1, 6).double().t() @ x.detach().reshape(-1, 8).double()
        assert w_bound.grad is None
        torch.testing.assert_close(x.grad, ref_x)
        if step == 0:
            torch.testing.assert_close(w_free.grad, ref_free)
    assert w_bound.main_grad.dtype == torch.float32
    assert _rel(w_bound.main_grad, want_main) < 1e-6


def test_weight_grad_helper() -> None:
    """For autograd functions that form a weight gradient themselves (model/ssd_saved.py's out_proj)."""
    torch.manual_seed(0)
    w, dy, x = torch.randn(4, 3), torch.randn(7, 4), torch.randn(7, 3)
    torch.testing.assert_close(weight_grad(w, dy, x), dy.t() @ x)
    w.main_grad = torch.ones(4, 3)
    assert weight_grad(w, dy, x) is None
    torch.testing.assert_close(w.main_grad, 1 + dy.t() @ x)


def test_linear_module_is_an_nn_linear_with_its_keys() -> None:
    layer = Linear(8, 3, bias=False)
    assert isinstance(layer, torch.nn.Linear) and list(layer.state_dict()) == ["weight"]
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
    with_bias = Linear(8, 3)
    torch.testing.assert_close(with_bias(x), F.linear(x, with_bias.weight, with_bias.bias))


def _tiny() -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(ModelConfig(vocab_size=61, d_model=32, n_layers=2, pattern="MA", ffn_hidden=48,
                                attention={"n_heads": 4, "n_kv_heads": 2},
                                mamba={"d_state": 8, "headdim": 8, "chunk_size": 16}, tie_embeddings=False,
                                impl="reference"))


def test_every_linear_weight_of_the_model_takes_main_grad(grads_then_bind_main_grads) -> None:
    """The reference path (attention q/k/v/o, Mamba2 in/out_proj, SwiGLU, LM head): with every parameter
    bound, the linear weights' main_grads hold what autograd gives the unbound model over two batches,
    and they get no .grad; the other parameters (embedding, norms, conv, SSM scalars) keep .grad."""
    model = _tiny()
    batches, want = grads_then_bind_main_grads(model, 61)
    for ids in batches:
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n.rsplit(".", 1)[0].rsplit(".", 1)[-1] for n in linears} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
    for name, p in model.named_parameters():
        if name in linears:
            assert p.grad is None, name
            assert _rel(p.main_grad, want[name]) < 1e-5, name
        else:
            assert not p.main_grad.any(), name
            assert _rel(p.grad, want[name]) < 1e-6, name
