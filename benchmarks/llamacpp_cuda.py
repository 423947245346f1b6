"""llama.cpp's CUDA tools built on a machine without a GPU, to run on the GPU machine.

A device session has about 15 minutes; building llama.cpp's CUDA backend there takes several of
them. So the tools are built here once, portable, and travel as one tarball:
- for one CUDA architecture (H100/H200: 90), against the CUDA toolkit on this machine;
- the CPU backend as loadable variants (no -march=native; GGML_CPU_ALL_VARIANTS with
  GGML_BACKEND_DL, as llama.cpp's own release builds do): the variant that the GPU host's CPU
  runs best is picked there at start, so `-ot exps=CPU` measures llama.cpp at its best there;
- where this toolkit lacks cuBLAS, its headers and libraries from the nvidia-cublas wheel a CUDA
  build of torch installs (`cublas_dir`); where there is no driver library (no GPU here), a stub
  that only names libcuda.so.1, the library the GPU machine's driver provides.
On the GPU machine `runtime_env` finds cuBLAS again (a toolkit's, or torch's wheels') and
`check` says whether the tools see a CUDA device; where not, gpu_vs_llamacpp.py builds there.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import llamacpp

TARGETS = ("llama-bench", "llama-quantize")
OFF = ("LLAMA_CURL", "LLAMA_OPENSSL", "LLAMA_BUILD_TESTS", "LLAMA_BUILD_SERVER")
TOOLKIT_LIBS = (Path("/usr/local/cuda/lib64"), Path("/usr/local/cuda/targets/x86_64-linux/lib"))


def _has(d: Path, pattern: str) -> bool:
    return d.is_dir() and any(d.glob(pattern))


def _wheel_dirs() -> list[Path]:
    """The nvidia wheels' directories (nvidia/<pkg or cu13>/) of this Python, if any."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return [d for loc in spec.submodule_search_locations for d in sorted(Path(loc).iterdir()) if d.is_dir()]


def cublas_dir() -> Path | None:
    """A directory with include/cublas_v2.h and lib/libcublas.so.*: the toolkit's when it has
    cuBLAS (None: CMake finds it), else the nvidia wheel's."""
    if any(_has(d, "libcublas.so*") for d in TOOLKIT_LIBS):
        return None
    for d in _wheel_dirs():
        if (d / "include" / "cublas_v2.h").exists() and _has(d / "lib", "libcublas.so.*"):
            return d
    raise SystemExit("no cuBLAS here: install a CUDA build of torch (its nvidia-cublas wheel) or the toolkit's cuBLAS")


def _driver_stub(work: Path) -> Path | None:
    """A stub libcuda.so (soname libcuda.so.1, no symbols) to link against where no driver library
    is installed; None where one is."""
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    found = subprocess.run([ldconfig, "-p"], capture_output=True, text=True).stdout if Path(ldconfig).exists() else ""
    if "libcuda.so" in found or any(_has(d, "stubs/libcuda.so") for d in TOOLKIT_LIBS):
        return None
    work.mkdir(parents=True, exist_ok=True)
    (work / "empty.c").write_text("")
    stub = work / "libcuda.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(stub), str(work / "empty.c"), "-Wl,-soname,libcuda.so.1"],
                   check=True)  # fmt: skip
    return stub


def build(cache: Path, arch: str, log=print) -> Path:
    """llama-bench and llama-quantize with CUDA for `arch`, portable (above); the bin directory."""
    src = llamacpp.ensure_source(cache, log)
    build_dir = (src / f"build-cuda{arch}-portable").resolve()  # ninja runs in it: absolute paths only
    bin_dir = build_dir / "bin"
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=ON", "-DGGML_BACKEND_DL=ON",
             "-DGGML_CPU_ALL_VARIANTS=ON", "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON", "-DGGML_CUDA=ON",
             f"-DCMAKE_CUDA_ARCHITECTURES={arch}", "-DGGML_CUDA_NCCL=OFF",
             *(f"-D{n}=OFF" for n in OFF)]  # fmt: skip
    cublas = cublas_dir()
    if cublas is not None:  # only cuBLAS's own headers: the wheel's others may differ from the toolkit's
        inc = build_dir / "cublas-include"
        inc.mkdir(parents=True, exist_ok=True)
        for h in (cublas / "include").glob("cublas*.h"):
            if not (inc / h.name).exists():
                (inc / h.name).symlink_to(h)
        lib = {name: next((cublas / "lib").glob(f"lib{name}.so.*")) for name in ("cublas", "cublasLt")}
        flags += [f"-DCUDA_cublas_LIBRARY={lib['cublas']}", f"-DCUDA_cublasLt_LIBRARY={lib['cublasLt']}",
                  f"-DCMAKE_CUDA_FLAGS=-I{inc}", f"-DCMAKE_CXX_FLAGS=-I{inc}"]  # fmt: skip
    stub = _driver_stub(build_dir / "driver-stub")
    if stub is not None:  # kept as needed although the stub defines nothing: the driver defines them there
        flags += [f"-DCUDA_cuda_driver_LIBRARY={stub}", "-DCMAKE_MODULE_LINKER_FLAGS=-Wl,--no-as-needed"]
    log(f"building llama.cpp's portable CUDA {arch} tools in {build_dir} (long on few cores)")
    _run(["cmake", "-S", str(src), "-B", str(build_dir), "-G", "Ninja", *flags])
    _run(["ninja", "-C", str(build_dir), *(f"bin/{t}" for t in TARGETS), "bin/libggml-cuda.so"])
    return bin_dir


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")


def pack(bin_dir: Path, out: Path) -> Path:
    """The tools and every library beside them as one .tar.xz (links kept)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w:xz") as tar:
        for p in sorted(bin_dir.iterdir()):
            if p.name in TARGETS or ".so" in p.name:
                tar.add(p, arcname=f"bin/{p.name}")
    os.replace(tmp, out)
    return out


def unpack(tarball: Path, work: Path) -> Path:
    dest = work / "llama.cpp-prebuilt"
    if not (dest / "bin" / "llama-bench").exists():
        shutil.rmtree(dest, ignore_errors=True)
        with tarfile.open(tarball) as tar:
            tar.extractall(dest, filter="data")
    return dest / "bin"


def runtime_env(bin_dir: Path) -> dict[str, str]:
    """The environment the prebuilt tools run in: their own directory and cuBLAS's on the
    library path (a toolkit's, or the nvidia wheels' of this Python's torch)."""
    dirs = [str(bin_dir)]
    dirs += [str(d) for d in TOOLKIT_LIBS if _has(d, "libcublas.so*")]
    dirs += [str(d / "lib") for d in _wheel_dirs() if _has(d / "lib", "libcublas.so*")]
    old = os.environ.get("LD_LIBRARY_PATH")
    return {**os.environ, "LD_LIBRARY_PATH": ":".join(dirs + ([old] if old else []))}


def check(bin_dir: Path, env: dict[str, str]) -> str | None:
    """None where llama-bench runs and lists a CUDA device, else why not (one line)."""
    try:
        r = subprocess.run([str(bin_dir / "llama-bench"), "--list-devices"], env=env, capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"llama-bench does not start: {e}"
    if r.returncode != 0 or "CUDA0" not in r.stdout + r.stderr:
        return f"no CUDA device listed (rc {r.returncode}): {(r.stdout + r.stderr)[-300:]!r}"
    return None
