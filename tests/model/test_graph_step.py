"""CUDA-graph training (train/graph_step.py) on CPU: the capture's data flow and the dispatcher.

CUDA graphs need a GPU. Here a stand-in (train.graph_step.EagerReplayGraphs) takes the place of the graph
operations: "capture" runs the function once and keeps its outputs as the static buffers, "replay" runs it
again and copies the result into them. That checks everything around the graphs: stand-in leaves sharing the
parameters' storage, static input/output/gradient buffers, the gradients handed to the right parameters,
in-place parameter updates seen by later replays, and which calls replay. The graphs themselves are compared
with the eager step on the GPU (bench/fwd_bwd_throughput.py --cuda-graph: loss and gradient error).
"""

from __future__ import annotations

import pytest
import torch

from config.loader import ConfigError
from model import HybridLM
from train.graph_step import EagerReplayGraphs as StandInGraphs
from train.graph_step import GraphedLM, GraphedTrainingForward, graph_training_forward


def eager_loss_and_grads(model, ids):
    logits = HybridLM.forward(model, ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))


@pytest.fixture
def graphed(tiny_model):
    model = tiny_model("MAMA", tie_embeddings=True, model_cls=GraphedLM).train()
    ops = StandInGraphs()
    sample = torch.randint(0, model.cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    return model, graph_training_forward(model, sample, ops=ops, warmup=1), ops


def test_replayed_steps_match_eager_ones_across_batches_and_updates(graphed) -> None:
    """float64: the replayed loss and every parameter's gradient equal the eager ones (1e-12), for
    new batches and after an in-place update of the weights (what the optimizer does)."""
    model, dispatcher, ops = graphed
    assert ops.captures == 2  # forward and backward
    gen = torch.Generator().manual_seed(2)
    for update in range(3):
        ids = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=gen)
        want_loss, want_grads = eager_loss_and_grads(model, ids)
        loss = model.loss(ids[:, :-1], ids[:, 1:])  # HybridLM.loss goes through the instance's forward
        loss.backward()
        torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-12, atol=0)
        for p, g in zip(model.parameters(), want_grads):
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
            p.grad = None  # consumed before the next replay (see the module's requirements)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    assert dispatcher.replays == 3 and dispatcher.eager_calls == 0 and ops.replays == 6


def test_everything_else_runs_eagerly(graphed) -> None:
    model, dispatcher, ops = graphed
    ids = torch.randint(0, model.cfg.vocab_size, (2, 8))
    model(ids, seq_idx=torch.zeros(2, 8, dtype=torch.long))        # packed documents
    model(ids, position_ids=torch.arange(8).expand(2, 8))          # explicit positions
    model(ids[:1])                                                  # another shape
    with torch.no_grad():
        model(ids)                                                  # no backward to replay
    model.eval()
    model(ids)                                                      # evaluation
    logits, cache = model.prefill(ids[:, :4])                       # decoding
    model.step(logits.argmax(-1), cache)
    assert ops.replays == 0 and dispatcher.replays == 0 and dispatcher.eager_calls == 7


def test_capture_is_refused_when_it_cannot_work(tiny_model) -> None:
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(TypeError, match="needs a train.graph_step.GraphedLM, got HybridLM"):
        graph_training_forward(tiny_model("MAMA").train(), ids, ops=StandInGraphs())
    model = tiny_model("MAMA", model_cls=GraphedLM)
    with pytest.raises(RuntimeError, match="train mode"):
        graph_training_forward(model, ids, ops=StandInGraphs())
    model.train()
    with pytest.raises(ConfigError, match="needs CUDA devices"):
        graph_training_forward(model, ids)  # real CUDA graphs, on CPU
    assert isinstance(graph_training_forward(model, ids, ops=StandInGraphs(), warmup=1), GraphedTrainingForward)
    with pytest.raises(RuntimeError, match="already graphed"):
        graph_training_forward(model, ids, ops=StandInGraphs())


def packed(b: int, lengths: list[list[int]], vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A packed batch: row r holds documents of `lengths[r]` tokens; positions restart per document,
    except the first document of each row, which continues from position 5 (a window cut mid-document)."""
    seq_idx = torch.cat([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)).unsqueeze(0)
                         for ls in lengths])
    positions = torch.cat([torch.cat([torch.arange(n) + (5 if i == 0 else 0) for i, n in enumerate(ls)]).unsqueeze(0)
                           for ls in lengths])
    ids = torch.randint(0, vocab, (b, seq_idx.size(1) + 1), generator=gen)
    return {"ids": ids, "seq_idx": seq_idx, "position_ids": positions}


def test_packed_batches_replay_the_smallest_capacity_that_holds_their_documents(tiny_model, monkeypatch,
                                                                                caplog) -> None:
    """float64: packed micro-batches replay a documents step whose loss and gradients equal the eager
    packed forward's (1e-12), with positions that do not restart at a row's start. Each capacity is
    captured on first use; cu_seqlens is padded with empty documents; a batch with more documents than
    the largest capacity runs eagerly; a batch of one document per row (here pieces continuing from
    position 5) replays the plain step with its positions, without boundaries, as do plain calls."""
    monkeypatch.setattr("train.graph_step.DOC_CAPACITIES", (3, 5))
    model = tiny_model("MAMA", tie_embeddings=True, model_cls=GraphedLM).train()
    ops = StandInGraphs()
    dispatcher = graph_training_forward(model, torch.zeros(2, 8, dtype=torch.long), ops=ops, warmup=1,
                                        documents=True)
    assert ops.captures == 0  # documents: nothing captured before it is needed
    gen = torch.Generator().manual_seed(3)
    layouts = [[[8], [3, 5]], [[2, 6], [8]], [[8], [8]], [[2, 2, 4], [4, 4]], [[1] * 8, [8]], [[4, 4], [8]]]
    capacities = [3, 3, "plain", 5, None, 3]
    for lengths, capacity in zip(layouts, capacities):
        batch = packed(2, lengths, model.cfg.vocab_size, gen)
        ids, labels = batch["ids"][:, :-1], batch["ids"][:, 1:]
        logits = HybridLM.forward(model, ids, batch["position_ids"], batch["seq_idx"])
        want_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        want_grads = torch.autograd.grad(want_loss, list(model.parameters()))
        before = dispatcher.replays
        loss = model.loss(ids, labels, batch["position_ids"], batch["seq_idx"])
        loss.backward()
        torch.testing.assert_close(loss.detach(), want_loss.detach(), rtol=1e-12, atol=0)
        for p, g in zip(model.parameters(), want_grads):
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
            p.grad = None
        assert dispatcher.replays - before == (capacity is not None)
        if capacity == "plain":
            step = dispatcher.steps["plain"]
            assert step.inputs.seq_idx is None and step.inputs.cu_seqlens is None
            assert torch.equal(step.inputs.position_ids, batch["position_ids"])
        elif capacity is not None:
            starts = [0] + torch.tensor([n for row in lengths for n in row]).cumsum(0).tolist()
            want_cu = starts + [16] * (capacity + 1 - len(starts))
            assert dispatcher.steps[capacity].inputs.cu_seqlens.tolist() == want_cu
    assert set(dispatcher.steps) == {3, 5, "plain"} and ops.captures == 6 and dispatcher.eager_calls == 1
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "a packed micro-batch holds 9 documents, more than the CUDA graphs' largest capacity (5): such "
        "micro-batches run eagerly (slower)"]
    before = dispatcher.replays
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=gen)
    want_loss, want_grads = eager_loss_and_grads(model, ids)
    loss = model.loss(ids[:, :-1], ids[:, 1:])  # a plain call: the same step, positions 0..7
    loss.backward()
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-12, atol=0)
    for p, g in zip(model.parameters(), want_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
    assert torch.equal(dispatcher.steps["plain"].inputs.position_ids, torch.arange(8).expand(2, 8))
    assert dispatcher.replays == before + 1 and set(dispatcher.steps) == {3, 5, "plain"} and ops.captures == 6


def test_packed_batches_run_eagerly_without_documents(graphed) -> None:
    model, dispatcher, ops = graphed
    batch = packed(2, [[3, 5], [8]], model.cfg.vocab_size, torch.Generator().manual_seed(4))
    model(batch["ids"][:, :-1], batch["position_ids"], batch["seq_idx"])
    assert dispatcher.eager_calls == 1 and dispatcher.replays == 0 and ops.captures == 2


def test_documents_need_flash_attention_varlen_on_the_kernel_path(tiny_model, monkeypatch) -> None:
    model = tiny_model("MAMA", model_cls=GraphedLM).train()
    model.impl = "kernels"  # what set_impl picks on a GPU; only the refusal runs here
    monkeypatch.setattr("train.graph_step.flash_ops", lambda: None)
    with pytest.raises(ConfigError, match="flash-attn's varlen kernel"):
        graph_training_forward(model, torch.zeros(1, 8, dtype=torch.long), ops=StandInGraphs(), documents=True)
    monkeypatch.setattr("train.graph_step.flash_ops", lambda: object())
    model.set_attn_backend("flex")
    with pytest.raises(ConfigError, match="attn_backend to auto"):
        graph_training_forward(model, torch.zeros(1, 8, dtype=torch.long), ops=StandInGraphs(), documents=True)
