"""Streaming detokenization and stop strings (StreamDecoder), interactive command parsing, and the
decode benchmark's CPU smoke run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from export.textgen import HELP, StreamDecoder, apply_line
from model.bundle import load_tokenizer
from model.generation import SamplingParams


@pytest.fixture(scope="module")
def tok(test_tokenizer_dir):
    return load_tokenizer(test_tokenizer_dir)


def stream(tok, text: str, stop: list[str]) -> tuple[str, StreamDecoder]:
    dec = StreamDecoder(tok, stop)
    pieces = []
    for t in tok(text, add_special_tokens=False)["input_ids"]:
        pieces.append(dec.push(t))
        if dec.stopped:
            break
    pieces.append(dec.finish())
    return "".join(pieces), dec


def test_streamed_pieces_concatenate_to_the_decoded_text(tok):
    text = "def main():\n    print('héllo wörld ✓')\n"
    streamed, dec = stream(tok, text, [])
    assert streamed == text == dec.text and not dec.stopped


def test_stop_string_cuts_and_is_never_streamed(tok):
    text = "x = 1\n\ny = 2\n"
    streamed, dec = stream(tok, text, ["\n\n"])
    assert dec.stopped and streamed == dec.text == "x = 1"


def test_partial_stop_string_is_held_back_then_released(tok):
    dec = StreamDecoder(tok, ["STOP"])
    ids = tok("a ST", add_special_tokens=False)["input_ids"]
    out = "".join(dec.push(t) for t in ids)
    assert not out.endswith("ST")  # could still become STOP
    assert out + dec.finish() == "a ST"


def test_commands_update_params_and_reject_bad_values():
    p = SamplingParams(temperature=0.8)
    cmd = apply_line("/temp 0.2\n", p)
    assert cmd.params.temperature == 0.2 and cmd.message == "temperature = 0.2"
    assert apply_line("/top_k x", p).params is p
    assert apply_line("/top_k x", p).message == "/top_k takes a whole number, e.g. /top_k 50 (top_k is 0)"
    assert apply_line("/temp", p).message == "/temp takes a number, e.g. /temp 0.7 (temperature is 0.8)"
    assert "temperature        = 0.8" in apply_line("/settings", p).message.splitlines()
    assert apply_line("/tokens -1", p).message.startswith("/tokens: max_new_tokens must be >= 0")
    assert apply_line("/quit", p).quit and apply_line("/help", p).message.startswith("/temp X    ")
    columns = {len(line) - len(line[line.index("  "):].lstrip()) for line in HELP.splitlines()[:-1]}
    assert len(columns) == 1  # /help's descriptions start in one column
    assert apply_line("hello there\n", p).prompt == "hello there" and apply_line("   \n", p).prompt is None


def test_decode_benchmark_smoke(tmp_path):
    script = Path(__file__).resolve().parents[2] / "bench" / "decode_throughput.py"
    spec = importlib.util.spec_from_file_location("decode_throughput", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--contexts", "32,48", "--new-tokens", "2", "--results-dir", str(tmp_path),
                       "--out", "smoke"]) == 0
    data = json.loads((tmp_path / "smoke.json").read_text())
    models = {r["model"] for r in data["rows"]}
    assert models == {"ours", "hf", "attention"} and (tmp_path / "smoke.png").stat().st_size > 0
    assert all(r["tokens_agree_with_ours"] == "4/4" for r in data["rows"] if r["model"] == "hf")
    assert "command" in data["meta"] and "device" in data["meta"]
