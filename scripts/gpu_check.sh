#!/usr/bin/env bash
# Runs on the GPU machine (the device tool): builds the CUDA kernels for this card, runs the GPU
# tests against the fp64 CPU reference, compute-sanitizer memcheck, synccheck and racecheck on a
# reduced set, then the benchmark and the dense anchors (cuDNN, FlashAttention-2 through torch) in
# the same run.
# Logs go to $OUT (default /tmp/monarchrt-gpu). GoogleTest is built from .deps/googletest when the
# machine has none installed (an untracked copy of Debian's /usr/src/googletest, see README).
# `engine` runs the full-size engine benchmark and float32 parity (bench/engine_bench.py);
# `profile` prints per-kernel time and DRAM traffic of the two-pass forward at the Self-Forcing
# last chunk (ncu, which locks clocks: compare its times with each other, not with the benchmark).
# Usage: scripts/gpu_check.sh [all|test|bench|engine|profile|build]
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
OUT=${OUT:-/tmp/monarchrt-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
extra=()
[ -d .deps/googletest ] && extra+=(-DMONARCHRT_GTEST_SOURCE="$PWD/.deps/googletest")
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
[ "$arch" = 90 ] && arch=90a  # Hopper: the wgmma kernels need the arch-specific target
cmake -S . -B build-gpu -G Ninja -DMONARCHRT_CUDA=ON -DMONARCHRT_BUILD_TESTS=ON -DMONARCHRT_CUDA_ARCHS="$arch" "${extra[@]}" >"$OUT/cmake.log" 2>&1 \
  || { tail -30 "$OUT/cmake.log"; exit 1; }
cmake --build build-gpu -j "$(nproc)" >"$OUT/build.log" 2>&1 || { grep -E "error" "$OUT/build.log" | head -30; exit 1; }
status=0
if [ "$what" = all ] || [ "$what" = test ]; then
  echo "== GPU tests"
  ./build-gpu/tests/test_cuda >"$OUT/test_cuda.log" 2>&1; rc=$?
  grep -E "OK|FAILED|PASSED|Failure|Expected|Which" "$OUT/test_cuda.log" | head -40
  grep -E "rel L2" "$OUT/test_cuda.log" | grep -oE "[0-9.]+e[-+][0-9]+" | sort -g | tail -1 | sed "s/^/largest rel L2 error: /"
  [ "$rc" -eq 0 ] || status=1
  if [ "$arch" = 90a ]; then  # the portable kernels too, on this card
    MONARCHRT_NO_WGMMA=1 ./build-gpu/tests/test_cuda --gtest_filter='CudaForward.*:CudaBackward.*:CudaDense.*' \
      >"$OUT/test_cuda_portable.log" 2>&1; rc=$?
    echo "portable kernels (MONARCHRT_NO_WGMMA=1): $(grep -E "PASSED|FAILED" "$OUT/test_cuda_portable.log" | head -3 | tr '\n' ' ')"
    [ "$rc" -eq 0 ] || status=1
  fi
  # The random problems (CudaRandom, tests/random_problem.h) for eight more seeds, in parallel (the
  # fp64 reference runs on the CPU), and once on the portable kernels.
  for seed in 1 2 3 4 5 6 7 8 portable; do
    if [ $seed = portable ]; then
      env MONARCHRT_NO_WGMMA=1 MONARCHRT_TEST_SEED=9 ./build-gpu/tests/test_cuda --gtest_filter='CudaRandom.*' \
        >"$OUT/test_cuda_random_$seed.log" 2>&1 &
    else
      env MONARCHRT_TEST_SEED=$seed ./build-gpu/tests/test_cuda --gtest_filter='CudaRandom.*' \
        >"$OUT/test_cuda_random_$seed.log" 2>&1 &
    fi
  done
  wait
  for f in "$OUT"/test_cuda_random_*.log; do
    grep -qE "^\[  PASSED  \] 1 test" "$f" || { status=1; echo "FAILED: $f"; grep -A4 Failure "$f" | head -12; }
  done
  echo "random problems, 8 more seeds and the portable kernels: $(grep -lE "^\[  PASSED  \] 1 test" "$OUT"/test_cuda_random_*.log | wc -l) of 9 passed"
  ./build-gpu/tests/test_wan_cuda >"$OUT/test_wan_cuda.log" 2>&1; rc=$?
  grep -E "OK|FAILED|PASSED|Failure|Expected|Which|rel L2" "$OUT/test_wan_cuda.log" | head -40
  [ "$rc" -eq 0 ] || status=1
  # Sanitizers on a reduced set of every kernel family (SanitizerSet, PaddedStrides and the
  # 512-tile test run the Hopper cluster kernel); racecheck runs its set twice, the second time
  # with MONARCHRT_NO_CLUSTER=1 so that the older fused kernel is checked too.
  set1='*PaddedStrides*:*Wide*:*Reject*:*SanitizerSet:*TileLimit:*SingleCta*:CudaDense.*:CudaErrors.*'
  set2='*PaddedStrides*:*SanitizerSet:CudaDense.RingBufferWindow'
  for tool in memcheck synccheck racecheck racecheck_no_cluster; do
    echo "== compute-sanitizer $tool"
    if [ $tool = racecheck_no_cluster ]; then
      MONARCHRT_NO_CLUSTER=1 compute-sanitizer --tool racecheck --error-exitcode 3 ./build-gpu/tests/test_cuda \
        --gtest_filter="$set2" >"$OUT/$tool.log" 2>&1; rc=$?
    elif [ $tool = racecheck ]; then
      compute-sanitizer --tool racecheck --error-exitcode 3 ./build-gpu/tests/test_cuda --gtest_filter="$set2" \
        >"$OUT/$tool.log" 2>&1; rc=$?
    else
      compute-sanitizer --tool $tool --error-exitcode 3 ./build-gpu/tests/test_cuda --gtest_filter="$set1" \
        >"$OUT/$tool.log" 2>&1; rc=$?
    fi
    echo "$tool exit $rc"; grep -E "SUMMARY|PASSED|FAILED" "$OUT/$tool.log" | tail -3
    [ "$rc" -eq 0 ] || status=1
  done
  compute-sanitizer --tool memcheck --error-exitcode 3 ./build-gpu/tests/test_wan_cuda \
    --gtest_filter='WanCuda.RejectsWhatItCannotRun:WanCuda.RefreshWithoutOutputWritesTheSameCache:WanCuda.WindowedCacheHoldsOnlyTheWindow:WanCuda.RunCheckAgreesWithTheEngineOnEveryChunk' \
    >"$OUT/memcheck_wan.log" 2>&1; rc=$?
  echo "memcheck (engine) exit $rc"; tail -3 "$OUT/memcheck_wan.log"
  [ "$rc" -eq 0 ] || status=1
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  echo "== benchmark"
  ./build-gpu/bench/bench_cuda 2>&1 | tee "$OUT/bench.txt"
  if [ -x build-gpu/bench/bench_dsmem ]; then
    echo "== shared-memory traffic between SMs (thread-block clusters)"
    ./build-gpu/bench/bench_dsmem 2>&1 | tee "$OUT/dsmem.txt"
  fi
  echo "== dense anchors"
  python3 bench/anchors.py 2>&1 | tee "$OUT/anchors.txt"
fi
if [ "$what" = all ] || [ "$what" = engine ]; then
  echo "== engine (1.3B, random weights)"
  python3 bench/engine_bench.py --cli ./build-gpu/monarchrt --profile 2>&1 | tee "$OUT/engine.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if [ "$what" = profile ]; then
  echo "== per-kernel profile, SF chunk KV 21 frames (ncu)"
  ncu --kernel-name regex:"monarch_stage" --launch-skip 4 --launch-count 2 \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread \
    ./build-gpu/bench/bench_cuda 3 --only "KV 21 frames" 2>&1 | grep -E "monarch_stage|duration|bytes|throughput|registers" \
    | tee "$OUT/profile.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
exit $status
