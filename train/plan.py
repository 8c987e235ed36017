"""Memory and throughput planner: will a run config fit a GPU, how fast will it go, what will it cost.

    python -m train.plan --config 13b --gpus 64 --zero 3 [--micro-batch 1 --seq-len 4096
        --activation-checkpointing none|full|attention|mlp|offload --offload none|optimizer|optimizer+params
        --tokens 100e9 --gpu h100|h200|<GiB>] [--set KEY=VALUE ...]
    python -m train.plan --check            # predicted vs measured for every committed pretrain run
    python -m train.plan --cluster 1.3b,2.7b,6.7b,13b --gpus-list 8,32,64,128 --tokens 100e9   # docs/cluster.md

From python: `plan(cfg, gpus=64, ...) -> Plan`. Memory terms: train/plan_memory.py; tokens/s from the
measured per-layer costs and its scaling assumptions: train/plan_speed.py. Bad input: one line, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from config.loader import ConfigError
from config.schema import RunConfig
from model.sizing import count_params
from train.plan_memory import (
    CONTEXT_BYTES,
    FRAGMENTATION,
    ZeroSetup,
    activations,
    checkpoint_mode,
    compute_bytes,
    model_states,
)
from train.fp8 import step_weight_params
from train.plan_speed import MissingMeasurement, Speed, predict

# Device memory as torch.cuda.get_device_properties(...).total_memory reports it (bytes).
GPUS = {"h100": 85_017_755_648, "h200": 150_754_820_096}
OFFLOADS = ("none", "optimizer", "optimizer+params")
GIB = 2**30


@dataclass
class Plan:
    """Per-GPU memory (bytes) and speed of one run config on `gpus` GPUs."""

    gpus: int
    zero: ZeroSetup
    mode: str  # activation checkpointing
    micro_batch: int
    seq_len: int
    accumulation: int
    params: int
    memory: dict[str, float]  # GPU terms: params, gradients, optimizer, activations, comm_buffers, allowance
    activations_by_kind: dict[str, float]
    host: float  # host bytes per GPU (offload): optimizer / parameter offload + `host_activations`
    device_bytes: float | None
    allocated: float  # what torch.cuda.max_memory_allocated reports at the peak (no context/fragmentation)
    first_step: float  # the same during step 1 (Adam moments not yet allocated)
    allocator_visible: float  # allocated minus what a CUDA graph's private pool holds (graphed runs)
    speed: Speed | None
    speed_error: str | None = None
    notes: list[str] = field(default_factory=list)
    block_types: str | None = None  # train.checkpoint_block_types: the letters `mode` applies to (None: all)
    host_activations: float = 0.0  # of `host`: the saved tensors activation checkpointing mode offload moves there

    @property
    def checkpointing(self) -> str:
        """The mode, and the block letters it applies to when not every block."""
        if self.mode == "none" or self.block_types is None:
            return self.mode
        return f"{self.mode} ({self.block_types} blocks)"

    @property
    def total(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool | None:
        return None if self.device_bytes is None else self.total <= self.device_bytes

    def hours(self, tokens: float) -> float | None:
        """Wall-clock hours to train `tokens` on all GPUs."""
        return None if self.speed is None else tokens / (self.speed.tokens_per_s * self.gpus) / 3600

    def summary(self) -> str:
        """One line: total vs device memory."""
        dev = f" of {self.device_bytes / GIB:.1f} GiB" if self.device_bytes else ""
        fit = {True: " (fits)", False: " (does NOT fit)", None: ""}[self.fits]
        return (f"planner: {self.total / GIB:.1f} GiB per GPU{dev}{fit}: params {self.memory['params'] / GIB:.1f}, "
                f"gradients {self.memory['gradients'] / GIB:.1f}, optimizer {self.memory['optimizer'] / GIB:.1f}, "
                f"activations {self.memory['activations'] / GIB:.1f}, buffers+allowance "
                f"{(self.memory['comm_buffers'] + self.memory['allowance']) / GIB:.1f} (ZeRO-{self.zero.stage}, "
                f"micro-batch {self.micro_batch} x {self.seq_len}, checkpointing {self.checkpointing})"
                + (f"; host {self.host / GIB:.1f} GiB per GPU" if self.host else ""))


def zero_setup(cfg: RunConfig, zero: int | None = None, offload: str | None = None) -> ZeroSetup:
    """The run's DeepSpeed JSON, or ds_configs/zero<zero>.json, with `offload` applied."""
    from train.ds_config import read_ds_json

    ds = read_ds_json(f"ds_configs/zero{zero}.json" if zero is not None else cfg.train.ds_config)
    setup = ZeroSetup.from_ds_json(ds)
    if offload is not None:
        if offload not in OFFLOADS:
            raise ConfigError(f"--offload {offload} is unknown; choose one of {', '.join(OFFLOADS)}")
        if offload == "optimizer+params" and setup.stage != 3:
            raise ConfigError("--offload optimizer+params needs --zero 3 (DeepSpeed offloads parameters only there)")
        setup = dataclasses.replace(setup, offload_optimizer=offload != "none",
                                    offload_params=offload == "optimizer+params")
    return setup


def device_bytes(gpu: str | float | None) -> float | None:
    """h100 / h200 / a size in GiB -> bytes (None: unknown)."""
    if gpu is None:
        return None
    if isinstance(gpu, str) and gpu.lower() in GPUS:
        return float(GPUS[gpu.lower()])
    try:
        gib = float(gpu)
    except ValueError:
        raise ConfigError(f"--gpu {gpu} is unknown; give h100, h200 or the memory in GiB") from None
    if gib <= 0:
        raise ConfigError(f"--gpu {gpu}: the memory in GiB must be > 0")
    return gib * GIB


def plan(cfg: RunConfig, gpus: int = 1, zero: ZeroSetup | None = None, micro_batch: int | None = None,
         seq_len: int | None = None, checkpointing: bool | str | None = None, gpu: str | float | None = None) -> Plan:
    """Memory and speed of `cfg` per GPU; the arguments override the config's train.* values."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1 (got {gpus})")
    t = cfg.train
    zero = zero or zero_setup(cfg)
    micro_batch = micro_batch or t.micro_batch_size
    seq_len = seq_len or t.seq_len
    try:
        mode = checkpoint_mode(t.activation_checkpointing if checkpointing is None else checkpointing)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    accumulation = max(1, t.global_batch_tokens // (seq_len * micro_batch * gpus))
    e = compute_bytes(t.precision)
    copies = step_weight_params(cfg.model, t.fp8) if t.precision == "fp8" else 0
    states = model_states(cfg.model, zero, gpus, t.precision, t.cuda_graph, t.grad_fold, t.fp8.casts, copies)
    try:
        acts = activations(cfg.model, micro_batch * seq_len, mode, e, fp8=t.precision == "fp8",
                           block_types=t.checkpoint_block_types)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    by_kind = {k: v for k, v in acts.items() if k not in ("host",)}
    act_total = sum(by_kind.values())
    allocated = states["params"] + states["gradients"] + states["optimizer"] + states["comm_buffers"] + act_total
    memory = {"params": states["params"], "gradients": states["gradients"], "optimizer": states["optimizer"],
              "activations": act_total, "comm_buffers": states["comm_buffers"],
              "allowance": CONTEXT_BYTES + FRAGMENTATION * allocated}
    speed, error = None, None
    try:
        speed = predict(cfg.model, seq_len, micro_batch, accumulation, zero, gpus, mode,
                        block_types=t.checkpoint_block_types, e=e, fp8=t.precision == "fp8")
    except MissingMeasurement as exc:
        error = str(exc)
    notes = []
    if zero.offload_optimizer:
        notes.append("offload speed: DeepSpeedCPUAdam and PCIe rates are assumptions (train/plan_speed.py)")
    if mode == "offload":
        notes.append("activation offload speed: the saved tensors cross PCIe at an assumed rate, not overlapped "
                     "(train/plan_speed.py)")
    return Plan(gpus=gpus, zero=zero, mode=mode, micro_batch=micro_batch, seq_len=seq_len, accumulation=accumulation,
                params=count_params(cfg.model), memory=memory, activations_by_kind=by_kind,
                host=states["host"] + acts["host"], device_bytes=device_bytes(gpu), allocated=allocated,
                first_step=allocated - states["optimizer_moments"],
                allocator_visible=allocated - (act_total if t.cuda_graph else 0.0),
                speed=speed, speed_error=error, notes=notes, block_types=t.checkpoint_block_types,
                host_activations=acts["host"])


def _candidates(cfg: RunConfig) -> list[list[str]]:
    """--set lists to try when a config does not fit, cheapest first: a smaller micro-batch (the global
    batch stays: more accumulation), activation checkpointing, then a ZeRO JSON that partitions or
    offloads more; then the two together."""
    from train.ds_config import REPO_ROOT, read_ds_json

    t = cfg.train
    smaller = [[f"train.micro_batch_size={mb}"] for mb in (t.micro_batch_size // 2, t.micro_batch_size // 4, 1)
               if 1 <= mb < t.micro_batch_size]
    graph_off = ["train.cuda_graph=false"] if t.cuda_graph else []
    ckpt = [graph_off + [f"train.activation_checkpointing={m}"] for m in ("mlp", "attention", "full", "true")]
    current = zero_setup(cfg)
    jsons = []
    for name in ("zero2.json", "zero3.json", "zero2_offload.json", "zero3_offload.json"):
        path = REPO_ROOT / "ds_configs" / name
        if not path.is_file() or path.name == Path(t.ds_config).name:
            continue
        other = ZeroSetup.from_ds_json(read_ds_json(str(path)))
        if other.stage > current.stage or other.offload_optimizer > current.offload_optimizer:
            jsons.append([f"train.ds_config=ds_configs/{name}"])
    combos = [a + b for a in smaller[-1:] + ckpt[2:] for b in ckpt[2:] + jsons if a != b]
    return smaller + ckpt + jsons + combos


def fitting_settings(cfg: RunConfig, gpus: int, device: float, most: int = 2) -> list[str]:
    """Up to `most` alternatives ("--set a=b --set c=d") under which `cfg` fits `device` bytes."""
    from config.loader import apply_overrides, validate

    found: list[str] = []
    for sets in _candidates(cfg):
        try:
            alt = validate(RunConfig, apply_overrides(cfg.model_dump(), sets))
            if plan(alt, gpus).total <= device:
                found.append(" ".join(f"--set {item}" for item in sets))
        except ValueError:  # the schema refuses this combination (e.g. a checkpointing mode it lacks)
            continue
        if len(found) == most:
            break
    return found


def host_memory_bytes() -> float:
    """Physical memory of this machine."""
    import os

    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def preflight(cfg: RunConfig) -> None:
    """launch/pretrain.py's check on CUDA before the start-up: print the estimate (rank 0) and raise a
    ConfigError naming settings that fit when it exceeds this GPU, or when the offloaded state of this
    machine's ranks (optimizer / parameter offload and activation checkpointing mode offload's saved tensors:
    `Plan.host`) exceeds its memory (train.plan_check=false: print only). CPU runs are not checked."""
    import os

    import torch

    from train.distributed import env_rank, training_device

    cuda = training_device(int(os.environ.get("LOCAL_RANK", "0")))
    if cuda.type != "cuda":
        return
    rank, world = env_rank()
    device = float(torch.cuda.get_device_properties(cuda).total_memory)
    p = plan(cfg, world, gpu=device / GIB)
    if rank == 0:
        print(p.summary(), flush=True)
    node_host = p.host * int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if cfg.train.plan_check and node_host > host_memory_bytes():
        ranks = node_host / p.host
        parts = [f"{what} ~{b * ranks / GIB:.1f} GiB" for what, b in
                 (("optimizer state" + (" and parameters" if p.zero.offload_params else ""),
                   p.host - p.host_activations), ("activations", p.host_activations)) if b]
        raise ConfigError(f"the offloaded state needs ~{node_host / GIB:.1f} GiB of this machine's memory "
                          f"(all its ranks: {', '.join(parts)}), more than its {host_memory_bytes() / GIB:.1f} GiB: "
                          "use more GPUs or nodes, or a DeepSpeed JSON without offload, or activation checkpointing "
                          "other than offload, or --set train.plan_check=false to start anyway")
    if p.fits or not cfg.train.plan_check:
        return
    options = fitting_settings(cfg, world, device)
    hint = (" or ".join(options) if options else "more GPUs, or a smaller model") + \
        ", or --set train.plan_check=false to start anyway"
    raise ConfigError(f"this config needs ~{p.total / GIB:.1f} GiB per GPU, more than this GPU's "
                      f"{device / GIB:.1f} GiB (python -m train.plan for the terms): use {hint}")


def report(p: Plan, tokens: float | None) -> str:
    """The planner's printed table."""
    def gb(b: float) -> str:
        return f"{b / GIB:8.2f} GiB"

    head = (f"{p.params / 1e9:.3f}B parameters on {p.gpus} GPU(s), ZeRO-{p.zero.stage}"
            f"{' + optimizer offload' if p.zero.offload_optimizer else ''}"
            f"{' + parameter offload' if p.zero.offload_params else ''}; micro-batch {p.micro_batch} x {p.seq_len}, "
            f"{p.accumulation} micro-batch(es) per step, activation checkpointing {p.checkpointing}")
    lines = [head, "", "per GPU memory:"]
    for name, value in p.memory.items():
        lines.append(f"  {name:<14}{gb(value)}")
        if name == "activations":
            lines += [f"    {k:<12}{gb(v)}" if len(k) < 12 else f"    {k} {gb(v).strip()}"
                      for k, v in p.activations_by_kind.items() if v]
    lines.append(f"  {'total':<14}{gb(p.total)}" + (f"  of {gb(p.device_bytes).strip()}: "
                                                      f"{'fits' if p.fits else 'does NOT fit'}" if p.device_bytes else ""))
    lines.append(f"  host (offload) {gb(p.host)} per GPU"
                 + (f" (activations {gb(p.host_activations).strip()})" if p.host_activations else ""))
    lines.append(f"  (allowance: CUDA context {CONTEXT_BYTES / GIB:.2f} GiB + {FRAGMENTATION:.0%} fragmentation; "
                 "see train/plan_memory.py)")
    if p.speed is None:
        lines.append(f"speed: not predicted: {p.speed_error}")
    else:
        s = p.speed
        lines += ["", (f"predicted: {s.tokens_per_s:,.0f} tokens/s per GPU, {s.tokens_per_s * p.gpus:,.0f} total "
                       f"(micro-batch {s.micro_ms:.1f} ms, optimizer step {s.boundary_ms:.1f} ms)"),
                  "  measured inputs: " + "; ".join(s.sources),
                  ("  assumptions: part time ~ its FLOPs; H200 = H100 per kernel; comm overlapped at 95% in a node, "
                   "90% across nodes; DeepSpeed costs ~ P (train/plan_speed.py)")]
        if tokens:
            h = p.hours(tokens)
            lines.append(f"  {tokens:.3g} tokens: {h:,.1f} hours ({h / 24:.1f} days) wall-clock, "
                         f"{h * p.gpus:,.0f} GPU-hours")
    lines += [f"  note: {n}" for n in p.notes]
    return "\n".join(lines)


def cluster_table(configs: Sequence[str], gpu_counts: Sequence[int], tokens: float, gpu: str) -> str:
    """Markdown: each run config as shipped (config/runs/) on each GPU count: memory, speed, time to `tokens`."""
    from config.schema import load_run_config

    lines = [("| config | GPUs | ZeRO | checkpointing | micro-batch | GiB per GPU (of device) | tokens/s per GPU | "
              "tokens/s total | wall-clock | GPU-hours |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for name in configs:
        cfg = load_run_config(name)
        for gpus in gpu_counts:
            p = plan(cfg, gpus, gpu=gpu)
            fits = "" if p.fits else " **does not fit**"
            if p.speed is None:
                speed = "| - | - | - | -"
            else:
                h = p.hours(tokens)
                speed = (f"| {p.speed.tokens_per_s:,.0f} | {p.speed.tokens_per_s * gpus / 1e6:.2f}M | "
                         f"{h / 24:.1f} days | {h * gpus:,.0f}")
            lines.append(f"| {name} | {gpus} | {p.zero.stage}{' + offload' if p.zero.offload_optimizer else ''} | "
                         f"{p.checkpointing} | {p.micro_batch} x {p.seq_len} | {p.total / GIB:.1f} "
                         f"({p.device_bytes / GIB:.0f}){fits} {speed} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m train.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="run config: a YAML path or a name in config/runs/ (1.3b, 2.7b, 6.7b, 13b, ...)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs in all")
    ap.add_argument("--zero", type=int, help="ZeRO stage 1-3 (ds_configs/zero<N>.json); default the config's")
    ap.add_argument("--offload", help="none | optimizer | optimizer+params (default: the DeepSpeed JSON's)")
    ap.add_argument("--micro-batch", type=int, help="sequences per GPU per micro-batch (default train.micro_batch_size)")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence (default train.seq_len)")
    ap.add_argument("--activation-checkpointing", help="none | full | attention | mlp | offload (in the blocks of "
                    "train.checkpoint_block_types, e.g. --set train.checkpoint_block_types=A; default all)")
    ap.add_argument("--tokens", type=float, help="token budget for the time and GPU-hours (e.g. 100e9)")
    ap.add_argument("--gpu", default="h100", help="h100 | h200 | the device memory in GiB (default h100)")
    ap.add_argument("--check", action="store_true", help="predicted vs measured for the committed pretrain runs")
    ap.add_argument("--cluster", metavar="CONFIGS",
                    help="comma-separated run configs: a markdown table of each on every --gpus-list count")
    ap.add_argument("--gpus-list", default="8,32,64,128", help="GPU counts of the --cluster table")
    return ap.parse_args(argv)


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The CLI's plan; ConfigError (one line) for bad input."""
    if not args.config:
        raise ConfigError("--config is required (a run config name such as 13b, or a YAML path)")
    for flag in ("micro_batch", "seq_len"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.zero is not None and args.zero not in (1, 2, 3):
        raise ConfigError(f"--zero must be 1, 2 or 3 (got {args.zero})")
    if args.tokens is not None and args.tokens <= 0:
        raise ConfigError("--tokens must be > 0")
    from config.schema import load_run_config

    try:
        cfg = load_run_config(args.config, args.overrides)
    except ValueError as exc:  # an unknown preset surfaces as a validation error
        raise ConfigError(str(exc).splitlines()[0]) from None
    return plan(cfg, args.gpus, zero_setup(cfg, args.zero, args.offload), args.micro_batch, args.seq_len,
                args.activation_checkpointing, args.gpu)


def main(argv: Sequence[str] | None = None) -> None:
    from train.distributed import fail_loudly
    from train.errors import user_errors

    args = parse_args(argv)

    def run() -> None:
        if args.cluster:
            counts = [int(n) for n in args.gpus_list.split(",")]
            print(cluster_table(args.cluster.split(","), counts, args.tokens or 100e9, args.gpu))
            return
        if args.check:
            from train.plan_runs import check_table

            print(check_table())
            return
        print(report(plan_from_args(args), args.tokens))

    fail_loudly(run, user_errors())


if __name__ == "__main__":
    main()
