"""Slurm and Ray executors are datatrove's, built from the recipe's cluster section (nothing submitted)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("datatrove", reason="datatrove is not installed here (curation runs on it)")
from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.executor.ray import RayPipelineExecutor

from config.recipe import load_recipe
from pipeline.executors import build_executors
from pipeline.layout import Layout
from pipeline.stages import build_stages

from .conftest import run_cli


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("datasets", reason="the production recipe's Hugging Face sources need datasets, not installed here")
    recipe, base = load_recipe("production_100b")
    layout = Layout(tmp_path_factory.mktemp("out"))
    return recipe, layout, build_stages(recipe, base, layout, data_root=None, tokenizer_path=None)


def test_stage_plan(stages) -> None:
    recipe, _, plan = stages
    names = [s.name for s in plan]
    sources = [s.name for s in recipe.sources]
    assert names[:8] == [f"prepare.{s}" for s in sources]
    assert names[8:17] == ["exact.signatures", "exact.find", "exact.filter", "minhash.signatures", "minhash.buckets",
                           "minhash.cluster", "final", "tokenizer", "tokenize.train.fineweb_edu"]
    assert names[-1] == "finalize" and len(names) == 8 + 8 + 2 * 2 * 8 + 1
    tasks = {s.name: s.tasks for s in plan}
    assert tasks["prepare.dclm"] == 1000 and tasks["minhash.buckets"] == 14 and tasks["minhash.cluster"] == 1
    merge = next(s for s in plan if s.name == "merge.train.code").pipeline[0]
    assert merge.max_tokens == 12_000_000_000 and merge.max_tokens_per_file == 500_000_000
    assert next(s for s in plan if s.name == "merge.validation.code").pipeline[0].max_tokens == -1


def test_slurm_executors_carry_the_cluster_settings(stages) -> None:
    recipe, layout, plan = stages
    executors = build_executors("slurm", plan, layout, recipe.cluster, workers=2)
    assert all(isinstance(e, SlurmPipelineExecutor) for e in executors)
    first, last = executors[0], executors[-1]
    assert (first.partition, first.time, first.cpus_per_task, first.mem_per_cpu_gb, first.tasks) == (
        "cpu", "20:00:00", 1, 4, 1000)
    assert first.job_name == "curate100b.prepare.fineweb_edu" and first.depends is None
    # one chain: running the last executor submits them all
    assert all(b.depends is a for a, b in zip(executors, executors[1:], strict=False))
    assert last.tasks == 1 and last.logging_dir.path == str(layout.logs("finalize"))
    by_name = dict(zip([s.name for s in plan], executors, strict=True))
    assert (by_name["minhash.cluster"].cpus_per_task, by_name["minhash.cluster"].mem_per_cpu_gb) == (8, 25)
    assert by_name["tokenizer"].cpus_per_task == 32 and by_name["merge.train.code"].mem_per_cpu_gb == 8
    assert by_name["merge.train.code"].time == "20:00:00"
    args = first.get_sbatch_args(max_array=1000)
    assert args["partition"] == "cpu" and args["mem-per-cpu"] == "4G" and args["time"] == "20:00:00"


def test_ray_and_local_executors(stages) -> None:
    recipe, layout, plan = stages
    ray = build_executors("ray", plan, layout, recipe.cluster, workers=2)
    assert all(isinstance(e, RayPipelineExecutor) for e in ray)
    assert (ray[0].cpus_per_task, ray[0].mem_per_cpu_gb, ray[0].tasks) == (1, 4, 1000) and ray[1].depends is ray[0]
    local = build_executors("local", plan, layout, recipe.cluster, workers=3)
    assert all(isinstance(e, LocalPipelineExecutor) for e in local)
    assert local[0].workers == 3 and local[-1].workers == 1 and local[0].depends is None


@pytest.mark.parametrize("kind, message", [("slurm", "sbatch not found"), ("ray", "needs its client library")])
@pytest.mark.slow
def test_cluster_executor_without_its_client_fails_in_one_line(small_recipe: dict, tmp_path: Path, kind: str,
                                                               message: str) -> None:
    proc = run_cli("--recipe", str(small_recipe["path"]), "--output", str(tmp_path / "out"), "--executor", kind,
                   "--data-root", str(small_recipe["data_root"]))
    assert proc.returncode == 2 and message in proc.stderr.splitlines()[-1], proc.stderr
