"""CUDA-graph training (model/train_graph.py) on CPU: the capture's data flow and the dispatcher.

CUDA graphs need a GPU. Here a stand-in takes the place of the graph operations: "capture" runs the
function once and keeps its outputs as the static buffers, "replay" runs it again and copies the
result into them. That checks everything around the graphs: stand-in leaves sharing the parameters'
storage, static input/output/gradient buffers, the gradients handed to the right parameters, in-place
parameter updates seen by later replays, and which calls replay. The graphs themselves are compared
with the eager step on the GPU (bench/fwd_bwd_throughput.py --cuda-graph: loss and gradient error).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from model.train_graph import GraphedTrainingForward, graph_training_forward


class StandInGraphs:
    def __init__(self) -> None:
        self.captures = self.replays = 0

    def new(self) -> SimpleNamespace:
        return SimpleNamespace(run=None, out=None)

    def stream(self, device: torch.device) -> None:
        return None

    def pool(self) -> None:
        return None

    def capture(self, graph, pool, stream, run):
        self.captures += 1
        graph.run, graph.out = run, run()
        return graph.out

    def replay(self, graph) -> None:
        self.replays += 1
        with torch.enable_grad():  # a real replay records nothing; re-running needs autograd (Function.forward disables it)
            fresh = graph.run()
        with torch.no_grad():
            for static, new in zip(*((graph.out, fresh) if isinstance(fresh, tuple) else ((graph.out,), (fresh,)))):
                static.copy_(new)


def eager_loss_and_grads(model, ids):
    logits = type(model).forward(model, ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))


@pytest.fixture
def graphed(tiny_model):
    model = tiny_model("MAMA", tie_embeddings=True).train()
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
    model = tiny_model("MAMA")
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(RuntimeError, match="train mode"):
        graph_training_forward(model, ids, ops=StandInGraphs())
    model.train()
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        graph_training_forward(model, ids)  # real CUDA graphs, on CPU
    assert isinstance(graph_training_forward(model, ids, ops=StandInGraphs(), warmup=1), GraphedTrainingForward)
    with pytest.raises(RuntimeError, match="already graphed"):
        graph_training_forward(model, ids, ops=StandInGraphs())
