#!/usr/bin/env bash
# Wheels for the GPU check's machine: the Python packages daychat's GPU path imports that a bare CUDA image
# (PyTorch, numpy, pyyaml, tiktoken, safetensors, ...) may lack, downloaded HERE (where the package index is
# reachable) into .whl/, which bench/gpu_check.sh installs from on a machine without internet.
#   bash bench/gpu_wheels.sh            # then carry .whl to the GPU machine and run bash bench/gpu_check.sh
# The versions are this checkout's venv's (or the newest, without one); CPython 3.12, x86-64 manylinux.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
mkdir -p .whl  # ignored (.gitignore): wheels are never committed
pins=()
for name in pydantic pydantic-core annotated-types typing-inspection typing-extensions; do
  version=$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  pins+=("$name${version:+==$version}")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pins[@]}"
ls .whl
