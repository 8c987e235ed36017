"""launch/generate.py and launch/export.py as a user runs them: streaming single prompt, batch JSON,
the interactive loop driven through stdin, and one-line errors (exit code 2, no traceback)."""

from __future__ import annotations

import json

import pytest
import torch


def test_interactive_commands_change_settings_and_quit(tiny_bundle_dir, run_script):
    stdin = ("/temp 0\n/top_k 5\n/top_p 0.5\n/tokens 3\n/top_p 2\n/tokens abc\n/temp\n/nope\n/help\n/settings\n"
             "def f():\n/quit\nnever read\n")
    proc = run_script("generate", "--checkpoint", str(tiny_bundle_dir), "--interactive", stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in ("temperature = 0.0", "top_k = 5", "top_p = 0.5", "max_new_tokens = 3",
                 "/top_p: top_p must be in (0, 1], got 2.0", "/tokens takes a whole number, e.g. /tokens 64",
                 "/temp takes a number, e.g. /temp 0.7 (temperature is 0.0)", "unknown command /nope", "/quit",
                 "top_k              = 5"):
        assert line in out
    assert "Traceback" not in proc.stderr


def test_interactive_ends_cleanly_at_end_of_input(tiny_bundle_dir, run_script):
    proc = run_script("generate", "--checkpoint", str(tiny_bundle_dir), "--interactive", "--max-new-tokens", "2",
                      stdin="hello\n")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr


def test_single_prompt_streams_and_reports(tiny_bundle_dir, run_script):
    proc = run_script("generate", "--checkpoint", str(tiny_bundle_dir), "--prompt", "import os",
                      "--max-new-tokens", "5", "--temperature", "0.7", "--top-p", "0.9", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "5 tokens" in proc.stderr and proc.stdout.endswith("\n")


def test_batch_mode_writes_valid_json(tiny_bundle_dir, tmp_path, generate_cli):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def main():\n\nclass Parser:\nimport sys\n")
    out = tmp_path / "results.json"
    rc = generate_cli.main(["--checkpoint", str(tiny_bundle_dir), "--input", str(prompts), "--output", str(out),
                            "--max-new-tokens", "6", "--temperature", "0", "--stop", "\n\n", "--batch-size", "2"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["prompt"] for r in data["results"]] == ["def main():", "class Parser:", "import sys"]
    for r in data["results"]:
        assert r["finish"] in ("stop", "eos", "length") and 0 < r["new_tokens"] <= 6
        assert "\n\n" not in r["completion"]
    assert data["sampling"]["stop"] == ["\n\n"] and data["sampling"]["temperature"] == 0


def test_greedy_batch_is_deterministic_and_equals_single(tiny_bundle_dir, tmp_path, generate_cli, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("x = 1\nfor i in range(3):\n")
    out = tmp_path / "r.json"
    args = ["--checkpoint", str(tiny_bundle_dir), "--max-new-tokens", "5", "--temperature", "0"]
    assert generate_cli.main([*args, "--input", str(prompts), "--output", str(out)]) == 0
    capsys.readouterr()
    assert generate_cli.main([*args, "--prompt", "for i in range(3):", "--no-stream"]) == 0
    single = capsys.readouterr().out.rstrip("\n")
    assert json.loads(out.read_text())["results"][1]["completion"] == single


def test_sampled_batch_results_do_not_depend_on_batch_size(tiny_bundle_dir, tmp_path, generate_cli):
    prompts = tmp_path / "p.txt"
    prompts.write_text("x = 1\nfor i in range(3):\nimport os\n")
    args = ["--checkpoint", str(tiny_bundle_dir), "--input", str(prompts), "--max-new-tokens", "6",
            "--temperature", "1.5", "--seed", "11"]
    completions = []
    for batch_size in (1, 3):
        out = tmp_path / f"r{batch_size}.json"
        assert generate_cli.main([*args, "--output", str(out), "--batch-size", str(batch_size)]) == 0
        completions.append([r["completion"] for r in json.loads(out.read_text())["results"]])
    assert completions[0] == completions[1]
    assert len(set(completions[0])) > 1  # sampled, not greedy: the rows differ


def test_ctrl_c_stops_the_reply_and_returns_to_the_prompt(generate_cli, monkeypatch, capsys):
    import io

    from model.generation import SamplingParams

    calls = []

    def complete(model, tokenizer, prompts, params, stop, on_text):
        calls.append(prompts[0])
        on_text(0, "partial")
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C during the first reply

    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond\n/quit\n"))
    generate_cli.run_interactive(None, None, SamplingParams(), [], complete)
    assert calls == ["first", "second"]
    assert "partial [stopped]\n" in capsys.readouterr().out


def test_missing_checkpoint_is_one_line_error(run_script):
    proc = run_script("generate", "--checkpoint", "/no/such/ckpt", "--prompt", "x")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: checkpoint /no/such/ckpt does not exist "
                                                "(pass the folder holding model.safetensors)"]


@pytest.mark.parametrize("script,args,needle", [
    ("export", ["--checkpoint", "/no/such/ckpt", "--format", "hf", "--output", "{tmp}/o"], "does not exist"),
    ("export", ["--checkpoint", "{ckpt}", "--format", "tflite", "--output", "{tmp}/o"], "unsupported format"),
    ("export", ["--import-hf", "{ckpt}", "--output", "{tmp}/o"], "model_type"),
    ("export", ["--checkpoint", "{ckpt}", "--format", "hf", "--output", "{tmp}"], "exists and is not empty: pass --force"),
    ("generate", ["--checkpoint", "{ckpt}", "--prompt", "x", "--top-p", "3"], "export.sampling.top_p"),
    ("generate", ["--checkpoint", "{ckpt}", "--prompt", "x", "--set", "model.d_model=32"], "model.d_model"),
    ("generate", ["--checkpoint", "{ckpt}", "--input", "{tmp}/none.txt", "--output", "{tmp}/r.json"], "does not exist"),
    pytest.param("generate", ["--checkpoint", "{ckpt}", "--prompt", "x", "--cuda-graph"], "needs a CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA here: --cuda-graph is accepted")),
    ("generate", ["--checkpoint", "{ckpt}", "--prompt", " "], "--prompt is empty"),
    ("generate", ["--checkpoint", "{ckpt}", "--prompt", "x", "--set", "export.cuda_graph=maybe"], "export.cuda_graph"),
])
def test_bad_input_is_one_line_error(script, args, needle, tiny_bundle_dir, tmp_path, export_cli, generate_cli, capsys):
    (tmp_path / "users_file.txt").write_text("keep me")
    main = {"export": export_cli, "generate": generate_cli}[script].main
    rc = main([a.format(ckpt=tiny_bundle_dir, tmp=tmp_path) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users_file.txt"]  # nothing written, nothing deleted


@pytest.mark.parametrize("flag, expected", [([], []), (["--cuda-graph"], ["export.cuda_graph=true"]),
                                            (["--no-cuda-graph"], ["export.cuda_graph=false"])])
def test_cuda_graph_flag_overrides_the_auto_default(flag, expected, generate_cli):
    """Without a flag the config's `auto` stands (CUDA graphs on CUDA devices, eager elsewhere)."""
    args = generate_cli.parse_args(["--checkpoint", "c", "--prompt", "x", *flag])
    assert generate_cli.sampling_overrides(args) == expected


def test_max_new_tokens_beyond_max_seq_len_warns_and_clamps(tiny_bundle_dir, generate_cli, capsys):
    rc = generate_cli.main(["--checkpoint", str(tiny_bundle_dir), "--prompt", "def f", "--max-new-tokens", "100000000",
                            "--temperature", "0", "--no-stream", "--set", "model.max_seq_len=24"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "max_new_tokens (100000000) exceeds model.max_seq_len (24): generating at most 24 tokens" in err
    assert int(err.strip().splitlines()[-1].split()[0].lstrip("[")) <= 24


def test_tokenizer_larger_than_the_vocabulary_is_one_line(tiny_bundle_dir, tmp_path, generate_cli, capsys):
    import json
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_bundle_dir, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    tensors = {k: (v[:256] if v.shape[0] == config["vocab_size"] else v)
               for k, v in load_file(ckpt / "model.safetensors").items()}
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    (ckpt / "config.json").write_text(json.dumps({**config, "vocab_size": 256}))
    rc = generate_cli.main(["--checkpoint", str(ckpt), "--prompt", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "has 512 tokens but the model's vocabulary is 256" in err[0], err
