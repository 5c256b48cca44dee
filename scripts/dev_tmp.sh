#!/usr/bin/env bash
# temporary device script (session 7): final verification, bench, engine
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
extra=(-DMONARCHRT_GTEST_SOURCE="$PWD/.deps/googletest")
t0=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DMONARCHRT_CUDA=ON -DMONARCHRT_CUDA_ARCHS=90a "${extra[@]}" > $OUT/cmake.log 2>&1
cmake --build build-gpu -j 16 > $OUT/build.log 2>&1 || { grep -E "error" $OUT/build.log | head; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
{
./build-gpu/tests/test_cuda > $OUT/t1.log 2>&1; echo "test_cuda rc $? $(grep -E '^\[  (PASSED|FAILED) ' $OUT/t1.log | tr '\n' ' ')"
grep -E "^\[  FAILED  \]" $OUT/t1.log | head
grep -E "rel L2" $OUT/t1.log | awk '{print $NF}' | sort -g | tail -1 | sed 's/^/largest rel L2: /'
MONARCHRT_NO_WGMMA=1 ./build-gpu/tests/test_cuda --gtest_filter='CudaForward.*:CudaBackward.*:CudaDense.*' > $OUT/t2.log 2>&1; echo "portable rc $? $(grep -E '^\[  (PASSED|FAILED) ' $OUT/t2.log | tr '\n' ' ')"
./build-gpu/tests/test_wan_cuda > $OUT/t3.log 2>&1; echo "test_wan_cuda rc $? $(grep -E '^\[  (PASSED|FAILED) ' $OUT/t3.log | tr '\n' ' ')"
compute-sanitizer --tool memcheck --error-exitcode 3 ./build-gpu/tests/test_cuda --gtest_filter='*PaddedStrides*:*Wide*:*Reject*:CudaBackward.SanitizerSet:CudaForward.Several*:CudaForward.RingBuffer*' > $OUT/memcheck.log 2>&1; echo "memcheck rc $? $(tail -1 $OUT/memcheck.log)"
compute-sanitizer --tool racecheck --error-exitcode 3 ./build-gpu/tests/test_cuda --gtest_filter='*PaddedStrides*:CudaForward.Several*' > $OUT/racecheck.log 2>&1; echo "racecheck rc $? $(tail -1 $OUT/racecheck.log)"
} > $OUT/summary.txt 2>&1
cat $OUT/summary.txt
echo "-- bench"; ./build-gpu/bench/bench_cuda 30 --only "SF chunk" 2>&1 | grep -E "^(SF|full|bwd)" | grep two-pass
echo "== engine"
python3 bench/engine_bench.py --cli build-gpu/monarchrt --attention monarch --skip-eager --skip-parity 2>&1 | tail -4
echo "total $(( $(date +%s) - t0 )) s"
