"""The lm-eval backend against direct computations from the model's logits (CPU, float32).

Tolerance: 1e-4 absolute on summed log-probs (float32 forward of a 4-layer model; batching and the
head on selected positions only change the summation order).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness (lm_eval) is not installed here")
from lm_eval.api.instance import Instance  # noqa: E402

from model.generation import SamplingParams, generate

ATOL = 1e-4
PAIRS = [
    ("The quick brown fo", "x jumps over"),
    ("return sel", "f.value"),  # joint tokenization merges across the boundary ("self")
    ("x = sel", "f.x + 1"),
    ("Answer:", " A"),  # one-token continuations sharing a context share one forward
    ("Answer:", " C"),
    ("trailing space ", "word"),  # the space moves to the continuation
    ("", "import os"),  # empty context: conditioned on the prefix token
    ("def main():\n    print(", "'hello')"),
]


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _split(lm, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal convention (TemplateLM._encode_pair), written out: trailing spaces go to the
    continuation; the continuation is the whole string's encoding after the context's own token
    length, the context is the context's own encoding (the two may tokenize the boundary differently)."""
    tok = lm.tokenizer
    if not context:
        return [lm.prefix_token_id], tok.encode(continuation)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx):]


def _direct(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0, :-1].double(), -1)[len(ctx) - 1:]  # predictions of cont
    target = torch.tensor(cont)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def test_boundary_case_is_real(lm):
    tok = lm.tokenizer
    assert tok.encode("return sel" + "f.value") != tok.encode("return sel") + tok.encode("f.value")


def test_loglikelihood_equals_direct_computation(lm):
    got = lm.loglikelihood(_requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (ctx, cont), (logprob, greedy) in zip(PAIRS, got):
        want, want_greedy = _direct(lm.model, *_split(lm, ctx, cont))
        assert logprob == pytest.approx(want, abs=ATOL), (ctx, cont)
        assert greedy == want_greedy


def test_batched_equals_unbatched(make_lm):
    one = make_lm(batch_size=1).loglikelihood(_requests("loglikelihood", PAIRS), disable_tqdm=True)
    many = make_lm(batch_size=8).loglikelihood(_requests("loglikelihood", PAIRS), disable_tqdm=True)
    assert [g for _, g in one] == [g for _, g in many]
    assert torch.allclose(torch.tensor([s for s, _ in one]), torch.tensor([s for s, _ in many]), atol=ATOL)


def test_long_context_is_left_truncated_to_max_length(make_lm):
    lm = make_lm(max_length=24)
    ctx, cont = "import os\nimport sys\n" * 6, "import re"
    (logprob, _), = lm.loglikelihood(_requests("loglikelihood", [(ctx, cont)]), disable_tqdm=True)
    c, x = _split(lm, ctx, cont)
    window = (c + x)[-(24 + 1):]  # the last max_length + 1 tokens: max_length inputs
    assert logprob == pytest.approx(_direct(lm.model, window[: -len(x)], x)[0], abs=ATOL)


def test_loglikelihood_rolling_equals_sum_over_windows(make_lm):
    max_len = 16
    lm = make_lm(max_length=max_len)
    text = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 3
    (got,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    # lm-eval's scheme: every token predicted once; the first window starts from the prefix token,
    # later windows use a full max_len context and score only the tokens not yet predicted.
    tokens = lm.tokenizer.encode(text)
    assert len(tokens) > 3 * max_len
    stream = [lm.prefix_token_id] + tokens  # stream[i] predicts tokens[i]
    total, done = 0.0, 0
    while done < len(tokens):
        end = min(done + max_len, len(tokens))  # predict tokens[done:end]
        start = max(0, end - max_len)  # inputs stream[start:end]
        ids = torch.tensor([stream[start:end]])
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(ids)[0].double(), -1)
        pos = torch.arange(done - start, end - start)
        total += float(logp[pos, torch.tensor(tokens[done:end])].sum())
        done = end
    assert got == pytest.approx(total, abs=ATOL)


def _greedy_by_full_forward(model, prompt: list[int], steps: int, eos: int) -> list[int]:
    ids, out = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        if nxt == eos:
            break
        ids.append(nxt)
        out.append(nxt)
    return out


def test_cached_generation_equals_full_forward_greedy(lm):
    prompts = ["def main():", "import numpy as np\nx = np.", "class A"]
    requests = _requests("generate_until", [(p, {"until": ["\u2603"], "max_gen_toks": 10}) for p in prompts])
    got = lm.generate_until(requests, disable_tqdm=True)  # batch of 3 prompts of different lengths
    for p, text in zip(prompts, got):
        want = _greedy_by_full_forward(lm.model, lm.tokenizer.encode(p), 10, lm.eot_token_id)
        assert text == lm.tok_decode(want)


def test_generation_stops_at_until_and_respects_max_gen_toks(lm):
    from eval.lm_backend import StopOnText

    prompt = lm.tokenizer.encode("def main():")
    free = _greedy_by_full_forward(lm.model, prompt, 12, lm.eot_token_id)
    assert len(free) == 12, "the random model should not emit EOS this early"
    stop = lm.tok_decode(free[5:6])  # a string that appears at the 6th generated token
    assert stop.strip(), "pick a visible stop string"
    tokens = generate(lm.model, [prompt], SamplingParams(max_new_tokens=12), eos_id=lm.eot_token_id,
                      pad_id=lm.pad_token_id, should_stop=StopOnText(lm, [stop]))[0]
    assert len(tokens) <= 6 and stop in lm.tok_decode(tokens)
    (text,) = lm.generate_until(_requests("generate_until", [("def main():", {"until": [stop], "max_gen_toks": 12})]),
                                disable_tqdm=True)
    assert text == lm.tok_decode(free).split(stop)[0]
    (short,) = lm.generate_until(_requests("generate_until", [("def main():", {"until": [], "max_gen_toks": 3})]),
                                 disable_tqdm=True)
    assert short == lm.tok_decode(free[:3])


def test_sampling_params_from_gen_kwargs(lm):
    greedy = lm._sampling_params({"max_gen_toks": 5, "do_sample": False, "temperature": 0.7, "foo": 1})
    assert (greedy.max_new_tokens, greedy.temperature) == (5, 0.0)
    sampled = lm._sampling_params({"max_gen_toks": 5, "do_sample": True, "temperature": 0.7, "top_p": 0.9})
    assert (sampled.temperature, sampled.top_p, sampled.top_k) == (0.7, 0.9, 0)


def test_registered_with_lm_eval_beside_builtin_backends():
    from lm_eval.api.registry import get_model, model_registry

    from eval.lm_backend import HybridEvalLM

    assert get_model("hybrid") is HybridEvalLM
    assert "hf" in model_registry  # registering ours must not hide lm-eval's own backends


def test_cuda_graph_on_cpu_is_refused(make_lm):
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device"):
        make_lm(cuda_graph="True")


def test_cli_usage_keeps_lm_eval_flags_out_of_model_args() -> None:
    """lm-eval's CLI passes --batch_size/--device to the backend itself: naming them in --model_args fails."""
    import re

    import eval.lm_eval_cli as cli

    model_args = re.findall(r"--model_args (\S+)", cli.__doc__)
    assert model_args and not any(k in a for a in model_args for k in ("batch_size", "device"))
