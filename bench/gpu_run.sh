#!/usr/bin/env bash
# Everything a lent GPU should do, in one `device` call (see the README's Benchmarks section):
#   run(command="bash bench/gpu_run.sh", timeout_s=600)
# The device image has torch and triton but no network, so the package is used from the source tree.
# Writes the GPU test log and the benchmark records under $OUT (and bench/results/ when run by hand);
# commit them under bench/results/ afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'PY' | tee "$out/env-$stamp.txt"
import torch, triton, platform
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| triton", triton.__version__,
      "| cuda", torch.version.cuda, "| python", platform.python_version())
PY
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee -a "$out/env-$stamp.txt"
# 1. the real-GPU tests, then the rest of the suite (CPU tensors take the torch path here)
python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$out/gpu-tests-$stamp.txt"
# 2. the core benchmark case (B=8, T=2048, V=151936, bf16) against eager and torch.compile
python3 -m bench --out "$out/askd-core-$stamp.jsonl" 2>&1 | tee "$out/bench-askd-core-$stamp.txt"
