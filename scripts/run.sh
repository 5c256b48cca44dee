#!/usr/bin/env bash
# The main job: installs what is missing, builds, and runs `monarchrt analyze` on its built-in
# synthetic video-attention workload (extra arguments are passed to it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh build >/dev/null
./build/monarchrt analyze "$@"
