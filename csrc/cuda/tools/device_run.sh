#!/usr/bin/env bash
# One device call: build the extension for sm_90a, run the CUDA tests, compute-sanitizer on a small
# case, then the GPU benchmark. Logs under $OUT; short summary printed last.
#   FUZZ=500 TESTS="tests/test_cuda_kernels.py" BENCH_ARGS="--quick" bash csrc/cuda/tools/device_run.sh
# PYTEST_ARGS replaces the tests' default `-q` (so `PYTEST_ARGS=-v` lists each test).
# If the package build fails, the CUDA kernels are built standalone (tools/build_standalone.py) and
# tests/benchmarks load them through DILATED_SPARSE_TEST_LIB.
set -u
OUT=${OUT:-/tmp/ds_out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PYTHONPATH=$PWD
# The distribution's compilers where they exist (BUILD_CC / BUILD_CXX override): the GPU machine's
# default CXX, /opt/gcc/bin/g++, gives the extension private copies of libstdc++ code (4596 defined
# std:: symbols against 165), and its first error message with a number in it then crashes the
# process (BUILDING.md; the forty-fifth session's first run hit it again).
BUILD_CC=${BUILD_CC:-/usr/bin/gcc} BUILD_CXX=${BUILD_CXX:-/usr/bin/g++}
[ -x "$BUILD_CXX" ] && export CC=$BUILD_CC CXX=$BUILD_CXX
echo "compilers: CC=${CC:-unset} CXX=${CXX:-unset}"
nvidia-smi -L
t0=$(date +%s)
if $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  echo "build ok: $(( $(date +%s) - t0 )) s"
else
  echo "PACKAGE BUILD FAILED"; grep -E "error" "$OUT/build.log" | head -20
  lib=$($PY csrc/cuda/tools/build_standalone.py 2>>"$OUT/build.log" | tail -1)
  echo "standalone: $lib ($(( $(date +%s) - t0 )) s)"; export DILATED_SPARSE_TEST_LIB=$lib
  [ -f "$lib" ] || { grep -E "error" "$OUT/build.log" | head -40; exit 1; }
fi
$PY -c "import dilated_sparse as d, torch; print('ext', d.extension_available(), torch.__version__)" 2>&1 | tail -1
# A build whose error messages crash (the compilers above) would kill the tests mid-run: say so first.
$PY -m pytest -q -p no:cacheprovider tests/test_build.py::test_loaded_extension_formats_numbers_in_its_errors \
  > "$OUT/build_check.log" 2>&1 || { echo "BUILD CHECK FAILED"; grep -E "^E " "$OUT/build_check.log" | head -5; }
if [ "${TESTS:-}" != "none" ]; then
  DILATED_SPARSE_FUZZ=${FUZZ:-500} timeout ${TEST_TIMEOUT:-300} $PY -m pytest ${PYTEST_ARGS:--q} -p no:cacheprovider ${TESTS:-tests/test_cuda_kernels.py} > "$OUT/tests.log" 2>&1
  echo "tests rc=$? ($(( $(date +%s) - t0 )) s)"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -30
fi
if [ -n "${VARIANTS:-}" ]; then  # the tests again with every kernel forced to tile variant v
  for vv in $VARIANTS; do
    DILATED_SPARSE_FWD_VARIANT=$vv DILATED_SPARSE_DQ_VARIANT=$vv DILATED_SPARSE_DKV_VARIANT=$vv \
      DILATED_SPARSE_FUZZ=${VFUZZ:-100} DILATED_SPARSE_FUZZ_PATTERNS=${VFUZZ_PATTERNS:-30} timeout 200 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py > "$OUT/tests_v.log" 2>&1
    echo "variant $vv tests rc=$? ($(( $(date +%s) - t0 )) s)"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests_v.log" | tail -8
    cat "$OUT/tests_v.log" >> "$OUT/tests_variants.log"; rm -f "$OUT/tests_v.log"
  done
fi
if [ "${SPLITRUN:-0}" = "1" ]; then  # the tests again with every row longer than 2 entries split
  # (SPLIT_ON_DEVICE=1: every split planned on the device, as a captured call plans it)
  DILATED_SPARSE_SPLIT_CHUNK=2 DILATED_SPARSE_SPLIT_ON_DEVICE=${SPLIT_ON_DEVICE:-0} DILATED_SPARSE_FUZZ=${VFUZZ:-100} DILATED_SPARSE_FUZZ_PATTERNS=${VFUZZ_PATTERNS:-30} timeout 200 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py > "$OUT/tests_split.log" 2>&1
  echo "split-forced tests rc=$? ($(( $(date +%s) - t0 )) s)"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests_split.log" | tail -8
fi
if [ "${LARGE:-0}" = "1" ]; then
  DILATED_SPARSE_TEST_LARGE=1 timeout 200 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py -k 64bit > "$OUT/tests_large.log" 2>&1
  echo "64-bit test rc=$? ($(( $(date +%s) - t0 )) s)"; grep -E "passed|failed" "$OUT/tests_large.log" | tail -3
fi
if [ "${TUNE:-0}" = "1" ]; then
  timeout ${TUNE_TIMEOUT:-240} $PY csrc/cuda/tools/tune_variants.py --out "$OUT" ${TUNE_ARGS:-} > "$OUT/tune.log" 2>&1
  echo "tune rc=$? ($(( $(date +%s) - t0 )) s)"; grep BEST "$OUT/tune.log"
fi
if [ "${SANITIZE:-1}" = "1" ]; then
  DILATED_SPARSE_SPLIT_CHUNK=${SAN_SPLIT_CHUNK:-} DILATED_SPARSE_SPLIT_ON_DEVICE=${SPLIT_ON_DEVICE:-0} \
    timeout ${SAN_TIMEOUT:-240} compute-sanitizer --tool memcheck --error-exitcode 9 $PY tests/test_cuda_kernels.py --small > "$OUT/memcheck.log" 2>&1
  echo "memcheck rc=$? ($(( $(date +%s) - t0 )) s)"; tail -3 "$OUT/memcheck.log"
  if [ "${RACECHECK:-0}" = "1" ]; then
    timeout ${SAN_TIMEOUT:-240} compute-sanitizer --tool racecheck --error-exitcode 9 $PY tests/test_cuda_kernels.py --small > "$OUT/racecheck.log" 2>&1
    echo "racecheck rc=$? ($(( $(date +%s) - t0 )) s)"; tail -3 "$OUT/racecheck.log"
    # Barrier use: the consumer warpgroups hand turns over through named barriers across items.
    timeout ${SAN_TIMEOUT:-240} compute-sanitizer --tool synccheck --error-exitcode 9 $PY tests/test_cuda_kernels.py --small > "$OUT/synccheck.log" 2>&1
    echo "synccheck rc=$? ($(( $(date +%s) - t0 )) s)"; tail -3 "$OUT/synccheck.log"
  fi
fi
if [ "${BENCH:-1}" = "1" ]; then
  timeout ${BENCH_TIMEOUT:-300} $PY benchmarks/gpu_bench.py --out "$OUT" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  echo "bench rc=$? ($(( $(date +%s) - t0 )) s)"; grep -v "^|---" "$OUT/bench.log" | tail -${BENCH_LINES:-45}
fi
echo "total: $(( $(date +%s) - t0 )) s"
