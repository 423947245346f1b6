"""The CPU kernels, compiled on first use, and their Python entry points.

The C++ lives beside this file, one module per kind, each a SOURCE string; they are compiled as
one extension: quant/kernel_common.py (what the kernels share), quant/int4_kernel.py (INT4
matrix-vector and prefill: the stored compressed-tensors bytes, no repack; with its AVX2
per-128 tiles in int4_span_kernel.py and its 512-bit ones in int4_zmm_kernel.py), quant/
matvec_kernel.py (bf16/fp16 and INT8 weights), quant/fit_kernel.py (the symmetric INT4 fit),
fp8_kernel, gptq_kernel, gram_kernel, chol_kernel (the Cholesky factors' products), attn_kernel,
glue_kernel, int8_kernel (the calibration forward's int8 roundings), int8_gemm_kernel (its int8
GEMM where torch's is a scalar loop), int8_gram_kernel (the calibration's Gram products through
it) and layer_kernel (a decoder layer's decode step in one call).

Built with torch.utils.cpp_extension on first use, for the CPU it runs on (needs a C++ compiler
and ninja): where the CPU has VNNI (AVX-VNNI, or AVX512-VNNI: Intel since Ice Lake / Alder Lake,
AMD since Zen 4), the int8 dot products take one vpdpbusd instead of maddubs + madd (`isa()`;
the same integers for the same rounded activations), and with AVX-512 the INT4 tiles at groups
of 128 or more work on 512-bit registers; at those groups activations are rounded per 128
inputs rather than 32 (`int8_span`). Where the build fails, or the CPU lacks
AVX2/FMA, `available()` is False and callers keep the stock kernel. A build is kept in torch's
extension cache (`~/.cache/torch_extensions`) under a name that carries a digest of its source
and flags (`extension_name`): a changed kernel is a new build, and any process loads a build
that is there without running ninja again.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

GROUP_MULTIPLE = 32

_BINDINGS = r"""
// Each computing kernel lets the GIL go while it runs (it touches tensors only): a server's event
// loop, in another thread, is not frozen for a prefill's products (each up to ~0.1 s).
#define NOGIL py::call_guard<py::gil_scoped_release>()
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_mv", &int4_mv, NOGIL, "INT4 matrix-vector (AVX2)");
  m.def("int4_dequant_bf16", &int4_dequant_bf16, NOGIL, "rows of INT4 weights dequantized to bf16");
  m.def("set_stream_prefetch", &set_stream_prefetch, "a decode weight stream's prefetch distance and hint");
  m.def("set_zmm_one_row", &set_zmm_one_row, "one activation row through the 512-bit INT4 tiles too");
  m.def("int4_gemm_bf16", &int4_gemm_bf16, NOGIL, "INT4 weights x many rows through bf16 GEMMs per chunk");
  m.def("int4_gemm_outer", &int4_gemm_outer, NOGIL, "INT4 weights x many rows, outer-product VNNI tiles");
  m.def("fp8_mv", &fp8_mv, NOGIL, "FP8 e4m3 weights x float32 activations (AVX2, F16C)");
  m.def("half_mv", &half_mv, NOGIL, "bf16/fp16 matrix-vector (AVX2)");
  m.def("half_vm", &half_vm, NOGIL, "vector x bf16/fp16 matrix stored [in, out] (AVX2)");
  m.def("set_half_bf16_dot", &set_half_bf16_dot, "bf16 x bf16 decode products through vdpbf16ps");
  m.def("fit_symmetric", &fit_symmetric, NOGIL, "symmetric INT4 group scales (AVX2)");
  m.def("gptq_group_scales", &gptq_group_scales, NOGIL, "GPTQ's symmetric group fit from its state");
  m.def("gptq_columns", &gptq_columns, NOGIL, "GPTQ's walk over one group's columns");
  m.def("lowrank_columns", &lowrank_columns, NOGIL, "the low-rank GPTQ feedback's column loop for one block");
  m.def("transpose_widen", &transpose_widen, NOGIL, "dst (and dst2) = src^T in float32", py::arg("src"), py::arg("dst"),
        py::arg("dst2") = py::none());
  m.def("gram_bf16", &gram_bf16, NOGIL, "x^T x in float32 sums for bf16 x (AVX512-BF16)");
  m.def("gram_f32", &gram_f32, NOGIL, "x^T x in float32 for bf16 or float32 x (AVX2 FMA)");
  m.def("int8_gram", &int8_gram, NOGIL, "x^T x of x rounded to int8 per column and group of rows");
  m.def("gemm_tn_sub", &gemm_tn_sub, NOGIL, "c -= a^T b in float32 (the Cholesky factor's products)");
  m.def("attend_one", &attend_one, NOGIL, "decode attention for one query position (AVX2)", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("parts") = 0);
  m.def("rms_norm", &rms_norm, NOGIL, "RMS norm over the last dimension, times an optional weight");
  m.def("silu_mul", &silu_mul, NOGIL, "silu(gate) * up");
  m.def("q8_quantize", &q8_quantize, NOGIL, "INT8 weights, one scale per block of 32");
  m.def("q8_mv", &q8_mv, NOGIL, "INT8 weights x int8 activations (AVX2)");
  m.def("q6_mv", &q6_mv, NOGIL, "Q6 weights x int8 activations (AVX2)");
  m.def("int8_rows", &int8_rows, NOGIL, "rows rounded to int8, one scale each");
  m.def("int8_cols", &int8_cols, NOGIL, "columns rounded to int8, one scale each");
  m.def("int8_rescale", &int8_rescale, NOGIL, "int32 products times row and column scales");
  m.def("int8_pack", &int8_pack, NOGIL, "an int8 weight [K, O] as int8_gemm's panels, and its sums");
  m.def("int8_gemm", &int8_gemm, NOGIL, "int8 activations x packed int8 weights, scaled");
  m.def("int8_gemm_add", &int8_gemm_add, NOGIL, "int8 x packed int8, scaled, added to float32");
  m.def("int8_gemm_pairs", &int8_gemm_pairs, "whether narrow activations pair int8_gemm's steps");
"""


def _cpuinfo(key: str) -> str:
    """The first CPU's `key` line of /proc/cpuinfo, its value; "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


@functools.cache
def _cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo("flags").split())


@functools.cache
def _cpu_vendor() -> str:
    """vendor_id: GenuineIntel, AuthenticAMD, or "" where it cannot be read."""
    return _cpuinfo("vendor_id")


def _cpu_has_avx2_fma() -> bool:
    return {"avx2", "fma"} <= _cpu_flags()


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16), where PyTorch's
    bf16 GEMM (oneDNN, float32 accumulation) runs 2-3x float32's and 3-6x faster than widening a
    bf16 weight to float32 per call; elsewhere it is emulated and slower than widening.
    LLAMA4_LOCAL_NO_BF16_GEMM=1 says no."""
    if os.environ.get("LLAMA4_LOCAL_NO_BF16_GEMM"):
        return False
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


# What an AVX2-only CPU (no VNNI, no bf16 arithmetic: CI's reference kind) runs, imposed on this
# one through a new process's environment: our kernels without VNNI or bf16 GEMMs, oneDNN's, MKL's
# and ATen's code paths held to AVX2. An emulation for benchmarks and tests (the cores' rates and
# caches stay this machine's); give the process its own TORCHINDUCTOR_CACHE_DIR if it compiles.
AVX2_HOLD = {
    "LLAMA4_LOCAL_NO_VNNI": "1",
    "LLAMA4_LOCAL_NO_BF16_GEMM": "1",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
}


def isa() -> str:
    """The instructions the int8-activation kernels are built with on this CPU: "avx512-vnni"
    (vpdpbusd; INT4 at groups of 128 or more in 512-bit tiles), "avx-vnni" (vpdpbusd on 256 bits)
    or "avx2" (maddubs + madd); the env var LLAMA4_LOCAL_NO_VNNI=1 keeps "avx2"."""
    if os.environ.get("LLAMA4_LOCAL_NO_VNNI"):
        return "avx2"
    flags = _cpu_flags()
    if {"avx512_vnni", "avx512vl", "avx512bw"} <= flags:
        return "avx512-vnni"
    if "avx_vnni" in flags:
        return "avx-vnni"
    return "avx2"


_ISA_FLAGS = {
    "avx2": [],
    "avx-vnni": ["-mavxvnni"],
    "avx512-vnni": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512vnni", "-mprefer-vector-width=256"],
}


_why_not: list[str] = []  # why _module() is None (its one entry, once it has been asked)


@functools.cache
def _module():
    if os.environ.get("LLAMA4_LOCAL_NO_AVX2_KERNEL"):
        _why_not.append("turned off by LLAMA4_LOCAL_NO_AVX2_KERNEL")
        return None
    if not _cpu_has_avx2_fma():
        _why_not.append("this CPU has no AVX2/FMA")
        return None
    try:
        mod = _load_or_build(isa())
    except Exception as e:  # no compiler, no ninja, a failed build: the stock kernel serves, said once
        _why_not.append(str(e) if isinstance(e, NoCompiler) else _build_failure(e))
        sys.stderr.write(
            f"llama4-local: warning: the CPU kernel did not build ({_why_not[-1]}); running on PyTorch's "
            "kernels, several times slower on the CPU (LLAMA4_LOCAL_NO_AVX2_KERNEL=1 silences this)\n"
        )
        return None
    mod.set_half_bf16_dot(half_bf16_dot_default())
    for i, stream in enumerate(STREAMS):
        ahead, hint = stream_prefetch_default(stream)
        mod.set_stream_prefetch(i, ahead, STREAM_HINTS[hint])
    return mod


class NoCompiler(RuntimeError):
    """The compiler torch's build would call (CXX, else c++) is not there: checked before building,
    so the message says what to do (and torch's multi-line compiler warning is not printed)."""


def _check_compiler() -> None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise NoCompiler(f"no C++ compiler: {cxx!r} is not on PATH; install g++ or clang, or set CXX")


def _build_failure(e: Exception) -> str:
    """One line on why the build failed."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return f"{type(e).__name__}: {first[:200]}"


def unavailable_reason() -> str | None:
    """Why the kernel is not used here (None: it is), for `info`."""
    return None if available() else _why_not[-1]


def _source() -> str:
    from . import (
        attn_kernel,
        chol_kernel,
        fit_kernel,
        fp8_kernel,
        gemm_kernel,
        glue_kernel,
        gptq_kernel,
        gram_kernel,
        int4_kernel,
        int8_gemm_kernel,
        int8_gram_kernel,
        int8_kernel,
        kernel_common,
        layer_kernel,
        matvec_kernel,
    )

    return (
        kernel_common.SOURCE
        + int4_kernel.SOURCE
        + gemm_kernel.SOURCE
        + matvec_kernel.SOURCE
        + fit_kernel.SOURCE
        + fp8_kernel.SOURCE
        + gptq_kernel.SOURCE
        + gram_kernel.SOURCE
        + chol_kernel.SOURCE
        + attn_kernel.SOURCE
        + glue_kernel.SOURCE
        + int8_kernel.SOURCE
        + int8_gemm_kernel.SOURCE
        + int8_gram_kernel.SOURCE
        + layer_kernel.SOURCE
        + _BINDINGS
        + layer_kernel.BINDINGS
        + "}\n"
    )


def extension_name(target: str, source: str, cflags: list[str]) -> str:
    """The extension's name, and so its build directory: the instruction set it targets and a
    digest of what it is built from (the C++, the flags, torch's version), so a changed source is
    a new build and an unchanged one is found again by any process, whatever its environment."""
    digest = hashlib.sha256("\0".join([source, *cflags, torch.__version__]).encode()).hexdigest()[:16]
    return f"llama4_local_{target.replace('-', '_')}_{digest}"


def _cpp_extension():
    """torch.utils.cpp_extension, imported without the warning a CUDA build of torch logs there
    when it finds a CUDA toolkit but no usable GPU ("No CUDA runtime is found", e.g. under
    CUDA_VISIBLE_DEVICES= or on a machine with nvcc and no GPU): a line on every run's stderr
    that says nothing about a CPU kernel."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _load_or_build(target: str, opt: str = "-O3"):
    """The compiled extension for `target`: imported directly where this source's build is
    already there (no ninja run: a process with another ninja on its PATH, whose build log hashes
    commands differently, would otherwise rebuild it, a minute each time), built first otherwise
    (torch's load_inline: the build directory's lock keeps concurrent builds apart). `opt`: the
    optimisation level (tests/test_kernel_targets.py builds other targets at -O1: whether they
    compile and what instructions they hold, in less time)."""
    ext = _cpp_extension()
    source = _source()
    cflags = [opt, "-mtune=native", "-mavx2", "-mfma", "-mf16c", "-fopenmp", *_ISA_FLAGS[target]]
    name = extension_name(target, source, cflags)
    build = Path(ext._get_build_directory(name, verbose=False))
    built = build / f"{name}.so"
    flock = hasattr(ext, "FileLock")  # torch 2.15 on: build_under_way
    if not flock:
        clear_stale_lock(build)
    there = built.is_file() and not build_under_way(build, flock)
    if there:
        try:
            return _import_extension(name, built)
        except ImportError:  # not loadable here: build it again
            pass
    _check_compiler()  # only now: a build that is there loads without one
    if not there:
        sys.stderr.write("llama4-local: building the INT4 CPU kernel (once, about a minute)\n")
    flags = {"extra_cflags": cflags, "extra_ldflags": ["-fopenmp"]}
    _ninja_on_path()
    return ext.load_inline(name=name, cpp_sources=[source], verbose=False, **flags)


def _ninja_on_path() -> None:
    """torch's build runs `ninja` from PATH; where it is not there (an entry point run from a venv
    that is not activated, as pipx installs them) the ninja package we depend on has one."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return  # the build says "Ninja is required": the warning passes it on
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def build_under_way(build: Path, flock: bool) -> bool:
    """Whether a process is building in `build` now: its lock file exists (torch's FileBaton,
    before 2.15), or is locked (`flock`: torch 2.15 on holds the lock with filelock, an OS
    advisory lock the kernel releases when its holder dies, on a file that stays after every
    build, so its existence says nothing)."""
    lock = build / "lock"
    if not lock.exists():
        return False
    if not flock:
        return True
    try:
        import fcntl

        fd = os.open(lock, os.O_RDONLY)
    except (ImportError, OSError):  # no fcntl, or the file gone meanwhile
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # filelock holds LOCK_EX while it builds
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # (closing releases a lock taken here)


STALE_LOCK_S = 900  # a build takes about a minute; a lock this old is a killed build's


def clear_stale_lock(build: Path) -> bool:
    """Remove the build directory's lock when its build died with it (SIGKILL, the OOM killer, a
    closed laptop: torch releases it on every other exit), else every later process waits on it
    for ever; returns whether one was removed. Only for torch's FileBaton (torch before 2.15):
    an advisory lock's file stays and is released by the kernel, and removing it while held
    would let a second build into the directory."""
    lock = build / "lock"
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
            return True
    except OSError:  # none, or gone meanwhile
        pass
    return False


def _import_extension(name: str, path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def avx512_bf16() -> bool:
    """Whether this CPU has AVX512-BF16 (vdpbf16ps) and bf16 arithmetic is not turned off
    (native_bf16: LLAMA4_LOCAL_NO_BF16_GEMM)."""
    return native_bf16() and "avx512_bf16" in _cpu_flags()


def half_bf16_dot_default() -> bool:
    """Whether half_mv / half_vm multiply bf16 activations by bf16 weights with vdpbf16ps (CPUs
    with AVX512-BF16, bf16 arithmetic not turned off) rather than widening the weights."""
    return avx512_bf16()


def set_half_bf16_dot(on: bool) -> None:
    """Turn half_mv / half_vm's vdpbf16ps path on or off (benchmarks and tests; `on` only where
    half_bf16_dot_default() would be: the instruction must exist)."""
    _module().set_half_bf16_dot(on)


def available() -> bool:
    return _module() is not None


def stored_bytes(packed: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' int32 [N, K/8] words as the uint8 [N, K/2] rows the kernel reads (a
    view: nibble i of a little-endian word is byte i // 2's low or high half)."""
    if sys.byteorder != "little":
        raise RuntimeError("the INT4 CPU kernel reads little-endian words")
    return packed.contiguous().view(torch.uint8)


def pack_scales(scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """Per row and group, scale s and offset o (w = s * (u - 8) + o) -> float32 [N, 2, G]: the G
    scales, then the G constants o - 8 s; with no offset (symmetric), [N, 1, G]: the scales, and
    bf16 scales (what checkpoints store) stay bf16, a view of the stored tensor: the kernel widens
    them exactly, and a decode reads 2 bytes per group instead of 4 (4.125 bits per weight at
    group 128, not 4.25)."""
    if offset is None and scale.dtype == torch.bfloat16:
        return scale.contiguous().unsqueeze(1)
    s = scale.float()
    if offset is None:
        return s.unsqueeze(1).contiguous()
    return torch.stack([s, offset.float() - 8 * s], dim=1).contiguous()


def int4_mv(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int, int8_activations: bool = False
) -> torch.Tensor:
    """x [T, K] -> [T, N] in x's dtype (more than a few rows: a few at a time over cache-sized
    blocks of weight rows); with int8_activations, x is first rounded to int8 per
    int8_span(group_size) inputs (one float scale each) and the dot products run on integers."""
    return _module().int4_mv(x.contiguous(), packed, scales, group_size, int8_activations)


# The bf16 GEMM path (quant/gemm_kernel.py): rows of weights dequantized per chunk, about this
# many bytes of bf16 (a chunk stays in the last-level cache while the GEMM reads it).
GEMM_CHUNK_BYTES = 8 << 20
AMX_GEMM_ROWS = 32  # from this many activation rows where the CPU has AMX (docs/benchmarks.md)
# ... and where it has AVX512-BF16 but no AMX (Zen 4): the GEMM against the integer kernel at
# 8192 x 5120, two threads, 0.94x at 32 rows, 1.05x at 64, 1.26x at 512; a slice prefill of 512
# tokens +12-17% (session 26).
AVX512_BF16_GEMM_ROWS = 64


def int4_dequant_bf16(packed: torch.Tensor, scales: torch.Tensor, group_size: int, n0: int = 0, n1=None):
    """Rows n0..n1 of int4_mv's weights dequantized to bf16 [n1 - n0, K] (w = s u + c in float32,
    rounded to nearest even)."""
    return _module().int4_dequant_bf16(packed, scales, group_size, n0, packed.shape[0] if n1 is None else n1)


def int4_gemm_bf16(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int, chunk_bytes=None):
    """x [T, K] @ W^T in x's dtype for int4_mv's weights: W dequantized to bf16 a chunk of rows at
    a time (`chunk_bytes`, default GEMM_CHUNK_BYTES), each chunk one bf16 GEMM (float32 sums)."""
    rows = max(16, (chunk_bytes or GEMM_CHUNK_BYTES) // (2 * x.shape[1]) // 16 * 16)
    return _module().int4_gemm_bf16(x, packed, scales, group_size, rows)


def outer_available() -> bool:
    """Whether the outer-product INT4 tiles (quant/int4_outer_kernel.py) are built here: AVX-512
    VNNI builds."""
    return available() and isa() == "avx512-vnni"


def int4_gemm_outer(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [T, K] times INT4 weights [N, K] (the stored bytes and int4_mv's scales) through the
    outer-product VNNI tiles: groups of 128, N a multiple of 32; activations rounded per 128 as
    int4_mv rounds them there (quant/int4_outer_kernel.py; when: outer_rows)."""
    return _module().int4_gemm_outer(x, packed, scales, group_size)


def set_zmm_one_row(on: bool) -> None:
    """Decode's single activation row through the 512-bit INT4 tiles as prefill's rows (AVX-512
    VNNI builds; elsewhere nothing changes). Off by default: slower on Zen 4/5 (int4_kernel.py);
    for benchmarks on other CPUs (bench_cpu_threads.py)."""
    _module().set_zmm_one_row(on)


# The decode weight streams' prefetch hints, as int4_kernel.py numbers them, and the streams: the
# INT4 weights' and the lm_head's Q6 blocks'.
STREAM_HINTS = {"t0": 0, "t1": 1, "t2": 2, "nta": 3}
STREAMS = ("int4", "q6")


def stream_prefetch_default(stream: str = "int4") -> tuple[int, str]:
    """How far ahead (bytes) and with which hint (STREAM_HINTS) a decode weight stream prefetches
    on this CPU. Intel: 4096 bytes, T1 (into L2), both streams: on a 2-vCPU Xeon VM with AMX
    (weights in 2 MB pages) the INT4 stream read 6.7 GB/s on one core and 13 on two with NTA (into
    L1, past L2), 14.2 and 25 with T0, 14.8 and 27.5 with T1 (4096 to 8192 bytes ahead within 2%),
    and the Q6 head 14.6 / 28.8 with 2048:t0 (its setting before), 7.1 / 13.9 with 2048:nta, 15.4 /
    30.2 with 4096:t1 (bench_cpu_threads.py and bench_lm_head.py --stream-prefetch; 2026-12-08).
    Elsewhere (AMD) 2048 bytes, NTA for the INT4 stream (tuned on Zen 4), T0 for the head."""
    if _cpu_vendor() == "GenuineIntel":
        return 4096, "t1"
    return 2048, "nta" if stream == "int4" else "t0"


def set_stream_prefetch(ahead: int | None = None, hint: str | None = None, stream: str = "int4") -> None:
    """How far ahead (bytes, a multiple of 64) and with which hint ("t0", "t1", "t2" or "nta") a
    decode weight stream (STREAMS: the INT4 weights', or "q6": the lm_head's) prefetches; None:
    this CPU's default (stream_prefetch_default). For benchmarks (bench_cpu_threads.py,
    bench_lm_head.py --stream-prefetch) and tests."""
    default = stream_prefetch_default(stream)
    hint = default[1] if hint is None else hint
    if hint not in STREAM_HINTS:
        raise ValueError(f"prefetch hint {hint!r}: one of {', '.join(STREAM_HINTS)}")
    ahead = default[0] if ahead is None else ahead
    _module().set_stream_prefetch(STREAMS.index(stream), ahead, STREAM_HINTS[hint])


def has_amx() -> bool:
    return {"amx_tile", "amx_bf16"} <= _cpu_flags()


@functools.cache
def bf16_gemm_rows() -> int:
    """From how many activation rows a bf16 or fp16 run's INT4 product on the CPU goes through
    int4_gemm_bf16 instead of int4_mv's integer dot products; 0: never. By default AMX_GEMM_ROWS
    where the CPU has AMX; never where the outer-product tiles take many rows (outer_rows);
    AVX512_BF16_GEMM_ROWS where it has AVX512-BF16 otherwise (bf16 GEMMs not turned off), else
    never; LLAMA4_LOCAL_INT4_BF16_GEMM=N sets it (0: never)."""
    v = os.environ.get("LLAMA4_LOCAL_INT4_BF16_GEMM", "auto")
    if v == "auto":
        if not native_bf16():
            return 0
        if has_amx():
            return AMX_GEMM_ROWS
        if outer_available():  # the outer-product tiles take many rows there (outer_rows)
            return 0
        return AVX512_BF16_GEMM_ROWS if avx512_bf16() else 0
    if not v.isdigit():
        from llama4_local.errors import UserError

        raise UserError(f"LLAMA4_LOCAL_INT4_BF16_GEMM must be auto or a row count (0: never), not {v!r}")
    return int(v)


# From this many rows, on AVX-512 VNNI builds without AMX, a bf16/fp16 run's INT4 products at
# groups of 128 take the outer-product tiles: two Zen 4 threads at 16384 x 5120 / 5120 x 8192,
# against the better of int4_mv's tiles and the bf16 GEMM path, 0.96-1.07x at 16 rows, 1.11-1.33x
# at 32, 1.39-1.42x at 64, 1.61-1.63x at 128, 1.64-1.67x at 512 (docs/benchmarks.md).
OUTER_ROWS = 32
# ... and on AMX CPUs, below the bf16 GEMM's AMX_GEMM_ROWS: on two threads of an AMX Xeon VM
# (T0 prefetch, 8192 x 5120 matrices) the tiles against int4_mv 0.92-0.95x at 8 rows, 0.97-1.01x
# at 10, 1.17x at 12, 1.29-1.46x at 16, 1.06-1.27x at 20-28 (and 0.6-0.8 of the GEMM's time
# there), even with the GEMM at 32 (bench_cpu_threads.py --crossover, 2026-12-08).
AMX_OUTER_ROWS = 12


@functools.cache
def outer_rows() -> int:
    """From how many activation rows a bf16 or fp16 run's INT4 product (groups of 128, weight
    rows a multiple of 32) goes through int4_gemm_outer instead of int4_mv; 0: never. By default
    on AVX-512 VNNI builds OUTER_ROWS, or AMX_OUTER_ROWS with AMX (where the bf16 GEMM path takes
    AMX_GEMM_ROWS and more), else never; LLAMA4_LOCAL_INT4_OUTER=N sets it (0: never). The bf16
    GEMM path, where bf16_gemm_rows() asks for it, goes first."""
    v = os.environ.get("LLAMA4_LOCAL_INT4_OUTER", "auto")
    if v == "auto":
        if not outer_available():
            return 0
        return AMX_OUTER_ROWS if has_amx() else OUTER_ROWS
    if not v.isdigit():
        from llama4_local.errors import UserError

        raise UserError(f"LLAMA4_LOCAL_INT4_OUTER must be auto or a row count (0: never), not {v!r}")
    return int(v) if outer_available() else 0


HALF_MAX_ROWS = 4


Q8_MAX_ROWS = 4
FP8_MAX_ROWS = 4


def q8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (K % 32 == 0) -> (int8 [N, K], float32 scales [N, K/32]): symmetric, per block of 32."""
    q, s = _module().q8_quantize(w.contiguous())
    return q, s


def q8_mv(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [T, K] (T <= 4) @ dequant(q, s)^T with x rounded to int8 per block of 32; x's dtype."""
    return _module().q8_mv(x.contiguous(), q, s)


def q6_mv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, K] (T <= 4) @ W^T for W packed as quant/q6.py's uint8 [N, K/32 * 26], x rounded to
    int8 per block of 32; x's dtype."""
    return _module().q6_mv(x.contiguous(), w)


def fit_symmetric(w: torch.Tensor, group_size: int, ratios: list[float], iters: int) -> torch.Tensor:
    """The symmetric INT4 fit's group scales [O, G] (float32) for w [O, K], as quant.int4's (w may
    be the transpose of a row-major [K, O], its rows padded or not: no copy then)."""
    w = w.float()
    if not (w.stride(0) == 1 and w.stride(1) >= w.shape[0] > 1):  # a transposed [K, O] is read as it is
        w = w.contiguous()
    return _module().fit_symmetric(w, group_size, [float(r) for r in ratios], iters)


def gptq_group_scales(w, e, lower, ratios: list[float], iters: int) -> torch.Tensor:
    """The symmetric INT4 fit's scales [O] for one group of GPTQ's walk, fitted to its columns as
    GPTQ's update leaves them (quant/fit_kernel.py): w, e [g, O] the state and the original
    columns, lower [g, g] the strictly lower part of (I + F_gg)^-1."""
    return _module().gptq_group_scales(w, e, lower.contiguous(), [float(r) for r in ratios], iters)


def gptq_columns(w, e, f, s, z, q, i0: int, i1: int, qmin: int, qmax: int) -> None:
    """GPTQ's walk over columns [i0, i1) of a block, in place (quant/gptq_kernel.py)."""
    _module().gptq_columns(w, e, f, s, z, q, i0, i1, float(qmin), float(qmax))


def transpose_widen(src: torch.Tensor, dst: torch.Tensor, dst2: torch.Tensor | None = None) -> None:
    """dst [C, R] (and dst2) = src [R, C]^T in float32, for bf16 or float32 src with rows of
    consecutive elements (quant/gptq_kernel.py)."""
    _module().transpose_widen(src, dst, dst2)


def lowrank_columns(px, xj, d, u, a) -> None:
    """quant/gptq_lowrank.py's column loop for one block, float64, in place into u and a."""
    _module().lowrank_columns(px, xj, d, u, a)


def gram_bf16_available() -> bool:
    """Whether gram_bf16 runs here: the kernel is built and the CPU has AVX512-BF16 (and bf16
    arithmetic is not turned off: LLAMA4_LOCAL_NO_BF16_GEMM)."""
    return avx512_bf16() and available()


def gram_bf16(x: torch.Tensor, h: torch.Tensor, block: int, accumulate: bool = True) -> None:
    """h [N, N] float32 += x^T x for bf16 x [T, N] (N a multiple of 64), float32 sums, in the
    blocks quant.gptq.add_gram fills (row m: the columns before the end of m's `block`);
    `accumulate=False`: h = x^T x there, h's old contents never read (T > 0)."""
    _module().gram_bf16(x.contiguous(), h, block, accumulate)


def gram_f32(x: torch.Tensor, h: torch.Tensor, block: int, accumulate: bool = True) -> None:
    """gram_bf16's blocks for bf16 or float32 x [T, N] (N a multiple of 16) with float32 products
    (AVX2 FMA: where the CPU has no bf16 dot products)."""
    _module().gram_f32(x.contiguous(), h, block, accumulate)


def gemm_tn_sub(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """c [M, N] -= a^T b for a [K, M], b [K, N] (float32 on the CPU, unit column strides, c apart from
    a and b), in the extension's FMA tiles (quant/chol_kernel.py); returns c."""
    _module().gemm_tn_sub(a, b, c)
    return c


def int8_gram(x: torch.Tensor, h: torch.Tensor, block: int, accumulate: bool = True) -> None:
    """h [N, N] (float32) += x^T x for x [T, N] (float32, bf16 or fp16) rounded to int8 per column
    and group of rows (quant/int8_gram_kernel.py), in the blocks quant.gptq.add_gram fills."""
    _module().int8_gram(x.contiguous(), h, block, accumulate)


def attend_one(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, parts: int = 0) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v for q [H, 1, hd] against keys and values [KV, S, hd] (rows
    contiguous; views of a cache are fine), bf16 or float32, as the reference's eager attention
    rounds it (quant/attn_kernel.py). `parts`: each KV head's keys cut into that many ranges for
    threads (0: as many as the threads beyond the KV heads need, at least 1024 keys each)."""
    return _module().attend_one(q, keys, values, parts)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dimension (times weight), bf16 or float32, with the reference's
    roundings (quant/glue_kernel.py)."""
    return _module().rms_norm(x, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, silu rounded to the dtype first as torch computes it (bf16 or float32)."""
    return _module().silu_mul(gate, up)


def half_mv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, K] (T <= 4) @ w [N, K]^T for bf16 or fp16 w (K a multiple of 16), accumulated in
    float32; the result in x's dtype."""
    return _module().half_mv(x.contiguous(), w)


def half_vm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, K] (T <= 4) @ w [K, N] for bf16 or fp16 w stored inputs by outputs (contiguous),
    accumulated in float32 in input order; the result in x's dtype."""
    return _module().half_vm(x.contiguous(), w)


def int8_rows(x: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [R, K] (float32, bf16 or fp16) -> (int8 [R, K], float32 scales [R], float32 crests [R]),
    each row's largest magnitude to qmax (<= 127), nearest even; a row holding NaN or infinity
    gets a NaN scale. A row's crest is its largest magnitude over its rms (0 for a zero or
    non-finite row). Rows may lie any distance apart (a slice of a wider matrix: no copy)."""
    q, s, c = _module().int8_rows(_unit_columns(x), qmax)
    return q, s, c


def int8_cols(w: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [K, O] -> (int8 [K, O], float32 scales [O], float32 crests [O]): int8_rows by columns."""
    q, s, c = _module().int8_cols(_unit_columns(w), qmax)
    return q, s, c


def _unit_columns(x: torch.Tensor) -> torch.Tensor:
    """x itself where its elements within a row are adjacent and its rows do not overlap, else a
    contiguous copy (what int8_rows / int8_cols read)."""
    if x.dim() == 2 and x.stride(1) == 1 and x.stride(0) >= x.shape[1]:
        return x
    return x.contiguous()


def int8_rescale(acc: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [T, O] (contiguous float32 or bf16) = int32 products acc [T, O] times sx [T] and sw
    [O]; returns out."""
    _module().int8_rescale(acc, sx, sw, out)
    return out


def int8_pack(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An int8 weight q [K, O] (any strides) as int8_gemm's panels (int8 [ceil(O / 16), ceil(K /
    4), 64]) and its per-output sums (int32 [O]) (quant/int8_gemm_kernel.py)."""
    packed, sums = _module().int8_pack(q)
    return packed, sums


def int8_gemm(
    xq: torch.Tensor,
    packed: torch.Tensor,
    sums: torch.Tensor,
    sx: torch.Tensor,
    sw: torch.Tensor,
    out: torch.Tensor,
    narrow: bool = False,
    add: bool = False,
) -> torch.Tensor:
    """out [T, O] (contiguous float32 or bf16) = (xq [T, K] @ q) times sx [T] and sw [O], for q as
    int8_pack left it: exact integer sums where |q| <= 63 (int8_gemm_exact_qmax); returns out.
    `narrow`: |xq| <= 63 (beyond it clamped), so the maddubs build adds two steps' pair sums in
    int16 before widening them (int8_gemm_pairs: a quarter fewer multiplies). `add`: out
    (float32, unit column stride, any row stride) += the same scaled sums (GPTQ's updates); with
    sums [G, O] (add only), K is G groups of K / G inputs, each with its own scales (sx [G, T],
    sw [G, O]) and weight sums, added to out one group after another."""
    if sums.dim() == 2 and not add:
        raise ValueError("int8_gemm: groups of inputs (sums [G, O]) only with add=True")
    (_module().int8_gemm_add if add else _module().int8_gemm)(xq.contiguous(), packed, sums, sx, sw, out, narrow)
    return out


def int8_packed_cols(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [K, O] rounded per column to what int8_gemm sums exactly (int8_gemm_exact_qmax) and laid
    out as its right operand: (packed, sums [O], scales [O]) (GPTQ's errors per block, the rows'
    running sum)."""
    q, s, _ = int8_cols(w, int8_gemm_exact_qmax())
    packed, sums = int8_pack(q)
    return packed, sums, s


def int8_gemm_add_groups(lefts, rights, out: torch.Tensor, narrow: bool = False) -> torch.Tensor:
    """out += sum over g of lefts[g] @ rights[g], scaled, in order of g: lefts [(xq [T, k_g], sx
    [T])], rights [(packed, sums [O], sw [O])] (int8_packed_cols'). Groups of one width, a
    multiple of 4, go in one int8_gemm with groups (the same float additions in the same order as
    a call each), others a call each; returns out."""
    widths = {q.shape[1] for q, _ in lefts}
    if len(lefts) == 1 or len(widths) > 1 or widths.pop() % 4:
        for (xq, sx), (packed, sums, sw) in zip(lefts, rights, strict=True):
            int8_gemm(xq, packed, sums, sx, sw, out, narrow=narrow, add=True)
        return out
    xq, sx = torch.cat([q for q, _ in lefts], dim=1), torch.stack([s for _, s in lefts])
    packed = torch.cat([r[0] for r in rights], dim=1)
    sums, sw = torch.stack([r[1] for r in rights]), torch.stack([r[2] for r in rights])
    return int8_gemm(xq, packed, sums, sx, sw, out, narrow=narrow, add=True)


def int8_gemm_pairs() -> bool:
    """Whether int8_gemm(..., narrow=True) pairs steps: the maddubs build (no VNNI)."""
    return bool(_module().int8_gemm_pairs())


def int8_gemm_exact_qmax() -> int:
    """The largest |q| whose products int8_gemm sums exactly: 127 with VNNI (vpdpbusd), 63 with
    maddubs (its int16 pair sums of 255 * |q| * 2 stay below 32768)."""
    return 127 if isa() != "avx2" else 63


def int8_span(group_size: int) -> int:
    """How many activations share one int8 scale in int4_mv's int8 path for INT4 weights of this
    group size: 128 where the group is a multiple of 128 (one conversion and one FMA per 128
    weights: 1.2-1.4x on Zen 3 without VNNI, the decode stream 1.25x on Zen 4 with it), else 32
    (llama.cpp's Q8_0 block)."""
    return 128 if group_size % 128 == 0 else 32


def round_activations_int8(x: torch.Tensor, span: int = 32) -> torch.Tensor:
    """What an int8-activation kernel computes with in place of x [T, K], as float32: x rounded
    per `span` inputs to int8 with scale max|x| / 127 (the reference for tests and benchmarks;
    int4_mv's span is int8_span(group), the INT8 and Q6 kernels' 32)."""
    xb = x.float().reshape(x.shape[0], -1, span)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv) * (amax / 127.0)).reshape(x.shape)
