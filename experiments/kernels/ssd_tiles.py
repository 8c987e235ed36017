"""Do wider tile-config searches make mamba_ssm's Triton kernels in the Mamba2 mixer faster on this GPU?

mamba_ssm autotunes each SSD kernel over a short list of configs written for earlier GPUs. This bench
runs the mixer's forward+backward (kernel path, bf16, the preset's widths) once with mamba_ssm's lists,
takes the kernels that autotuned, then gives each of the `--top` slowest (by the time Triton's autotuner
measured for its pick) a wider list: its own configs plus every block shape of that list at each
`--warps` x `--stages` combination (pre-hooks kept: some kernels zero an accumulator first). Triton's
autotuner then times every candidate on the real shapes. Rows, per kernel: the best time among
mamba_ssm's configs and among all candidates, and the winning config (kernels retuned one at a time,
each row written as it comes); then the mixer's forward+backward time (CUDA-graph replay,
bench/block_costs.time_part) with mamba_ssm's lists and with the wider ones.
A win here is a candidate for shipping per-GPU configs; this bench changes nothing in the model.

    python experiments/kernels/ssd_tiles.py --preset 1.3b --seq-len 8192 --top 6
    python experiments/kernels/ssd_tiles.py --smoke     # CPU: the config widening and the results files (no kernels)
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import sys
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repo's packages first

from bench.block_costs import time_part  # noqa: E402
from bench.common import add_run_options, environment, write_results  # noqa: E402
from model import ModelConfig  # noqa: E402
from model.mamba2 import Mamba2Mixer  # noqa: E402

COLUMNS = ["kernel", "configs", "best_ms_mamba_ssm", "best_ms_widened", "speedup", "winner", "mixer_ms", "status"]
# the modules of mamba_ssm.ops.triton that define the SSD kernels' autotuners
SSD_MODULES = ("ssd_chunk_scan", "ssd_chunk_state", "ssd_state_passing", "ssd_bmm", "ssd_combined")


def config_key(config) -> tuple:
    """What makes two triton.Config the same candidate: block sizes, warps, stages."""
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


def widen(configs: list, warps: list[int], stages: list[int], make) -> list:
    """`configs` plus each of their block shapes at every warps x stages, without repeats; `make(kwargs,
    num_warps, num_stages, pre_hook)` builds a config (triton.Config on a GPU)."""
    out, seen = list(configs), {config_key(c) for c in configs}
    shapes = {tuple(sorted(c.kwargs.items())): c.pre_hook for c in configs}
    for (shape, hook), w, s in itertools.product(shapes.items(), warps, stages):
        new = make(dict(shape), w, s, hook)
        if config_key(new) not in seen:
            seen.add(config_key(new))
            out.append(new)
    return out


def autotuners(modules: list[ModuleType]) -> dict[str, object]:
    """Every Triton autotuned kernel defined in `modules`, by name."""
    from triton.runtime.autotuner import Autotuner

    return {name: obj for m in modules for name, obj in vars(m).items() if isinstance(obj, Autotuner)}


def best_ms(tuner, among: set[tuple] | None = None) -> tuple[float, object]:
    """(ms, config) of the fastest candidate the autotuner timed at its last tuning (median of its
    timings), optionally among the configs whose key is in `among`."""
    timed = {c: t[0] if isinstance(t, (list, tuple)) else t for c, t in tuner.configs_timings.items()}
    if among is not None:
        timed = {c: t for c, t in timed.items() if config_key(c) in among}
    config = min(timed, key=timed.get)
    return float(timed[config]), config


def describe(config) -> str:
    shape = ", ".join(f"{k.removeprefix('BLOCK_SIZE_')}={v}" for k, v in sorted(config.kwargs.items()))
    return f"{shape}; warps {config.num_warps}, stages {config.num_stages}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--top", type=int, default=6, help="how many of the slowest kernels get wider lists")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="2,3,4,5")
    add_run_options(ap, iters=20)
    args = ap.parse_args(argv)
    warps, stages = [int(w) for w in args.warps.split(",")], [int(s) for s in args.stages.split(",")]
    device = torch.device("cpu" if args.smoke else "cuda")
    name = args.name or f"ssd_tiles_{'tiny_smoke' if args.smoke else args.preset}"
    meta = environment(device) | {"preset": "tiny" if args.smoke else args.preset, "seq_len": args.seq_len}
    if args.smoke:  # no Triton kernels on CPU: the widening on plain stand-ins, and the files
        from types import SimpleNamespace as Cfg

        mamba_ssm_list = [Cfg(kwargs={"BLOCK_SIZE_M": 64}, num_warps=4, num_stages=3, pre_hook=None)]
        wide = widen(mamba_ssm_list, warps, stages,
                     lambda kw, w, s, hook: Cfg(kwargs=kw, num_warps=w, num_stages=s, pre_hook=hook))
        rows = [{"kernel": "stand-in", "configs": f"{len(mamba_ssm_list)} -> {len(wide)}", "status": "smoke"}]
        write_results(name, rows, meta, COLUMNS, args.out, title="SSD kernel tile configs (smoke)")
        return 0

    import triton

    cfg = ModelConfig(preset=args.preset)
    torch.manual_seed(0)
    mixer = Mamba2Mixer(cfg, 0).to(device=device, dtype=torch.bfloat16).train()
    mixer.impl = "kernels"
    x = torch.randn(1, args.seq_len, cfg.d_model, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)

    def step() -> None:
        mixer(x).backward(grad)

    tuners = autotuners([importlib.import_module(f"mamba_ssm.ops.triton.{m}") for m in SSD_MODULES])
    params = list(mixer.parameters())
    rows: list[dict] = []
    base_ms = time_part(step, params, x, device, args.iters)  # autotunes over mamba_ssm's lists first
    used = {n: t for n, t in tuners.items() if t.cache and getattr(t, "configs_timings", None)}
    slowest = sorted(used, key=lambda n: best_ms(used[n])[0], reverse=True)[:args.top]
    title = f"SSD kernel tile configs ({args.preset} Mamba2 mixer, 1 x {args.seq_len})"
    for n in slowest:  # one kernel at a time, its row written at once: compiling the candidates takes a while
        tuner, own = used[n], list(used[n].configs)
        tuner.configs = widen(own, warps, stages,
                              lambda kw, w, s, hook: triton.Config(kw, num_warps=w, num_stages=s, pre_hook=hook))
        tuner.cache.clear()
        step()  # retunes this kernel over its wider list; the others keep their picks
        try:
            ms_own, _ = best_ms(tuner, {config_key(c) for c in own})
            ms_all, winner = best_ms(tuner)
            rows.append({"kernel": n, "configs": f"{len(own)} -> {len(tuner.configs)}", "best_ms_mamba_ssm": ms_own,
                         "best_ms_widened": ms_all, "speedup": ms_own / ms_all, "winner": describe(winner)})
        except ValueError as exc:  # no timings among its own configs (every one failed to run)
            rows.append({"kernel": n, "status": f"{type(exc).__name__}: {exc}"[:200]})
        print(rows[-1], flush=True)
        write_results(name, rows, meta, COLUMNS, args.out, title=title)
    wide_ms = time_part(step, params, x, device, args.iters)
    rows.append({"kernel": "mixer forward+backward", "configs": "mamba_ssm's lists", "mixer_ms": base_ms})
    rows.append({"kernel": "mixer forward+backward", "configs": f"widened for the {len(slowest)} slowest",
                 "mixer_ms": wide_ms, "speedup": base_ms / wide_ms})
    write_results(name, rows, meta, COLUMNS, args.out, title=title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
