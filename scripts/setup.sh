#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its requirements. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: the CPU machines serve 2.13.0 from local disk.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .
# CPU machines: the Triton kernels of mamba-ssm and flash-attn for the tests that run them through
# Triton's CPU interpreter (tests/model/conftest.py). Triton and the two packages' Python sources (no
# CUDA build) go to their own folder, outside the environment the project runs in: nothing else imports them.
KERNELS_CPU=.venv/kernels-cpu
if .venv/bin/python -c "import sys, torch; sys.exit(torch.version.cuda is not None)" && [ ! -f "$KERNELS_CPU/.complete" ]; then
  rm -rf "$KERNELS_CPU"
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
    .venv/bin/python -m pip install -q --no-deps --no-build-isolation --target "$KERNELS_CPU" triton==3.9.0 \
    "$(grep '^mamba-ssm==' requirements-cuda.txt)" "$(grep '^flash-attn==' requirements-cuda.txt)"
  touch "$KERNELS_CPU/.complete"
fi
