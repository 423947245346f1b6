"""Our CPU kernel builds for every x86 target it picks among (quant.cpu_kernel.isa), not only for
this CPU's. A target that failed to compile would go unnoticed where no machine of its kind runs
the suite, and its users would get torch's slower kernels: a failed build falls back silently.
AVX-VNNI (Intel's Alder Lake and later desktops, Zen 5) is one such: no CI or VM kind has it. The
build is compiled, and imported where this CPU can run its module's start-up code (the AVX-512
build's own, compiled with AVX-512 allowed, stops an AVX2-only CPU with an illegal instruction:
there it is built only); what it contains is checked where objdump is present: the 256-bit VEX
vpdpbusd for AVX-VNNI, 512-bit vpdpbusd for AVX512-VNNI."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quant import cpu_kernel

ROOT = Path(__file__).resolve().parent.parent
# the target built here, and what its machine code must contain
OTHERS = {"avx-vnni": r"\{vex\} vpdpbusd .*%ymm", "avx512-vnni": r"vpdpbusd .*%zmm"}


class _Build:
    """A build in a child process, started at once: the builds of this file (one translation
    unit each, so one core each) run side by side on a CI host's two cores."""

    def __init__(self, code: str, env: dict[str, str], log: Path):
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=f, stderr=f)

    def wait(self) -> tuple[int, str]:
        rc = self.proc.wait(timeout=1200)
        return rc, self.log.read_text()[-4000:]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Every build this file checks, started together: each target this CPU is not, and this
    CPU's own with no ninja on PATH."""
    if not cpu_kernel.available():
        pytest.skip("no AVX2 kernel here (not x86, or no compiler)")
    started = {}
    for target in OTHERS:
        if target == cpu_kernel.isa():
            continue
        d = tmp_path_factory.mktemp(target)
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(d)}
        code = f"from quant import cpu_kernel; cpu_kernel._load_or_build({target!r}, opt='-O1')"  # -O1: half the time
        if target == "avx512-vnni" and "avx512f" not in cpu_kernel._cpu_flags():  # build it, do not import it
            code = (
                "import torch.utils.cpp_extension as e; e._import_module_from_library = lambda *a, **k: None\n" + code
            )
        started[target] = (_Build(code, env, d / "log"), d)
    d = tmp_path_factory.mktemp("no-ninja")
    tools = d / "bin"  # the compiler's tools alone
    tools.mkdir()
    for t in ("c++", "cc", "gcc", "g++", "as", "ld"):
        if shutil.which(t):
            (tools / t).symlink_to(shutil.which(t))
    env = {**os.environ, "PATH": str(tools), "TORCH_EXTENSIONS_DIR": str(d / "ext")}
    env.pop("LLAMA4_LOCAL_NO_AVX2_KERNEL", None)
    code = "import shutil\nfrom quant import cpu_kernel\nassert not shutil.which('ninja') and cpu_kernel.available()"
    started["no-ninja"] = (_Build(code, env, d / "log"), d)
    yield started
    for build, _ in started.values():
        build.proc.kill()


@pytest.mark.parametrize("target", sorted(OTHERS))
def test_kernel_builds_for_a_target_this_cpu_is_not(target, builds):
    if target not in builds:
        pytest.skip(f"this CPU's own target ({target}): every kernel test built and ran it")
    build, d = builds[target]
    rc, log = build.wait()
    assert rc == 0, log
    (so,) = d.glob(f"*/llama4_local_{target.replace('-', '_')}_*.so")
    if shutil.which("objdump") is None:
        return
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(so)], capture_output=True, text=True).stdout
    assert re.search(OTHERS[target], asm)


def test_a_failed_build_says_why_once_and_falls_back(tmp_path):
    """No compiler (CXX names none): one warning line with what to do, no traceback, the stock
    kernels, and `info` says why."""
    if not cpu_kernel._cpu_has_avx2_fma():
        pytest.skip("no AVX2/FMA: the kernel is never built here")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "CXX": str(tmp_path / "no-such-c++")}
    env.pop("LLAMA4_LOCAL_NO_AVX2_KERNEL", None)
    code = (
        "from quant import cpu_kernel\n"
        "from llama4_local.cli_render import machine_line\n"
        "from llama4_local.info import machine_info\n"
        "assert not cpu_kernel.available() and not cpu_kernel.available()\n"
        "print(machine_line(machine_info()))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if "warning: the CPU kernel did not build" in line]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0] and "install g++ or clang" in warnings[0]
    assert "Traceback" not in r.stderr
    assert "stock kernels (no C++ compiler" in r.stdout


def test_kernel_builds_with_no_ninja_on_path(builds):
    """An entry point run from a venv that is not activated (pipx's way) has no `ninja` on PATH:
    the build takes the one our `ninja` dependency installs."""
    rc, log = builds["no-ninja"][0].wait()
    assert rc == 0, log
