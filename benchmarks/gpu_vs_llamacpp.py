"""This runner against llama.cpp built with CUDA, on one GPU machine, side by side.

The issue's cross-check for the GPU path: the Scout-width slice the CPU benchmark uses
(benchmarks/scout_slice.py: Scout's layer widths, 4 layers, 4 experts top-1, 2.77 B parameters),
with every weight on the GPU and with the experts on the CPU. llama.cpp: its CUDA build for one
architecture from the source the llama-cpp-python sdist vendors (a machine without network gets
it as the tarball `llamacpp.pack_source` makes: `--source`), F16 GGUF by its converter, Q4_0 by
llama-quantize, then `llama-bench -ngl 99` and `-ngl 99 -ot exps=CPU`. Ours: the slice quantized
to INT4 (`--no-calibrate`: the same kernels as the default, minutes less), `bench` with every
expert resident (CUDA-graph decode) and with one expert slot and CPU misses (the experts on the
CPU). Each step is timed and printed as a JSON line, so a run cut short still reports what it did.

    python benchmarks/gpu_vs_llamacpp.py --source .peer/llama.cpp-src.tar.xz --work /tmp/peer
    python benchmarks/gpu_vs_llamacpp.py --cpu-only --work /tmp/peer   # the same steps, no CUDA

The tarball, made where the source is (about 8 MB; `.peer/` is git-ignored, carried to the
device): `python benchmarks/gpu_vs_llamacpp.py --pack .peer/llama.cpp-src.tar.xz`.

The CUDA build takes minutes of device time; built here beforehand (benchmarks/llamacpp_cuda.py:
portable, for sm_90, with a Python whose torch is a CUDA build for its cuBLAS), the tools travel
as a second tarball and the device builds nothing where they run there:

    python benchmarks/gpu_vs_llamacpp.py --prebuild .peer/llama.cpp-cuda90.tar.xz   # here
    python benchmarks/gpu_vs_llamacpp.py --source .peer/llama.cpp-src.tar.xz \
        --bins .peer/llama.cpp-cuda90.tar.xz --work /tmp/peer                       # there
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import llamacpp  # noqa: E402
import llamacpp_cuda  # noqa: E402


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def timed(step: str, fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    emit(step=step, seconds=round(time.perf_counter() - t0, 1))
    return out


def llama_bench(bin_dir: Path, gguf: Path, threads: int, prompt: int, gen: int, extra: list[str], env=None) -> dict:
    res = llamacpp.bench(bin_dir, gguf, threads, prompt, gen, reps=3, extra=tuple(extra), env=env)
    return {k: round(v, 1) for k, v in res.items()}


def ours_bench(model: Path, device: str, prompt: int, gen: int, extra: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "cli.py"), "bench", "-m", str(model), "--device", device,
           "--prompt-tokens", str(prompt), "--gen-tokens", str(gen), "--json", *extra]  # fmt: skip
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    row = {"prefill": res["prefill"]["tok_s"], "decode": res["decode"]["tok_s"], "decode_mode": res.get("decode_mode")}
    cache = res["decode"].get("expert_cache")
    if cache:
        row["decode_hit_rate"], row["decode_cpu_misses"] = round(cache["hit_rate"], 3), cache.get("cpu")
    row["peak_gpu_GB"] = round((res.get("peak_gpu_bytes") or 0) / 1e9, 2)
    return row


def prebuilt(tarball: Path, work: Path) -> tuple[Path | None, dict | None]:
    """The prebuilt tools' directory and environment, or (None, None) where they do not run here."""
    bin_dir = llamacpp_cuda.unpack(tarball, work)
    env = llamacpp_cuda.runtime_env(bin_dir)
    why = llamacpp_cuda.check(bin_dir, env)
    emit(step="prebuilt llama.cpp", runs=why is None, **({"why_not": why} if why else {}))
    return (bin_dir, env) if why is None else (None, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".cache")
    ap.add_argument("--source", type=Path, help="a tarball from llamacpp.pack_source (else downloaded)")
    ap.add_argument("--arch", default="90", help="CUDA architecture to build for (H100/H200: 90)")
    ap.add_argument("--cpu-only", action="store_true", help="build and run without CUDA (a check of the steps)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--pack", type=Path, help="only write the source tarball here (from the CPU bench's cache)")
    ap.add_argument("--prebuild", type=Path, help="only build the portable CUDA tools here and pack them to this file")
    ap.add_argument("--bins", type=Path, help="the tools --prebuild packed (built there if they do not run)")
    args = ap.parse_args()
    cache = ROOT / "benchmarks" / ".cache"
    if args.pack:
        llamacpp.ensure_source(cache)
        emit(packed=str(llamacpp.pack_source(cache, args.pack)))
        return
    if args.prebuild:
        bin_dir = timed("build portable CUDA tools", llamacpp_cuda.build, cache, args.arch)
        emit(packed=str(llamacpp_cuda.pack(bin_dir, args.prebuild)), MB=round(args.prebuild.stat().st_size / 1e6, 1))
        return
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.source:
        llamacpp.unpack_source(args.source, work)
    cuda = not args.cpu_only
    bin_dir, env = prebuilt(args.bins, work) if cuda and args.bins else (None, None)
    if bin_dir is None:
        bin_dir = timed("build llama.cpp", llamacpp.build, work, cuda_arch=args.arch if cuda else None)

    from scout_slice import write_slice

    src = work / "scout-slice"
    if not (src / "model.safetensors.index.json").exists():
        timed("write slice", write_slice, src)
    f16, q4 = work / "scout-slice-f16.gguf", work / "scout-slice-q4_0.gguf"
    if not f16.exists():
        timed("convert F16", llamacpp.convert, work, src, f16)
    if not q4.exists():
        timed("llama-quantize Q4_0", llamacpp.quantize, bin_dir, f16, q4, "Q4_0", args.threads, env=env)
    ours = work / "scout-slice-int4-plain"
    if not (ours / "config.json").exists():
        cmd = [sys.executable, str(ROOT / "cli.py"), "quantize", str(src), str(ours), "--no-calibrate"]
        timed("our quantize (plain fit)", subprocess.run, cmd, check=True, stdout=subprocess.DEVNULL)

    device = "cuda" if cuda else "cpu"
    ngl = ["-ngl", "99"] if cuda else []
    p, n, t = args.prompt, args.gen, args.threads
    on_cpu = ["--expert-cache-slots", "1", "--miss-policy", "cpu", "--no-prefetch"]  # every miss on the CPU
    rows = {
        "all on the GPU": (
            lambda: llama_bench(bin_dir, q4, t, p, n, ngl, env),
            lambda: ours_bench(ours, device, p, n, []),
        ),
        "experts on the CPU": (
            lambda: llama_bench(bin_dir, q4, t, p, n, [*ngl, "-ot", "exps=CPU"], env),
            lambda: ours_bench(ours, device, p, n, on_cpu),
        ),
    }
    for name, (peer, mine) in rows.items():
        for side, fn in (("llama.cpp Q4_0", peer), ("ours INT4", mine)):
            try:
                emit(setup=name, side=side, **fn())
            except subprocess.CalledProcessError as e:
                emit(setup=name, side=side, error=(e.stderr or "")[-400:])


if __name__ == "__main__":
    main()
