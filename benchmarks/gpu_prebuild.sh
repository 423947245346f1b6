#!/usr/bin/env bash
# Builds our CPU kernel here for the GPU machine's image (Python 3.12, torch 2.11), into .kbuild,
# so that a device run imports it instead of spending ~45 s of device time building it
# (gpu_checks.sh points TORCH_EXTENSIONS_DIR there when .kbuild is carried). Both targets the
# image's hosts may pick are built: AVX512-VNNI (the Xeon hosts) and plain AVX2.
# Usage: PY=venv/bin/python bash benchmarks/gpu_prebuild.sh   (PY: Python 3.12 with torch 2.11.x,
# e.g. /root/.pyenv/versions/3.12.1/bin/python -m venv V && V/bin/pip install torch==2.11.0)
set -eu
PY=${PY:?set PY to a Python 3.12 with the GPU image torch, 2.11.x}
"$PY" -c 'import sys, torch
v = sys.version_info[:2]
if v != (3, 12) or not torch.__version__.startswith("2.11."):
    sys.exit(f"need Python 3.12 and torch 2.11 (the GPU image), got {v[0]}.{v[1]} and torch {torch.__version__}")'
# one folder per Python and torch: a run under another one neither imports nor overwrites these
export TORCH_EXTENSIONS_DIR=$PWD/.kbuild/$("$PY" benchmarks/kbuild_tag.py)
for target in avx512-vnni avx2; do  # one process each: a process imports one build
  PYTHONPATH=$PWD "$PY" -c "from quant import cpu_kernel; cpu_kernel._load_or_build('$target'); print('built $target')"
done
du -sh .kbuild
