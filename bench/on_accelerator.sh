#!/usr/bin/env bash
# One prepared run for a lent accelerator (about 15 minutes): the kernels against the reference, then MFU and
# memory of the full-size decoders beside the PyTorch peer. Usage: bash bench/on_accelerator.sh [OUT_DIR]
set -u
out=${1:-${OUT:-bench-results}}
mkdir -p "$out"
pip install -q -e ".[test]" >/dev/null 2>&1 || echo "note: pip install failed; using the installed packages"
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null | tee "$out/device.txt"
timeout 180 python bench/accelerator_checks.py | tee "$out/kernels.jsonl"
timeout 420 python bench/mfu.py --configs optimus_prime,yinggem --steps 20 --dtype bfloat16 --timeout 200 \
  | tee "$out/mfu.txt"
timeout 240 python bench/memory.py --configs yinggem,optimus_prime --steps 4 | tee "$out/memory.txt"
