"""The CUDA-graph training dispatcher (model/train_graph.py) on CPU: which calls replay the captured
graph and which run eagerly, and that the loss routes through it. The capture itself needs CUDA; here
a recording stand-in with make_graphed_callables' signature takes its place, and the GPU runs of
bench/fwd_bwd_throughput.py --cuda-graph compare graphed against eager loss and gradients."""

from __future__ import annotations

import pytest
import torch

from model.train_graph import GraphedTrainingForward, graph_training_forward


class RecordingCapture:
    """make_graphed_callables(module, sample_args, num_warmup_iters) stand-in: returns a callable
    that counts its calls and runs the module eagerly."""

    def __init__(self) -> None:
        self.sample_shapes: list[tuple[int, ...]] = []
        self.calls = 0

    def __call__(self, module, sample_args, num_warmup_iters):
        assert num_warmup_iters >= 1 and module.training
        assert not module._forward_hooks and not module._forward_pre_hooks  # make_graphed_callables refuses hooks
        self.sample_shapes.append(tuple(sample_args[0].shape))

        def replay(ids):
            self.calls += 1
            return module(ids)

        return replay


@pytest.fixture
def graphed(tiny_model):
    model = tiny_model("MAMA").train()
    capture = RecordingCapture()
    sample = torch.randint(0, model.cfg.vocab_size, (2, 8))
    dispatcher = graph_training_forward(model, sample, capture=capture)
    return model, dispatcher, capture


def test_training_calls_of_the_captured_shape_replay(graphed) -> None:
    model, dispatcher, capture = graphed
    assert isinstance(model.forward, GraphedTrainingForward) and capture.sample_shapes == [(2, 8)]
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9))
    eager_loss = torch.nn.functional.cross_entropy(
        type(model).forward(model, ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss = model.loss(ids[:, :-1], ids[:, 1:])  # HybridLM.loss goes through the instance's forward
    assert capture.calls == 1 and dispatcher.replays == 1 and dispatcher.eager_calls == 0
    torch.testing.assert_close(loss, eager_loss, rtol=0, atol=0)
    model(ids[:, :-1])  # nn.Module.__call__ reaches the dispatcher too
    assert capture.calls == 2


def test_everything_else_runs_eagerly(graphed) -> None:
    model, dispatcher, capture = graphed
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
    assert capture.calls == 0 and dispatcher.replays == 0 and dispatcher.eager_calls == 7


def test_capture_is_refused_when_it_cannot_work(tiny_model) -> None:
    model = tiny_model("MAMA")
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(RuntimeError, match="train mode"):
        graph_training_forward(model, ids, capture=RecordingCapture())
    model.train()
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        graph_training_forward(model, ids)  # the real capture, on CPU
    graph_training_forward(model, ids, capture=RecordingCapture())
    with pytest.raises(RuntimeError, match="already graphed"):
        graph_training_forward(model, ids, capture=RecordingCapture())
