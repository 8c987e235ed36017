"""Stages -> datatrove executors: LocalPipelineExecutor (default), SlurmPipelineExecutor or
RayPipelineExecutor, built from the recipe's cluster section so switching is a flag, not code.

Local stages run one after another in this process (each a pool of `workers`). Slurm and Ray stages
are chained with datatrove's `depends=` (each stage waits for the one before), and running the last
one submits the whole chain. Every executor keeps its logs, stats and completion markers in
work/logs/<stage>/, so resubmitting after a failure reruns only unfinished tasks.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.executor.base import PipelineExecutor
from datatrove.executor.ray import RayPipelineExecutor
from datatrove.utils.logging import logger

from config.recipe import ClusterConfig
from pipeline.errors import CurationError
from pipeline.layout import Layout
from pipeline.stages import Stage

ExecutorKind = Literal["local", "slurm", "ray"]
# fork: pool workers inherit the imported modules (forkserver re-imports datatrove, nltk, ... per stage);
# the driver starts no threads before forking.
LOCAL_START_METHOD = "fork" if sys.platform == "linux" else "forkserver"


def quiet_console() -> None:
    """datatrove's console sink at WARNING (its INFO lines: per-task pipelines, stats and progress)."""
    logger.remove()
    logger.add(sys.stderr, level="WARNING")


class QuietLocalExecutor(LocalPipelineExecutor):
    """LocalPipelineExecutor whose tasks log to the console only errors; each task's full log still goes
    to work/logs/<stage>/logs/task_*.log. datatrove uses a task's local_rank only to pick its console
    level (INFO for 0, ERROR otherwise: executor/base.py, utils/logging.add_task_logger)."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1) -> Any:
        try:
            return super()._run_for_rank(rank, 1, node_rank)
        finally:  # a task run in this process (one worker) restores datatrove's default INFO sink at its end
            quiet_console()


def build_executors(kind: ExecutorKind, stages: list[Stage], layout: Layout, cluster: ClusterConfig,
                    workers: int, verbose: bool = True) -> list[PipelineExecutor]:
    """One executor per stage, in order; Slurm/Ray ones depend on their predecessor. Local ones print
    datatrove's INFO lines only if `verbose`."""
    executors: list[PipelineExecutor] = []
    local = LocalPipelineExecutor if verbose else QuietLocalExecutor
    if not verbose:
        quiet_console()
    for stage in stages:
        logs = str(layout.logs(stage.name))
        if kind == "local":
            ex = local(stage.pipeline, tasks=stage.tasks, workers=max(1, min(workers, stage.tasks)),
                       logging_dir=logs, start_method=LOCAL_START_METHOD)
        elif kind == "slurm":
            s = cluster.slurm
            ex = SlurmPipelineExecutor(
                stage.pipeline, tasks=stage.tasks, partition=s.partition, **s.resources(stage.name),
                qos=s.qos, workers=s.workers, job_name=f"{s.job_name}.{stage.name}",
                venv_path=s.venv_path, env_command=s.env_command, sbatch_args=dict(s.sbatch_args),
                max_array_size=s.max_array_size, logging_dir=logs, depends=executors[-1] if executors else None,
                slurm_logs_folder=str(layout.work / "slurm_logs" / stage.name))
        else:
            r = cluster.ray
            ex = RayPipelineExecutor(
                stage.pipeline, tasks=stage.tasks, workers=r.workers, logging_dir=logs, cpus_per_task=r.cpus_per_task,
                mem_per_cpu_gb=r.mem_per_cpu_gb, time=r.time, depends=executors[-1] if executors else None)
        executors.append(ex)
    return executors


def run_executors(kind: ExecutorKind, executors: list[PipelineExecutor], stages: list[Stage],
                  cluster: ClusterConfig) -> None:
    """Run locally stage by stage (each after its `check`), or submit the chained Slurm/Ray stages."""
    if kind == "local":
        for i, (stage, ex) in enumerate(zip(stages, executors, strict=True), 1):
            if stage.check:
                stage.check()
            done = ex.world_size - len(ex.get_incomplete_ranks(range(ex.world_size)))
            resumed = f", {done} done before: skipped" if done else ""
            print(f"stage {i}/{len(executors)}: {stage.name} ({ex.world_size} tasks{resumed})", file=sys.stderr, flush=True)
            ex.run()
        return
    try:
        if kind == "ray":
            import ray

            if not ray.is_initialized():
                ray.init(address=cluster.ray.address)
        executors[-1].run()
    except ImportError as exc:
        raise CurationError(
            f"--executor {kind} needs its client library: {exc} (pip install 'datatrove[{kind}]')") from None
    except FileNotFoundError as exc:
        raise CurationError(
            f"--executor {kind}: {exc.filename or exc} not found; submit from a {kind} login node") from None
