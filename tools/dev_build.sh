#!/usr/bin/env bash
# Fast developer build: compiles lepton_core._C in ./build/dev and drops it into ./lepton_core/,
# so `PYTHONPATH=$PWD python -m pytest` uses it. Extra args go to cmake, e.g. -DLEPTON_MAX_ISA=avx2
# or -DLEPTON_CUDA=OFF. Uses the python on PATH (or $PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$py")" \
  -Dpybind11_DIR="$("$py" -m pybind11 --cmakedir)" "$@" >/dev/null
ninja -C build/dev
