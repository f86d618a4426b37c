#!/usr/bin/env bash
# One device call: build the extension for sm_90a, run the CUDA tests, compute-sanitizer on a small
# case, then the GPU benchmark. Logs under $OUT; short summary printed last.
#   FUZZ=500 TESTS="tests/test_cuda_kernels.py" BENCH_ARGS="--quick" bash csrc/cuda/tools/device_run.sh
set -u
OUT=${OUT:-/tmp/ds_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PYTHONPATH=$PWD
nvidia-smi -L
t0=$(date +%s)
python setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { grep -E "error|Error" "$OUT/build.log" | head -40; tail -20 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
python -c "import dilated_sparse as d, torch; print('ext', d.extension_available(), torch.__version__)"
if [ "${TESTS:-}" != "none" ]; then
  DILATED_SPARSE_FUZZ=${FUZZ:-500} timeout ${TEST_TIMEOUT:-300} python -m pytest -q -x ${PYTEST_ARGS:-} ${TESTS:-tests/test_cuda_kernels.py} > "$OUT/tests.log" 2>&1
  echo "tests rc=$?"; tail -25 "$OUT/tests.log"
fi
if [ "${SANITIZE:-1}" = "1" ]; then
  timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 python tests/test_cuda_kernels.py --small > "$OUT/memcheck.log" 2>&1
  echo "memcheck rc=$?"; tail -4 "$OUT/memcheck.log"
  if [ "${RACECHECK:-0}" = "1" ]; then
    timeout 240 compute-sanitizer --tool racecheck --error-exitcode 9 python tests/test_cuda_kernels.py --small > "$OUT/racecheck.log" 2>&1
    echo "racecheck rc=$?"; tail -4 "$OUT/racecheck.log"
  fi
fi
if [ "${BENCH:-1}" = "1" ]; then
  timeout ${BENCH_TIMEOUT:-300} python benchmarks/gpu_bench.py --out "$OUT" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; grep -v "^|---" "$OUT/bench.log" | tail -40
fi
echo "total: $(( $(date +%s) - t0 )) s"
