"""The CPU paths of an AVX2-only CPU (CI's reference kind, and the CPU speed issue's), checked on
any x86 CPU: the test files whose paths depend on the instructions run again in a process held to
AVX2 (quant.cpu_kernel.AVX2_HOLD: our kernels without VNNI or bf16 GEMMs, oneDNN, MKL and ATen
capped). Five int8-forward tests once failed only there (oneDNN's AVX2 int8 products saturate:
quant/int8_forward.py), unseen while every session ran on AVX-512 machines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from quant import cpu_kernel

FILES = [
    "tests/test_int8_forward.py",
    "tests/test_quant_kernels.py",
    "tests/test_int4_gemm.py",
    "tests/test_q6_head.py",
    "tests/test_gptq.py",
    "tests/test_cpu_decode.py",
]


def test_instruction_dependent_files_pass_held_to_avx2(tmp_path):
    if not cpu_kernel.available():
        pytest.skip("no AVX2 kernel here")
    if cpu_kernel.isa() == "avx2" and not cpu_kernel.native_bf16():
        pytest.skip("this CPU runs the AVX2 paths already: the suite itself covered them")
    root = Path(__file__).resolve().parent.parent
    # its own inductor cache: kernels compiled for this CPU's vector width must not be reused
    env = {**os.environ, **cpu_kernel.AVX2_HOLD, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *FILES]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout.splitlines()[-1]
