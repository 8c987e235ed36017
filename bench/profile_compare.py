"""Two kernel profiles of the same step (`bench/profile_step.py --kernels` JSONs), GPU time grouped by what
each kernel does, side by side: where a change (float8, a fused kernel) gains and what it adds.

    python bench/profile_compare.py bench/results/profile_step_kernels_4096_bf16_1.3b_h100_2026-12-07.json \\
        bench/results/profile_step_kernels_4096_fp8_1.3b_h100_2026-12-07.json --name fp8_kernel_groups_1.3b_h100 --out DIR

Kernels are grouped by name (GROUPS: the first pattern that matches); the profile's kernels beyond the rows it
kept (its --top) are one "not listed" row, so each column sums to the profile's kernel time.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages first

from bench.common import RESULTS, write_results  # noqa: E402

GROUPS = (  # (group, pattern on the kernel name), first match wins
    ("GEMM float8", r"nvjet_sm90_q[a-z]*tst|e4m3|e5m2"),
    ("GEMM bf16", r"nvjet|gemm|cutlass|sm90_xmma"),
    ("float8 scale and cast (torch.compile)", r"^triton_"),
    ("attention", r"sdpa|flash|fmha|cudnn"),
    ("SSD scan", r"_chunk_|_state_passing|_bmm_chunk|_cb_grad"),
    ("causal conv", r"causal_conv1d"),
    ("norms", r"_layer_norm"),
    ("SwiGLU", r"_swiglu"),
    ("LM head loss", r"cross_entropy"),
    ("copies and fills", r"Memcpy|Memset|Copy|copy_kernel|FillFunctor|CatArray"),
    ("other torch elementwise and reductions", r"at::native|at_cuda_detail"),
)
OTHER = "other"
NOT_LISTED = "not listed (below the profile's --top)"


def group_of(kernel: str) -> str:
    return next((name for name, pattern in GROUPS if re.search(pattern, kernel)), OTHER)


def grouped(profile: dict) -> dict[str, float]:
    """ms per step by group; NOT_LISTED holds the profile's kernel time outside its rows."""
    out: dict[str, float] = {}
    for row in profile["rows"]:
        key = group_of(row["op"])
        out[key] = out.get(key, 0.0) + row["ms_per_step"]
    out[NOT_LISTED] = profile["meta"]["profiled_ms_per_step"] - sum(out.values())
    return out


def compare(base: dict, other: dict) -> list[dict]:
    """One row per group (GROUPS' order): ms per step of each profile and the difference."""
    a, b = grouped(base), grouped(other)
    names = [g for g, _ in GROUPS] + [OTHER, NOT_LISTED]
    rows = [{"group": g, "base_ms": round(a.get(g, 0.0), 2), "other_ms": round(b.get(g, 0.0), 2),
             "diff_ms": round(b.get(g, 0.0) - a.get(g, 0.0), 2)} for g in names if g in a or g in b]
    rows.append({"group": "all kernels", "base_ms": round(sum(a.values()), 2), "other_ms": round(sum(b.values()), 2),
                 "diff_ms": round(sum(b.values()) - sum(a.values()), 2)})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", type=Path, help="profile_step.py JSON of the baseline")
    ap.add_argument("other", type=Path, help="profile_step.py JSON of the change")
    ap.add_argument("--name", default="profile_compare")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    try:
        base, other = (json.loads(p.read_text()) for p in (args.base, args.other))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot read a profile: {exc} (pass two bench/profile_step.py JSON files)") from None
    rows = compare(base, other)
    meta = {"base": args.base.name, "other": args.other.name, "device": base["meta"].get("device"),
            "date": f"profiles of {base['meta'].get('date')} and {other['meta'].get('date')}",
            "command": "python bench/profile_compare.py " + " ".join(sys.argv[1:])}
    title = f"GPU time per step by kernel group: {args.base.stem} (base) vs {args.other.stem} (other)"
    write_results(args.name, rows, meta, ["group", "base_ms", "other_ms", "diff_ms"], out_dir=args.out, title=title)


if __name__ == "__main__":
    main()
