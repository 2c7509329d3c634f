#!/bin/sh
# tests/bench/gpu_check.py on a machine that has torch, torchvision, numpy and Pillow but not the
# rest of clipseek's dependencies, and no network: they come as wheels in gpu-wheels/ (git-ignored;
# the README's "Devices" says how to fill it). Extra arguments go to the check (--pictures N …).
set -eu
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-check}
python3 -m venv --system-site-packages .gpu-venv  # torch and its CUDA from the machine
.gpu-venv/bin/python -m pip install --quiet --no-index --no-deps --no-compile gpu-wheels/*.whl
OUT=$OUT PYTHONPATH=$PWD .gpu-venv/bin/python -m tests.bench.gpu_check --out "$OUT" "$@"
