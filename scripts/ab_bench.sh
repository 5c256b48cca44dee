#!/usr/bin/env bash
# A / B benchmark on the GPU machine: builds bench_cuda from a base source tree and from this tree
# side by side, runs them alternately (base, new, base, new, ...) and prints each shape's medians
# in one table, so that a change is compared within one call on one card (docs/perf.md).
#
# Usage: scripts/ab_bench.sh BASE_DIR [ROUNDS] [bench_cuda arguments...]
#   BASE_DIR  the base sources, e.g. made here with
#             `mkdir -p scratch/base && git archive <rev> | tar -x -C scratch/base` and sent along
#             with the working tree (the device's copy of .git may be older than the tree)
#   ROUNDS    how many times each binary runs (default 2)
#   the rest  passed to both bench_cuda runs (default: 20 --path fused)
# Environment: A_ENV / B_ENV, variables set for the base / new runs only (e.g.
# B_ENV=MONARCHRT_NO_PDL=1), and OUT for the logs (default /tmp/monarchrt-ab).
# Example: bash scripts/ab_bench.sh scratch/base 2 20 --path two-pass --only "SF chunk"
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ ! -f "$1/CMakeLists.txt" ]; then
  echo "usage: scripts/ab_bench.sh BASE_DIR [ROUNDS] [bench_cuda arguments...] (BASE_DIR must hold the sources)" >&2
  exit 2
fi
base=$1
shift
rounds=2
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then
  rounds=$1
  shift
fi
[ $# -gt 0 ] || set -- 20 --path fused
OUT=${OUT:-/tmp/monarchrt-ab}
mkdir -p "$OUT"
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
[ "$arch" = 90 ] && arch=90a
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
build() {  # source dir, log name
  (cmake -S "$1" -B "$1/build-ab" -G Ninja -DMONARCHRT_CUDA=ON -DMONARCHRT_CUDA_ARCHS="$arch" \
    -DMONARCHRT_BUILD_TESTS=OFF && cmake --build "$1/build-ab" -j "$(($(nproc) / 2))" --target bench_cuda) \
    >"$OUT/$2.log" 2>&1
}
build "$base" build_base &
build . build_new &
fail=0
for job in $(jobs -p); do wait "$job" || fail=1; done
if [ "$fail" -ne 0 ]; then
  tail -20 "$OUT/build_base.log" "$OUT/build_new.log"
  exit 1
fi
for r in $(seq 1 "$rounds"); do
  env ${A_ENV:-} "$base/build-ab/bench/bench_cuda" "$@" >"$OUT/base_$r.txt" 2>&1 || { cat "$OUT/base_$r.txt"; exit 1; }
  env ${B_ENV:-} ./build-ab/bench/bench_cuda "$@" >"$OUT/new_$r.txt" 2>&1 || { cat "$OUT/new_$r.txt"; exit 1; }
done
# One row per (shape, path): the median column (the 4th field from the end of each result line)
# of every run, base runs first.
files=()
for r in $(seq 1 "$rounds"); do files+=("$OUT/base_$r.txt"); done
for r in $(seq 1 "$rounds"); do files+=("$OUT/new_$r.txt"); done
awk -v n="${#files[@]}" -v rounds="$rounds" '
  FNR == 1 { f++ }
  NF >= 7 && $(NF - 4) ~ /^[0-9.]+$/ && $(NF - 3) ~ /^[0-9.]+$/ {
    key = ""
    for (i = 1; i <= NF - 5; i++) key = key (i > 1 ? " " : "") $i
    if (!(key in seen)) { seen[key] = 1; order[++k] = key }
    med[key, f] = $(NF - 3)
  }
  END {
    printf "%-38s", "shape / path (median ms)"
    for (i = 1; i <= n; i++) printf " %8s", (i <= rounds ? "base" : "new") ((i - 1) % rounds + 1)
    printf "\n"
    for (j = 1; j <= k; j++) {
      printf "%-38s", order[j]
      for (i = 1; i <= n; i++) printf " %8s", ((order[j], i) in med ? med[order[j], i] : "-")
      printf "\n"
    }
  }' "${files[@]}"
