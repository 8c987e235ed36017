"""Text-level generation helpers for launch/generate.py: streaming detokenization, stop strings,
the interactive command set, and one call that turns prompts into finished completions.

Token choice and the cache live in `model.generation.generate`; this module only maps text to ids
and back, stops rows on stop strings, and streams text as soon as it is final.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

from model.generation import SamplingParams, generate
from model.hybrid import HybridLM


class StreamDecoder:
    """Incremental detokenization of one row with stop strings.

    `push(token)` returns the text that became final: the full decode is recomputed (byte-level BPE
    merges across token boundaries), text ending in an incomplete UTF-8 sequence is held back, and
    so is any tail that could still grow into a stop string. A stop string ends the row and is cut.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters already returned
        self.text = ""  # final text so far (cut at a stop string once one appears)
        self.stopped = False

    def _holdback(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.text = text[: min(hits)]
            return self._emit(len(self.text))
        self.text = text
        if text.endswith("\ufffd"):  # a multi-byte character split over tokens
            return ""
        return self._emit(len(text) - self._holdback(text))

    def finish(self) -> str:
        """The held-back rest once the row is over."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        piece = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """BOS + the prompt's tokens (the tokenizer adds no specials itself)."""
    return [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]


def complete(
    model: HybridLM,
    tokenizer: Any,
    prompts: Sequence[str],
    params: SamplingParams,
    stop: Sequence[str] = (),
    on_text: Callable[[int, str], None] | None = None,
    cuda_graph: bool | str = "auto",
    row_seeds: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Generate for a batch of text prompts; `on_text(row, piece)` streams final text; `row_seeds`
    (one per prompt) sample each row from its own generator (model.generation.generate).

    Returns one dict per prompt: completion, new_tokens, finish ("stop", "eos" or "length"),
    and the batch's decode rate tokens_per_s.
    """
    decoders = [StreamDecoder(tokenizer, stop) for _ in prompts]

    def on_token(row: int, token: int) -> None:
        piece = decoders[row].push(token)
        if piece and on_text is not None:
            on_text(row, piece)

    t0 = time.perf_counter()
    rows = generate(
        model, [encode_prompt(tokenizer, p) for p in prompts], params,
        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id or 0,
        on_token=on_token, should_stop=lambda row, _tokens: decoders[row].stopped, cuda_graph=cuda_graph,
        row_seeds=row_seeds,
    )
    elapsed = time.perf_counter() - t0
    results = []
    for row, (dec, toks) in enumerate(zip(decoders, rows)):
        rest = dec.finish()
        if rest and on_text is not None:
            on_text(row, rest)
        finish = "stop" if dec.stopped else ("length" if len(toks) >= params.max_new_tokens else "eos")
        results.append({"prompt": prompts[row], "completion": dec.text, "new_tokens": len(toks), "finish": finish})
    total = sum(r["new_tokens"] for r in results)
    for r in results:
        r["tokens_per_s"] = total / elapsed if elapsed > 0 else 0.0
    return results


# ---- interactive commands -------------------------------------------------------------------------
COMMANDS = {  # command -> (SamplingParams field, parser, example value, help)
    "/temp": ("temperature", float, "0.7", "sampling temperature (0 = greedy)"),
    "/top_p": ("top_p", float, "0.9", "nucleus mass in (0, 1]"),
    "/top_k": ("top_k", int, "50", "keep the k most likely tokens (0 = all)"),
    "/tokens": ("max_new_tokens", int, "64", "tokens generated per reply at most"),
}
_KIND = {float: "a number", int: "a whole number"}
_OTHER = {
    "/settings": "show the current settings",
    "/help": "this list",
    "/quit": "leave (also Ctrl-D); Ctrl-C stops a reply",
}
_USAGE = {**{f"{cmd} X": text for cmd, (_, _, _, text) in COMMANDS.items()}, **_OTHER}
_WIDTH = max(map(len, _USAGE)) + 2
HELP = "\n".join([f"{usage:<{_WIDTH}}{text}" for usage, text in _USAGE.items()] + ["anything else is a prompt"])


def settings(params: SamplingParams) -> str:
    """The current sampling settings, one `name = value` per line, names aligned."""
    fields = dataclasses.asdict(params)
    width = max(map(len, fields))
    return "\n".join(f"{name:<{width}} = {value}" for name, value in fields.items())


@dataclasses.dataclass
class Command:
    """The outcome of one interactive input line."""

    params: SamplingParams
    message: str | None = None  # what to print (a setting changed, help, an error)
    prompt: str | None = None  # text to complete
    quit: bool = False


def apply_line(line: str, params: SamplingParams) -> Command:
    """Interpret one input line: a command changes `params` (validated), other text is a prompt."""
    text = line.rstrip("\n")
    if not text.startswith("/"):
        return Command(params, prompt=text) if text.strip() else Command(params)
    name, _, arg = text.strip().partition(" ")
    if name == "/quit":
        return Command(params, quit=True)
    if name == "/help":
        return Command(params, message=HELP)
    if name == "/settings":
        return Command(params, message=settings(params))
    if name not in COMMANDS:
        return Command(params, message=f"unknown command {name}; /help lists the commands")
    field, parse, example, _ = COMMANDS[name]
    current = getattr(params, field)
    try:
        value = parse(arg.strip())
    except ValueError:  # not a number: say what is expected instead of Python's parse error
        return Command(params, message=f"{name} takes {_KIND[parse]}, e.g. {name} {example} ({field} is {current})")
    try:
        new = dataclasses.replace(params, **{field: value})
    except ValueError as exc:  # a value SamplingParams rejects; its message names the allowed range
        return Command(params, message=f"{name}: {exc}")
    return Command(new, message=f"{field} = {getattr(new, field)}")
