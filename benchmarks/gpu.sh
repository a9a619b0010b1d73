#!/usr/bin/env bash
# One command on a CUDA machine (torch preinstalled, no package index): install the wheels benchmarks/gpu_wheels.sh
# put in .whl/, run the CUDA tests and the benchmark at the paper's sizes, and write logs, table, JSON and plot to
# $OUT (benchmarks/results/gpu without it): under 6 minutes is the aim, so that a run and a rerun fit in one session's
# GPU time. ROUNDS=0.5 halves every measurement's rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PYTHON' | tee "$OUT/versions.txt"
import torch, transformers, vr_hf
from vr_hf.modeling import vision_remember_attention, vision_remember_triton
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"{device}; torch {torch.__version__}, transformers {transformers.__version__}, vr_hf from {vr_hf.__file__}")
print(f"torch varlen kernels: {vision_remember_attention.varlen_attn is not None}")
triton = vision_remember_triton.triton
print(f"triton: {triton.__version__ if triton else 'not installed'}")
PYTHON
tests=0
python3 -m pytest -q -p no:cacheprovider -rs tests/test_fast_paths.py tests/test_blocks.py 2>&1 \
    | tee "$OUT/cuda_tests.log" || tests=$?
python3 benchmarks/benchmark.py --rounds "${ROUNDS:-1}" --output-dir "$OUT" 2>&1 | tee "$OUT/benchmark.log"
exit "$tests"
