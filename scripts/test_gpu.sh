#!/usr/bin/env bash
# The whole test suite on a GPU machine with no internet (the device: Python 3.12, CUDA torch preinstalled).
#
#   bash scripts/test_gpu.sh WHEEL_DIR OUT_DIR [PYTEST_ARGS...]     # default: the whole suite, tests/
#
# Installs every wheel in WHEEL_DIR (no index, no dependency resolution) into $SITE (default /tmp/site,
# so consecutive calls on one warm machine add up: a device call carries at most 64 MiB of wheels), puts
# it first on PYTHONPATH, then runs `python -m pytest -q tests/` from the repository root on WORKERS
# pytest-xdist workers (default 8; 0: one process), the interpreted-kernel tests first, in a process of their
# own. OUT_DIR gets junit.xml and pytest.log (every failure, error and skip's reason: -rfEs),
# junit_interpreted.xml and pytest_interpreted.log, and environment.txt (torch/CUDA and which optional
# packages are installed). Tests whose package is missing skip with that reason; the exit code is pytest's.
# An empty WHEEL_DIR installs nothing (the suite runs on what the machine has).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash scripts/test_gpu.sh WHEEL_DIR OUT_DIR [PYTEST_ARGS...]" >&2
  exit 2
fi
wheels=$(realpath -m "$1")
out=$(realpath -m "$2")
shift 2
targets=("${@:-tests}")
if [ ! -d "$wheels" ]; then
  echo "error: wheel folder $wheels does not exist (stage wheels there, or pass an empty folder)" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
site=${SITE:-/tmp/site}
mkdir -p "$out" "$site"
shopt -s nullglob
found=("$wheels"/*.whl)
if [ ${#found[@]} -gt 0 ]; then
  # Staged, then moved in package by package: `pip install --target --upgrade` replaces each top-level folder
  # the new wheels have, bin/ included, which deleted an earlier call's console scripts (the deepspeed launcher).
  staged=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$staged" "${found[@]}"
  mkdir -p "$site/bin"
  for entry in "$staged"/*; do
    name=$(basename "$entry")
    case "$name" in
      bin) cp -a "$entry"/. "$site/bin/" ;;
      *.dist-info) rm -rf "$site/${name%%-*}"-*.dist-info && mv "$entry" "$site/" ;;  # an older version's too
      *) rm -rf "${site:?}/$name" && mv "$entry" "$site/" ;;
    esac
  done
  rm -rf "$staged"
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$site/bin:$PATH"  # console scripts of the installed wheels (the deepspeed launcher)
export TORCH_CUDA_ARCH_LIST=9.0  # the device sets 9.0a, which DeepSpeed's op builder cannot parse
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # no network there: fail fast instead of retrying
if ! python3 -c "import pytest" 2>/dev/null; then
  echo "error: pytest does not import: add its wheel (and pluggy, iniconfig) to $wheels" >&2
  exit 2
fi
python3 - > "$out/environment.txt" <<'EOF'
import importlib.metadata as md, importlib.util, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
for name in ("mamba_ssm", "causal_conv1d", "flash_attn", "deepspeed", "datatrove", "transformers", "lm_eval",
             "torchao", "bitsandbytes", "onnx", "onnxscript", "onnxruntime", "sentencepiece", "datasets", "wandb",
             "orjson", "xxhash"):
    if importlib.util.find_spec(name) is None:  # found, not imported: a broken build shows in its tests
        print(f"{name} MISSING")
        continue
    try:
        print(f"{name} {md.version(name.replace('_', '-'))}")
    except md.PackageNotFoundError:
        print(f"{name} (version unknown)")
EOF
cat "$out/environment.txt"
# What whole test folders need beyond importable packages, checked in a second rather than failed on for minutes:
# the launcher of the DeepSpeed that imports (tests/train launch CPU worlds with it), and the versions of the
# packages datatrove imports lazily (pipeline/preflight.py's check, which curation runs too).
if python3 -c "import deepspeed" 2>/dev/null && ! command -v deepspeed >/dev/null; then
  echo "error: deepspeed imports but its launcher is not on PATH: add the bin/ folder its wheel installed" >&2
  exit 2
fi
if python3 -c "import datatrove" 2>/dev/null; then
  python3 -c "
import sys
from pipeline.errors import CurationError
from pipeline.preflight import check_packages
try:
    check_packages()
except CurationError as exc:
    sys.exit(f'error: {exc}')" || exit 2
fi
# Only the pytest plugins the suite uses: an image's own (pytest-benchmark's `benchmark` fixture took over a test
# parameter of that name) must not change what the tests see.
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
plugins=()
python3 -c "import pytest_timeout" 2>/dev/null && plugins+=(-p pytest_timeout)
# The interpreted-kernel tests import mamba_ssm / flash_attn under Triton's CPU interpreter: in a process
# where other tests already imported the compiled packages they cannot, so they run in one of their own.
interpreted=tests/model/test_kernels_interpreted.py
first=0
set +e
for t in "${targets[@]}"; do  # only when a target holds that module
  case "$interpreted" in "${t%/}" | "${t%/}"/*)
    python3 -m pytest -q -rs "${plugins[@]}" "$interpreted" --junitxml="$out/junit_interpreted.xml" 2>&1 | tee "$out/pytest_interpreted.log"
    first=${PIPESTATUS[0]}
    break ;;
  esac
done
# pytest-xdist workers (WORKERS, default 8 where xdist imports): the serial suite would not fit a 10-minute call
workers=()
if [ "${WORKERS:-8}" != 0 ] && python3 -c "import xdist" 2>/dev/null; then
  plugins+=(-p xdist.plugin)
  workers=(-n "${WORKERS:-8}")
fi
# SESSION_TIMEOUT (seconds): stop starting tests after it, so that a run cut short by the caller's time limit
# still ends with its summary and junit.xml (a killed pytest writes neither)
stop=()
if [ -n "${SESSION_TIMEOUT:-}" ] && python3 -c "import pytest_timeout" 2>/dev/null; then
  stop=(--session-timeout "$SESSION_TIMEOUT")
fi
python3 -m pytest -q -rfEs "${plugins[@]}" "${workers[@]}" "${stop[@]}" "${targets[@]}" --ignore="$interpreted" \
  --junitxml="$out/junit.xml" 2>&1 | tee "$out/pytest.log"
status=${PIPESTATUS[0]}
[ "$status" -ne 0 ] && exit "$status"
exit "$first"
