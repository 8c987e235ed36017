"""The ablation runner (launch/ablate.py): one end-to-end call on two tiny variants (one process each,
4 steps of one micro-batch), a second call that skips the finished variant and resumes an interrupted one, and unit tests
of the variants file's validation and the report's figures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from experiments.report import aggregate, loss_at, markdown
from model import ModelConfig, count_params

from .conftest import BASE_SETS, REPO, read_metrics, run_env

ABLATE = REPO / "launch" / "ablate.py"
STEP_TOKENS = 128  # one process, one micro-batch of 2 x 64 tokens per step
SHORT = [f"train.global_batch_tokens={STEP_TOKENS}", "train.warmup_steps=1", "train.save_every=2",
         "train.eval_every=2", "train.eval_sequences=4"]
VARIANTS = """variants:
  - name: strategic
    pattern: strategic
  - name: alt
    pattern: alternating
    match_params: true
"""


def ablate(corpus: Path, variants: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    sets = [*BASE_SETS, f"data.manifest={corpus}", *SHORT]
    return subprocess.run([sys.executable, str(ABLATE), "--config", "tiny", "--variants", str(variants),
                           "--tokens", str(4 * STEP_TOKENS), "--output", str(out),
                           *[a for s in sets for a in ("--set", s)], *extra],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_ablation_runs_reports_skips_and_resumes(corpus: Path, tmp_path: Path) -> None:
    variants = tmp_path / "variants.yaml"
    variants.write_text(VARIANTS)
    out = tmp_path / "ablation"
    first = ablate(corpus, variants, out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    runs = {r["variant"]: r for r in report["runs"]}
    assert [r["pattern"] for r in runs.values()] == ["MAMMAM", "AMAMAM"]
    target = count_params(ModelConfig(preset="tiny", vocab_size=512))
    assert runs["strategic"]["params"] == target and abs(runs["alt"]["params"] / target - 1) <= 0.03
    from config.manifest import content_sha256

    for name, row in runs.items():
        meta = json.loads((out / name / "seed_1234" / "final" / "meta.json").read_text())
        assert meta["data_sha256"] == content_sha256(corpus)  # which data, for runs merged across machines
        m = read_metrics(out / name / "seed_1234")
        assert row["finished"] and row["steps"] == 4 and row["val_loss"] == m[4]["val_loss"]
        assert row["final_loss"] == pytest.approx(m[4]["loss"])  # the last tenth of 4 steps: step 4 alone
        assert row["peak_mem_gb"] == max(r["mem_gb"] for r in m.values() if "mem_gb" in r)
    text = (out / "report.md").read_text()
    assert "| strategic | `MAMMAM` | 1 |" in text and "| alt | `AMAMAM` | 1 |" in text
    for png in ("loss.png", "throughput_memory.png", "strategic/seed_1234/loss.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png

    # interrupt 'alt' after its step-2 checkpoint: its final export and step-4 checkpoint are gone
    alt = out / "alt" / "seed_1234"
    reference = read_metrics(alt)
    shutil.rmtree(alt / "final")
    shutil.rmtree(alt / "checkpoints" / "step_00000004")
    second = ablate(corpus, variants, out)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "strategic seed 1234 (" in second.stdout and "finished, skipped" in second.stdout
    assert second.stdout.count("training") == 1 and "start: step 2/4" in second.stdout
    resumed = read_metrics(alt)
    assert sorted(resumed) == list(range(1, 5))
    for step in (3, 4):  # the same run: CPU fp32, one process, same order of operations
        assert resumed[step]["loss"] == reference[step]["loss"]


def write_variants(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "v.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("variants:\n  - name: a\n    set: [train.lr=1e-3]\n", "variant 'a': set train.lr is shared by every variant"),
    ("variants:\n  - name: a\n    set: [data.packing=continuous]\n", "variant 'a': set data.packing is shared"),
    ("variants:\n  - name: a\n    pattern: zigzag\n", "variant 'a': pattern 'zigzag' is unknown"),
    ("variants:\n  - name: a\n  - name: a\n", "variant 'a': the name is used twice"),
    ("variants:\n  - name: a b\n", "variant 'a b': name may hold only"),
    ("variants:\n  - name: a\n    colour: red\n", "variants.0.colour"),
    ("variants:\n  - name: a\n    set: [model.pattern=MMM]\n", "variant 'a': config error: model"),
    ("variants:\n  - name: a\n    set: [model.ffn_hidden=64]\n    match_params: true\n", "exclude each other"),
])
def test_bad_variants_file_is_one_line_before_any_run(corpus: Path, tmp_path: Path, text: str, message: str) -> None:
    from launch.ablate import main

    sets = [f"data.manifest={corpus}", f"model.vocab_size={BASE_SETS[0].split('=')[1]}", "train.warmup_steps=1",
            "train.wandb.mode=disabled"]
    argv = ["--config", "tiny", "--variants", str(write_variants(tmp_path, text)), "--tokens", "100000",
            "--output", str(tmp_path / "out"), *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run([sys.executable, str(ABLATE), *argv], cwd=REPO, env=run_env(), capture_output=True,
                          text=True, timeout=120) if message == "variants.0.colour" else None
    if proc is not None:  # one subprocess: exit code 2 and a single stderr line
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    else:
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(argv) == 2
        assert message in err.getvalue() and err.getvalue().count("\n") == 1, err.getvalue()
    assert not (tmp_path / "out").exists()


def test_loss_at_averages_the_window() -> None:
    steps = {s: {"tokens": 100 * s, "loss": float(10 - s)} for s in range(1, 11)}
    assert loss_at(steps, 1000, 250) == pytest.approx((2 + 1 + 0) / 3)  # steps 8, 9, 10
    assert loss_at(steps, 550, 10) == 5.0  # nothing in (540, 550]: the last step before, step 5
    assert loss_at(steps, 50, 10) is None


def test_aggregate_mean_std_over_seeds() -> None:
    rows = [{"variant": "a", "seed": s, "pattern": "MA", "finished": True, "final_loss": v, "mfu": None}
            for s, v in ((1, 2.0), (2, 4.0))] + [{"variant": "b", "seed": 1, "pattern": "AA", "finished": False,
                                                  "final_loss": 3.0}]
    agg = aggregate(rows)
    assert agg[0]["final_loss"] == (3.0, pytest.approx(2 ** 0.5)) and agg[0]["seeds"] == 2 and "mfu" not in agg[0]
    assert agg[1]["final_loss"] == (3.0, None)
    table = markdown(agg, 1000, "# r")
    assert "| a | `MA` | 2 |" in table and "3.0000 ± 1.4142" in table and "| b (unfinished) | `AA` | 1 |" in table


def test_run_row_reads_the_metrics_and_eval_table(tmp_path: Path) -> None:
    """A run's row from a hand-written metrics.jsonl and eval/run.py's results table (its Row records)."""
    from dataclasses import asdict

    from config.schema import load_run_config
    from eval.report import Row
    from experiments.ablation import PlannedRun
    from experiments.report import run_row

    out = tmp_path / "run"
    cfg = load_run_config("tiny", [f"train.output_dir={out}", "train.max_steps=5", "train.warmup_steps=1"])
    rates = [5.0, 6.0, 40.0, 0.1, 42.0]  # step 4 stalled (a one-off): the median of steps 3-5 ignores it
    lines = [{"step": s, "loss": 6.0 - s, "tokens": 100 * s, "tokens_per_s": rates[s - 1], "tokens_per_s_avg": 7.0,
              "mfu": rates[s - 1] / 100, "mem_gb": [1.0, 3.0, 2.0, 2.5, 2.0][s - 1]} for s in range(1, 6)]
    lines.append({"step": 5, "val_loss": 2.5, "val_ppl": 12.2})
    (out / "final").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (out / "final" / "meta.json").write_text(json.dumps({"step": 5}))
    table = [asdict(Row(task="val_ppl", metric="ppl", value=11.0, stderr=None, fewshot=None))]
    (out / "final" / "eval_results.json").write_text(json.dumps({"table": table}))
    row = run_row(PlannedRun("v", 1, cfg, []), budget=500)
    assert row["finished"] and row["steps"] == 5 and row["tokens_per_s"] == 40.0 and row["peak_mem_gb"] == 3.0
    assert row["mfu"] == pytest.approx(0.40)
    assert row["final_loss"] == 1.0 and row["loss_at_125"] == 5.0 and row["loss_at_250"] == 4.0  # window 50 tokens
    assert (row["val_loss"], row["val_ppl"]) == (2.5, 12.2) and row["eval: val_ppl ppl"] == 11.0


def test_variants2_plan_matches_the_base_size_with_each_option(corpus: Path, tmp_path: Path) -> None:
    """config/ablations/variants2.yaml plans (no training) on the tiny preset: every variant carries its
    pattern or option and lands within 3% of the strategic hybrid's parameter count."""
    from experiments.ablation import load_variants, plan

    sets = [*BASE_SETS, f"data.manifest={corpus}", *SHORT]
    runs = {r.variant: r.cfg.model for r in plan("tiny", sets, load_variants(REPO / "config/ablations/variants2.yaml"),
                                                  None, 4 * STEP_TOKENS, tmp_path)}
    assert list(runs) == ["strategic", "hierarchical", "bridges", "compression2", "compression4"]
    target = count_params(runs["strategic"])
    assert all(abs(count_params(m) / target - 1) <= 0.03 for m in runs.values())
    assert runs["hierarchical"].layer_pattern == "HAHHAH" and runs["bridges"].bridges
    assert [runs[f"compression{f}"].mamba.state_compression for f in (2, 4)] == [2, 4]


def test_a_stopped_run_leaves_the_report_so_far(corpus: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A run that stops (its job's time limit, a failure) ends the call with the report of every run so far,
    the unfinished ones marked, and says how to resume."""
    import experiments.ablation
    from launch.ablate import main

    monkeypatch.setattr(experiments.ablation, "train", lambda *args: 1)
    variants = write_variants(tmp_path, VARIANTS)
    out = tmp_path / "ablation"
    sets = [*BASE_SETS, f"data.manifest={corpus}", *SHORT]
    argv = ["--config", "tiny", "--variants", str(variants), "--tokens", str(4 * STEP_TOKENS), "--output", str(out),
            *[a for s in sets for a in ("--set", s)]]
    assert main(argv) == 1
    assert "rerun the same command to resume" in capsys.readouterr().err
    report = (out / "report.md").read_text()
    assert "| strategic (unfinished) | `MAMMAM` |" in report and "| alt (unfinished) | `AMAMAM` |" in report


def _argv(corpus: Path, variants: Path, out: Path, *extra: str) -> list[str]:
    sets = [*BASE_SETS, f"data.manifest={corpus}", *SHORT]
    return ["--config", "tiny", "--variants", str(variants), "--tokens", str(4 * STEP_TOKENS), "--output", str(out),
            *[a for s in sets for a in ("--set", s)], *extra]


def _finish(run, data: str = "d" * 64, loss: float = 3.0) -> None:
    """What a finished run leaves for the report: its metrics and its final export's meta.json."""
    steps = run.cfg.train.max_steps
    (run.out / "final").mkdir(parents=True, exist_ok=True)
    rows = [{"step": s, "loss": loss, "tokens": s * STEP_TOKENS, "tokens_per_s": 100.0, "mem_gb": 1.0}
            for s in range(1, steps + 1)]
    (run.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run.out / "final" / "meta.json").write_text(json.dumps({"step": steps, "data_sha256": data}))


def test_only_trains_the_named_variants_and_reports_all(corpus: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import experiments.ablation
    from launch.ablate import main

    trained = []
    monkeypatch.setattr(experiments.ablation, "train",
                        lambda config, sets, run, gpus: trained.append(run.variant) or _finish(run) or 0)
    out = tmp_path / "ablation"
    assert main(_argv(corpus, write_variants(tmp_path, VARIANTS), out, "--only", "alt")) == 0
    assert trained == ["alt"] and "strategic seed 1234" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "| strategic (unfinished) |" in report and "| alt | `AMAMAM` | 1 |" in report
    assert main(_argv(corpus, write_variants(tmp_path, VARIANTS), out, "--only", "alt,zigzag")) == 2
    assert capsys.readouterr().err.startswith("error: --only zigzag: no such variant")


def test_report_only_merges_runs_of_one_corpus_without_the_data(tmp_path: Path, capsys) -> None:
    """Runs trained elsewhere (their metrics and final meta.json, unpacked under one folder) make one report
    with no manifest here; runs of different data are refused in one line."""
    from experiments.ablation import load_variants, plan
    from launch.ablate import main

    out, absent = tmp_path / "merged", tmp_path / "absent" / "manifest.json"
    variants = write_variants(tmp_path, VARIANTS)
    sets = [*BASE_SETS, f"data.manifest={absent}", *SHORT]
    strategic, alt = plan("tiny", sets, load_variants(variants), None, 4 * STEP_TOKENS, out, check_data=False)
    _finish(strategic, loss=3.0)
    _finish(alt, loss=2.5)
    argv = _argv(absent, variants, out, "--report-only")
    assert main(argv) == 0
    runs = {r["variant"]: r for r in json.loads((out / "report.json").read_text())["runs"]}
    assert runs["strategic"]["finished"] and runs["alt"]["final_loss"] == 2.5
    _finish(alt, data="e" * 64)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "strategic seed 1234 and alt seed 1234 trained on different data" in err


def test_content_hash_ignores_the_curation_time_only(tmp_path: Path) -> None:
    from config.manifest import content_sha256

    base = {"created": "2026-12-07T00:00:00Z", "splits": {"train": {"sources": [{"shards": [{"sha256": "a"}]}]}}}
    paths = [tmp_path / f"{i}.json" for i in range(3)]
    paths[0].write_text(json.dumps(base))
    paths[1].write_text(json.dumps(base | {"created": "2026-12-08T09:30:00Z"}))
    paths[2].write_text(json.dumps(base | {"splits": {"train": {"sources": [{"shards": [{"sha256": "b"}]}]}}}))
    first, again, other = (content_sha256(p) for p in paths)
    assert first == again != other


def test_a_run_whose_leftover_process_holds_its_output_open_does_not_hang_the_runner(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    """The run exits but a process it started keeps the output pipe open (a compile worker): the runner
    copies what came, stops that process after the grace period and goes on with the run's exit code."""
    import experiments.ablation as ablation

    leftover = tmp_path / "leftover.pid"
    monkeypatch.setattr(ablation, "launch_command", lambda *args: [
        "sh", "-c", f"sleep 300 & echo $! > {leftover}; echo trained; exit 3"])
    monkeypatch.setattr(ablation, "OUTPUT_GRACE_S", 0.5)
    run = SimpleNamespace(out=tmp_path / "run", finished=False)
    assert ablation.train("tiny", [], run, 1) == 3
    assert (run.out / "launch.log").read_text() == "trained\n"
    pid = int(leftover.read_text())
    for _ in range(100):  # SIGKILL is delivered asynchronously; the orphan is reaped by init
        if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the leftover process {pid} is still running")


class _ExportingRun:
    """A run whose `finished` turns true when its command writes the export marker."""

    def __init__(self, out: Path) -> None:
        self.out = out

    @property
    def finished(self) -> bool:
        return (self.out / "exported").exists()


def test_a_run_that_does_not_exit_after_its_final_export_is_stopped_with_its_stacks(tmp_path: Path, monkeypatch,
                                                                                  capsys) -> None:
    """Its work is saved, so the runner asks for its threads' stacks (SIGUSR1, which fail_loudly registers) and
    goes on to the next variant instead of waiting on a teardown that never ends."""
    import experiments.ablation as ablation

    out, program = tmp_path / "run", REPO / "tests" / "helpers" / "hang_after_export.py"
    monkeypatch.setattr(ablation, "launch_command", lambda *args: [sys.executable, str(program), str(out)])
    monkeypatch.setattr(ablation, "EXIT_GRACE_S", 1.0)
    monkeypatch.setattr(ablation, "POLL_S", 0.2)
    assert ablation.train("tiny", [], _ExportingRun(out), 1) == 0
    log = (out / "launch.log").read_text()
    assert log.startswith("exported\n") and "threading.py" in log and "in main" in log  # the hung thread's stack
    assert "did not exit within 1 s; stopped" in capsys.readouterr().err
