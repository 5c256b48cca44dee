#!/usr/bin/env bash
# Installs what is missing, builds, and runs every CPU test twice: in a Release build (which also
# compiles the CUDA sources where nvcc exists) and in a build with AddressSanitizer and
# UndefinedBehaviorSanitizer; then builds the PyTorch op and runs its pytest suite
# (scripts/test-python.sh). GPU tests skip where there is no GPU. A run that executes no test
# fails (ctest --no-tests=error).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
jobs=$(nproc)

echo "== Release build and tests"
bash scripts/build.sh build
(cd build && ctest --no-tests=error --output-on-failure -j "$jobs")

echo "== AddressSanitizer + UndefinedBehaviorSanitizer build and tests"
bash scripts/build.sh build-asan -DCMAKE_BUILD_TYPE=Debug -DMONARCHRT_SANITIZE=ON -DMONARCHRT_CUDA=OFF
(cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --no-tests=error --output-on-failure -j "$jobs")

echo "== PyTorch op (pytest)"
bash scripts/test-python.sh
