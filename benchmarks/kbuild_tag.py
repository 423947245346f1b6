"""The folder name under .kbuild for this Python and torch (benchmarks/gpu_prebuild.sh, gpu_checks.sh)."""

import sys

import torch

print(f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}")
