#!/usr/bin/env bash
# Everything a GPU machine should do, in one call of at most 10 minutes (see docs/benchmarks.md,
# "On a GPU"):
#   BENCH_GIT_COMMIT=<git rev-parse --short HEAD, here> bash bench/gpu_run.sh
# (the commit written in literally: the GPU machine may get a copy of the working tree without .git).
# Wheels put in .whl/ (e.g. liger-kernel for the "liger" provider) are installed into /tmp/site first.
#
# 1. the real-GPU tests (tests/test_gpu.py);
# 2. the headline case (python -m bench --grid askd-core) and its targets, logged, not saved;
# 3. the GPU grid (python -m bench --grid gpu) with the time that is left as its budget: cells that
#    would start past it are recorded as "skipped" (the largest shapes go first), appended to the
#    committed results, $BENCH_RESULTS_ROOT/gpu/<device>/results.csv (default root bench/results);
# 4. plots and summary.md of those results folders.
# With $OUT set (a folder that is sent back), the logs go there and $BENCH_RESULTS_ROOT/gpu/ comes
# back as one tarball, bench-results-gpu.tar.gz: unpack it with
# `tar xzf .../bench-results-gpu.tar.gz -C bench/results` and commit bench/results/gpu/. Run by hand
# on a GPU machine, everything stays under $BENCH_RESULTS_ROOT.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
limit="${BENCH_GPU_LIMIT_S:-585}"  # the 10-minute call, less a margin for sending $OUT back
# (BENCH_GPU_GRID=tiny BENCH_RESULTS_ROOT=/tmp/r runs the script through on a CPU machine, to check it)
root="${BENCH_RESULTS_ROOT:-bench/results}"
logs="${OUT:-$root/gpu/logs}"
mkdir -p "$logs"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
left() { echo $(( limit - (SECONDS - start) )); }

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
  python3 - <<'PY'
import torch, triton, platform
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| triton", triton.__version__,
      "| cuda", torch.version.cuda, "| python", platform.python_version())
try:
    import liger_kernel  # noqa: F401
    from importlib.metadata import version
    print("liger-kernel", version("liger-kernel"))
except Exception as error:  # noqa: BLE001
    print("liger-kernel: not available:", error)
PY
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
} 2>&1 | tee "$logs/env-$stamp.txt"

# 1. the real-GPU tests
timeout 240 python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$logs/gpu-tests-$stamp.txt"
# 2. the headline case (askd_loss, B=8, T=2048, V=151936, bf16) against eager and torch.compile
timeout 150 python3 -m bench --grid askd-core --no-save --no-progress --out "$logs/askd-core-$stamp.jsonl" 2>&1 \
  | tee "$logs/bench-askd-core-$stamp.txt"
# 3. the grid: measuring stops starting new cells at its budget; 45 s are kept for one cell's
#    overrun, the plots and the tarball; `timeout` is the backstop (results are appended per cell)
budget=$(( $(left) - 75 ))
if (( budget > 30 )); then
  timeout $(( budget + 45 )) python3 -m bench --grid "${BENCH_GPU_GRID:-gpu}" --budget-s "$budget" \
    --results-root "$root" --no-progress --no-plot 2>&1 \
    | tee "$logs/bench-grid-$stamp.txt"
else
  echo "no time left for the grid ($(left) s)" | tee "$logs/bench-grid-$stamp.txt"
fi
# 4. plots + summary.md of every GPU results folder (the latest run of each)
for dir in "$root"/gpu/*/; do
  [[ -f "$dir/results.csv" ]] && timeout 60 python3 -m bench.plot "$dir" 2>&1 | tee -a "$logs/bench-grid-$stamp.txt"
done
if [[ -n "${OUT:-}" ]] && compgen -G "$root/gpu/*/results.csv" >/dev/null; then
  tar czf "$OUT/bench-results-gpu.tar.gz" -C "$root" --exclude=logs gpu
fi
echo "gpu_run.sh: $(( SECONDS - start )) s"
