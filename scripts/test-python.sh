#!/usr/bin/env bash
# Installs the PyTorch op and runs its tests (pytest). Uses the torch of the current Python when
# it has one (the GPU machine's torch 2.11), else creates .venv with torch 2.11 from PyPI. The CUDA
# tests run where a GPU is visible and skip elsewhere. pytest fails when no test runs.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ! "$python" -c "import torch" >/dev/null 2>&1; then
  if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv with torch 2.11 from PyPI"
    "$python" -m venv .venv
  fi
  python=$PWD/.venv/bin/python
  "$python" -c "import torch" >/dev/null 2>&1 || "$python" -m pip install -q "torch==2.11.*" numpy
fi
missing=()
for mod in pytest setuptools wheel; do "$python" -c "import $mod" >/dev/null 2>&1 || missing+=("$mod"); done
command -v ninja >/dev/null 2>&1 || "$python" -c "import ninja" >/dev/null 2>&1 || missing+=(ninja)
[ ${#missing[@]} -eq 0 ] || "$python" -m pip install -q "${missing[@]}"
echo "== building the extension ($("$python" -c 'import torch; print("torch", torch.__version__)'))"
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$python" -m pip install -q --no-build-isolation . 2>&1 | tail -20
echo "== pytest"
cd python/tests && "$python" -m pytest -q -rs .
