"""llama.cpp as a peer on this machine: built from the source the llama-cpp-python sdist vendors.

Nothing here is committed llama.cpp code: `build` downloads the sdist from the package registry
(`pip download --no-binary :all:`), unpacks its `vendor/llama.cpp` under benchmarks/.cache/ and
builds the CPU tools with CMake and the system compiler (no network during the build).
`convert` runs llama.cpp's own `convert_hf_to_gguf.py` on a Hugging Face checkpoint; a made-up
tokenizer has no pre-tokenizer hash llama.cpp knows, so the converter is told its name (our test
tokenizers split like GPT-2). `bench` runs `llama-bench` and returns its JSON records.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp is the peer measured
TOOLS = ("llama-bench", "llama-quantize", "llama-imatrix")


def source_dir(cache: Path, version: str = VERSION) -> Path:
    return cache / f"llama.cpp-{version}"


AVX2_ONLY = ("GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2")  # what an AVX2-only x86 has
# An AMX Xeon's instructions less AMX: where ggml's AMX backend dies (no_amx)
AVX512_NO_AMX = (*AVX2_ONLY, "GGML_AVX_VNNI", "GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16")


def ensure_source(cache: Path, log=print, version: str = VERSION) -> Path:
    """The vendored llama.cpp source under `cache`, downloaded (the sdist) if it is not there."""
    src = source_dir(cache, version)
    if (src / "CMakeLists.txt").exists():
        return src
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        log(f"downloading the llama-cpp-python {version} sdist")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q",
             f"llama-cpp-python=={version}", "-d", tmp],
            check=True,
        )  # fmt: skip
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(src, members=[m for m in members if m.name], filter="data")
    return src


def build(
    cache: Path, version: str = VERSION, log=print, cuda_arch: str | None = None, avx2: bool = False,
    no_amx: bool = False,
) -> Path:  # fmt: skip
    """The directory holding llama-bench, llama-quantize and llama-imatrix, building them if needed.
    With `cuda_arch` (e.g. "90"), a CUDA build for that architecture alone, in build-cuda/.
    `avx2`: llama-bench and llama-quantize built for AVX2 alone (no AVX-512, not -march=native),
    in build-avx2/: the peer of our side held to AVX2 (bench_vs_llamacpp.py --avx2). `no_amx`:
    llama-bench and llama-quantize for an AMX Xeon's AVX-512 (VNNI, BF16, VBMI) without AMX, in
    build-noamx/: the peer where the native build's AMX backend dies (runs_here)."""
    src = source_dir(cache, version)
    build_dir = src / ("build-cuda" if cuda_arch else "build-avx2" if avx2 else "build-noamx" if no_amx else "build")
    bin_dir = build_dir / "bin"
    tools = TOOLS[:2] if cuda_arch or avx2 or no_amx else TOOLS
    if all((bin_dir / t).exists() for t in tools):
        return bin_dir
    ensure_source(cache, log, version)
    kind = "CUDA" if cuda_arch else "AVX2" if avx2 else "AVX-512 (no AMX)" if no_amx else "CPU"
    log(f"building llama.cpp's {kind} tools in {build_dir} (a few minutes)")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    off = ("BUILD_SHARED_LIBS", "LLAMA_CURL", "LLAMA_OPENSSL", "LLAMA_BUILD_TESTS", "LLAMA_BUILD_SERVER")
    native = "OFF" if avx2 or no_amx else "ON"
    flags = ["-DCMAKE_BUILD_TYPE=Release", f"-DGGML_NATIVE={native}", *(f"-D{n}=OFF" for n in off)]
    if avx2 or no_amx:
        flags += [f"-D{name}=ON" for name in (AVX2_ONLY if avx2 else AVX512_NO_AMX)]
    if cuda_arch:
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}", "-DGGML_CUDA_NCCL=OFF"]
    quiet = {"stdout": subprocess.DEVNULL}
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), *gen, *flags], check=True, **quiet)
    jobs = str(os.cpu_count() or 2)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", *tools, "-j", jobs], check=True, **quiet)
    return bin_dir


SOURCE_PARTS = ("CMakeLists.txt", "cmake", "ggml", "src", "include", "common", "tools", "examples", "pocs", "app",
                "vendor", "gguf-py", "conversion", "convert_hf_to_gguf.py", "licenses", "LICENSE")  # fmt: skip


def pack_source(cache: Path, out: Path, version: str = VERSION) -> Path:
    """The parts of the vendored llama.cpp source that build its tools and convert checkpoints,
    as one .tar.xz (about 10 MB: small enough to travel to a machine that cannot download it)."""
    src = source_dir(cache, version)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:xz") as tar:
        for part in SOURCE_PARTS:
            if (src / part).exists():
                tar.add(src / part, arcname=part, filter=lambda m: None if "__pycache__" in m.name else m)
    return out


def unpack_source(tarball: Path, cache: Path, version: str = VERSION) -> Path:
    src = source_dir(cache, version)
    if not (src / "CMakeLists.txt").exists():
        src.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarball) as tar:
            tar.extractall(src, filter="data")
    return src


_CONVERT = """
import sys
sys.path[:0] = [{src!r}, {gguf!r}]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}
sys.argv = ["convert_hf_to_gguf.py", {model!r}, "--outtype", "f16", "--outfile", {out!r}]
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def convert(cache: Path, model: Path, out: Path, pre: str = "gpt-2", version: str = VERSION) -> float:
    """HF checkpoint -> F16 GGUF with llama.cpp's converter; seconds taken."""
    src = source_dir(cache, version)
    code = _CONVERT.format(src=str(src), gguf=str(src / "gguf-py"), pre=pre, model=str(model), out=str(out) + ".tmp")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.replace(str(out) + ".tmp", out)
    return time.perf_counter() - t0


def imatrix(bin_dir: Path, f16: Path, text: Path, out: Path, threads: int, tokens: int, chunk: int = 512) -> float:
    """llama-imatrix: the importance matrix of F16 over the first `tokens` tokens of `text`, in
    chunks of `chunk` (as our calibration cuts its windows); seconds taken."""
    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp.gguf")
    cmd = [str(bin_dir / "llama-imatrix"), "-m", str(f16), "-f", str(text), "-o", str(tmp), "-c", str(chunk),
           "--chunks", str(max(1, tokens // chunk)), "-t", str(threads), "--no-ppl"]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.replace(tmp, out)
    return time.perf_counter() - t0


def quantize(
    bin_dir: Path, f16: Path, out: Path, kind: str, threads: int, imatrix: Path | None = None, env=None
) -> float:
    """llama-quantize F16 -> kind (Q4_0, Q4_K_M, ...), with an importance matrix if given, in `env`
    (None: this process's); seconds taken."""
    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    extra = ["--imatrix", str(imatrix)] if imatrix else []
    cmd = [str(bin_dir / "llama-quantize"), *extra, str(f16), str(tmp), kind, str(threads)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    os.replace(tmp, out)
    return time.perf_counter() - t0


def bench(
    bin_dir: Path, gguf: Path, threads: int, prompt: int, gen: int, reps: int = 1, depth: int = 0,
    extra: tuple[str, ...] = (), env=None,
) -> dict[str, float]:  # fmt: skip
    """llama-bench's tok/s: {"prefill": pp<prompt>, "decode": tg<gen>}, each after `depth` tokens
    already in the context (`-d`); `extra` arguments (e.g. -ngl 99), in `env` (None: this process's)."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", str(prompt), "-n", str(gen), "-t", str(threads),
           "-r", str(reps), "-d", str(depth), "-o", "json", *extra]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    result = {}
    for rec in json.loads(out):
        result["prefill" if rec["n_gen"] == 0 else "decode"] = rec["avg_ts"]
    return result


def runs_here(bin_dir: Path, gguf: Path) -> bool:
    """Whether llama-bench gets through a short run of `gguf` here (a few seconds). The native
    build's AMX backend (repacked Q4 weights in AMX tiles) died with SIGSEGV in
    ggml_backend_amx_mul_mat on a 2-vCPU Xeon VM with AMX for every quantized GGUF of the slice
    (2026-12-07; llama.cpp issue 20824 reports the same crash, machine-dependent)."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", "8", "-n", "1", "-t", "1", "-r", "1", "-o", "json"]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def gguf_py(src: Path):
    """The gguf-py package that llama.cpp's source vendors (its GGUFReader, quants)."""
    path = str(src / "gguf-py")
    if path not in sys.path:
        sys.path.insert(0, path)
    import gguf
    import gguf.quants

    return gguf


def decode_bytes(gguf: Path, top_k: int, experts: int, version_src: Path) -> int:
    """Bytes of weights one decode token reads from a GGUF file: all tensors but the unchosen
    experts (top_k of `experts` per MoE tensor) and the embedding table (one row)."""
    total = 0
    for t in gguf_py(version_src).GGUFReader(str(gguf)).tensors:
        n = int(t.n_bytes)
        if t.name == "token_embd.weight":
            n //= int(t.shape[-1])  # rows are the last dimension in GGUF's order
        elif "_exps" in t.name:
            n = n * top_k // experts
        total += n
    return total
