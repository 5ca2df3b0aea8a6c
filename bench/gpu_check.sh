#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py says what it measures): run it as ONE command on a CUDA machine.
#   bash bench/gpu_check.sh              # ~8 minutes on an H100/H200; writes reports/bench/gpu-<card>.json
#   bash bench/gpu_check.sh --cpu        # the same code at tiny shapes on a CPU
# Needs only the repository and a Python with PyTorch (CUDA build): on a machine without daychat's venv it
# runs with the system python3, importing daychat from the checkout (no install, no internet), plus the
# wheels in .whl/ if there are any (bench/gpu_wheels.sh). It stops within seconds, naming what is missing,
# if a package the GPU path imports is not there (a first visit lost its recipe figures to that).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && .venv/bin/python -c "import torch; assert torch.cuda.is_available() or '--cpu' in '$*'" 2>/dev/null \
  && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Packages the machine's image lacks travel as wheels (bash bench/gpu_wheels.sh here, then carry .whl).
if [ "$PY" = python3 ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/daychat-site \
    .whl/*.whl && export PYTHONPATH="/tmp/daychat-site:$PYTHONPATH"
fi
export PYTORCH_ALLOC_CONF="${PYTORCH_ALLOC_CONF:-expandable_segments:True}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
exec "$PY" -m bench.gpu_check "$@"
