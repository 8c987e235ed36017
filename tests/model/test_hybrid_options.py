"""The hybrid options that are not block types: bridges (`model.bridges`, model/bridges.py) and adaptive
state compression (`model.mamba.state_compression`, model/state_compression.py): where the bridges go, the
closed start, counts, memory. Causality, decode == forward, packing, gradients, save/load and the export
refusals of the same configurations run with the block types in tests/model/test_block_types.py.
"""

from __future__ import annotations

import pytest
import torch

from model import HybridLM
from model.bridges import bridge_sources
from model.sizing import count_params, forward_flops_per_token

# name -> (pattern, overrides)
CASES = {
    "bridges": ("MAMA", {"bridges": True}),
    "compression2": ("MAMA", {"mamba": {"state_compression": 2}}),
    "compression4": ("MRAG", {"mamba": {"state_compression": 4}, "gated": {"slots": 4},
                              "routed": {"capacity": 0.5, "threshold": 0.3}}),
    "all": ("HAMH", {"bridges": True, "mamba": {"state_compression": 2}}),
}


def test_bridge_sources_follow_the_pathways() -> None:
    """Attention blocks take the nearest earlier SSM block (M or H); an SSM block right after an attention
    block takes that block; R and G hold both pathways and take part in none."""
    assert bridge_sources("MAMMMMMMMMAM") == {1: 0, 2: 1, 10: 9, 11: 10}
    assert bridge_sources("HAAMH") == {1: 0, 2: 0, 3: 2}
    assert bridge_sources("MRAG") == {2: 0}
    assert bridge_sources("AMMM") == {1: 0}
    assert bridge_sources("MMMM") == {}


def test_closed_bridges_compute_the_plain_hybrid_exactly(tiny_config) -> None:
    """At init (gates zero) a model with bridges gives the plain hybrid's logits bit for bit, the gates are
    what the first backward moves, and open gates change the logits."""
    torch.manual_seed(0)
    plain = HybridLM(tiny_config("MAMA")).double().eval()
    bridged = HybridLM(tiny_config("MAMA", bridges=True)).double().eval()
    missing = bridged.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert set(missing) == {f"bridges.links.{t}.{p}" for t in (1, 2, 3) for p in ("gate", "proj.weight")}
    ids = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(plain(ids), bridged(ids))
    bridged.loss(ids[:, :-1], ids[:, 1:]).backward()
    assert all(link.gate.grad.abs().sum() > 0 for link in bridged.bridges.links.values())
    with torch.no_grad():
        bridged.bridges.links["2"].gate.fill_(0.1)  # attention -> Mamba2 only: layer 2 and after move
        plain_logits, open_logits = plain(ids), bridged(ids)
    assert not torch.allclose(plain_logits, open_logits)


@pytest.mark.parametrize("case", list(CASES))
def test_param_count_equals_the_built_model(case: str, tiny_config) -> None:
    pattern, over = CASES[case]
    cfg = tiny_config(pattern, **over)
    assert count_params(cfg) == sum(p.numel() for p in HybridLM(cfg).parameters())


@pytest.mark.parametrize("case", ["bridges", "compression2", "all"])  # R's capacity share: test_block_types.py
def test_matmul_flops_count_every_weight_a_token_passes(case: str, tiny_config) -> None:
    """2 x (every Linear's weight, the bridges' included + the compression basis, applied to B and to C)."""
    pattern, over = CASES[case]
    cfg = tiny_config(pattern, **over)
    model = HybridLM(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    bases = sum(2 * p.numel() for n, p in model.named_parameters() if n.endswith("compress.basis"))
    assert bool(bases) == (cfg.mamba.state_compression > 1)
    assert forward_flops_per_token(cfg, 32)["matmul"] == 2 * (linear + bases)  # the head is one of the Linears


def test_compressed_scan_costs_the_scan_of_the_smaller_state(tiny_config) -> None:
    """The scan FLOPs of state_compression f are those of a plain Mamba2 with d_state / f; the conv still runs
    over B and C at the full d_state (2 layers x 2 d_conv x 2 groups x (8 - 8 / f) more B and C channels)."""
    for f in (2, 4):
        small = tiny_config("MAMA", mamba={"d_state": 8 // f})
        compressed = tiny_config("MAMA", mamba={"state_compression": f})
        conv = 2 * 2 * 4 * 2 * 2 * (8 - 8 // f)
        assert forward_flops_per_token(compressed, 32)["ssd"] == forward_flops_per_token(small, 32)["ssd"] + conv


def test_compression_shrinks_the_recurrent_state_by_its_factor(tiny_model) -> None:
    """After the same prefill, every Mamba2 state (also inside R and G) holds d_state / f columns: its SSM
    tensor is exactly f times smaller, the conv state (inputs, not recurrent) the same."""
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(2))
    ssm, conv = {}, {}
    for f in (1, 2, 4):
        model = tiny_model("MRAG", mamba={"state_compression": f}, gated={"slots": 4})
        with torch.no_grad():
            cache = model.prefill(ids)[1]
        states = [cache.layers[0], cache.layers[1].ssm, cache.layers[3].ssm]
        ssm[f] = [s.ssm.numel() * s.ssm.element_size() for s in states]
        conv[f] = [s.conv.numel() * s.conv.element_size() for s in states]
        assert cache.layers[0].nbytes() == ssm[f][0] + conv[f][0]
    for f in (2, 4):
        assert [n // f for n in ssm[1]] == ssm[f] and conv[f] == conv[1]
    with pytest.raises(Exception, match="state_compression \\(3\\) must divide d_state \\(8\\)"):
        tiny_model("MAMA", mamba={"state_compression": 3})
