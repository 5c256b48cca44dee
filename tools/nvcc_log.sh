#!/usr/bin/env bash
# CUDA compiler launcher of the monarchrt library (CMakeLists.txt): runs the compile command it is
# given and keeps the compiler's messages, among them ptxas's report of every kernel (-Xptxas=-v),
# in LOGDIR/<object path>.log, which the test ptxas_hopper_kernels (tests/check_ptxas.cmake)
# reads. The messages are also passed on to the build's output as usual.
# Usage: nvcc_log.sh LOGDIR COMMAND [ARGS...]
set -uo pipefail
logdir=$1
shift
obj=unknown
prev=
for a in "$@"; do
  [ "$prev" = "-o" ] && obj=$a
  prev=$a
done
mkdir -p "$logdir"
log="$logdir/$(printf %s "$obj" | tr / _).log"  # the object path, / as _
"$@" 2>"$log.tmp"
rc=$?
cat "$log.tmp" >&2
mv -f "$log.tmp" "$log"
exit $rc
