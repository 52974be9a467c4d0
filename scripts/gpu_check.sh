#!/usr/bin/env bash
# The FSDP check on a GPU machine (not runnable on CPU: Lightning refuses strategy=fsdp there).
# Tokens/s, MFU and peak memory of `small` and `tinyllama-1.1b` with FSDP + bf16-mixed on one GPU,
# and the sharded-checkpoint consolidation check. Results: bench/results/fsdp-*.json (record them in
# docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name())"
$PY bench/fsdp_check.py --model small --batch-size 8 --seq-len 2048 --steps 30 "$@"
$PY bench/fsdp_check.py --model tinyllama-1.1b --batch-size 4 --seq-len 2048 --steps 20 "$@"
