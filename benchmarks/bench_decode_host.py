"""Host time of a CPU decode step: the Python decoder layer against the one-call C++ layer.

A decode token is timed both ways, alternated (LLAMA4_LOCAL_PY_DECODE=1 keeps the Python layer),
on the same cache depth. The kernel calls of one Python step are recorded and replayed alone,
back to back, to give the step's kernel time; what a step takes beyond it is host time (Python,
torch dispatch, the gaps between parallel regions), reported per layer.

    python benchmarks/bench_decode_host.py [--model DIR] [--threads 1,2] [--reps 5]

Without --model: Scout's shape at a quarter of its width (scout_slice.py --hidden 1280: 10 query
/ 2 KV heads of 128, experts 1280 x 2048, qk-norm, a NoPE layer every fourth; 8 layers of 4
experts), quantized as the default does without calibration (INT4 experts, shared experts and
attention). Writing and quantizing it takes about a minute on two cores, less on more.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama4_local import cpu_decode  # noqa: E402
from llama4_local.loader import load_model  # noqa: E402
from quant import cpu_kernel  # noqa: E402

_module_fn = cpu_kernel._module


class _Recorder:
    """Stands in for the kernel module: records each call and makes it."""

    def __init__(self, module, calls):
        self.module, self.calls = module, calls

    def __getattr__(self, name):
        f = getattr(self.module, name)

        def call(*a, **k):
            self.calls.append((f, a, k))
            return f(*a, **k)

        return call


def step_time(model, cache, tok, n: int, python: bool) -> float:
    """Seconds per decode step, the fastest of n steps after a warm-up one."""
    os.environ.pop("LLAMA4_LOCAL_PY_DECODE", None)
    if python:
        os.environ["LLAMA4_LOCAL_PY_DECODE"] = "1"
    cpu_decode.invalidate()
    model(torch.tensor([tok]), cache)
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        model(torch.tensor([tok]), cache)
        best = min(best, time.perf_counter() - t0)
    return best


def kernel_time(model, cache, tok, n: int) -> tuple[float, int]:
    """Seconds of one Python step's kernel calls replayed alone (fastest of n), and their count."""
    module, calls = cpu_kernel._module(), []
    os.environ["LLAMA4_LOCAL_PY_DECODE"] = "1"
    cpu_decode.invalidate()
    cpu_kernel._module = lambda: _Recorder(module, calls)
    try:
        model(torch.tensor([tok]), cache)
    finally:
        cpu_kernel._module = _module_fn
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        for f, a, k in calls:
            f(*a, **k)
        best = min(best, time.perf_counter() - t0)
    return best, len(calls)


def measure(path: Path, threads: int, reps: int, depth: int) -> dict:
    torch.set_num_threads(threads)
    model, _ = load_model(path, "bfloat16", "cpu")
    layers = model.cfg.num_layers
    cache = model.new_cache(depth + 8 * reps * 40 + 64)
    with torch.inference_mode():
        model(torch.randint(3, 500, (depth,), generator=torch.Generator().manual_seed(0)), cache)
        py, cc, kern = [], [], []
        for _ in range(reps):  # alternated
            py.append(step_time(model, cache, 17, 10, True))
            cc.append(step_time(model, cache, 17, 10, False))
            k, ncalls = kernel_time(model, cache, 17, 10)
            kern.append(k)
    os.environ.pop("LLAMA4_LOCAL_PY_DECODE", None)
    cpu_decode.invalidate()
    p, c, k = min(py), min(cc), min(kern)
    return {
        "threads": threads,
        "layers": layers,
        "kernel_calls": ncalls,
        "python_ms": round(p * 1e3, 3),
        "cpp_layer_ms": round(c * 1e3, 3),
        "kernels_alone_ms": round(k * 1e3, 3),
        "python_host_us_per_layer": round((p - k) / layers * 1e6, 1),
        "cpp_host_us_per_layer": round((c - k) / layers * 1e6, 1),
        "speedup": round(p / c, 3),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="an INT4 checkpoint (default: a quarter-width Scout, made here)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--depth", type=int, default=64, help="prompt tokens before the timed steps")
    args = ap.parse_args()
    if not cpu_kernel.available():
        sys.exit("the CPU kernel is not available here (AVX2/FMA and a C++ compiler are needed)")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            from scout_slice import write_slice

            from quant.quantize import QuantizeOptions, quantize_checkpoint

            src, path = Path(tmp) / "bf16", Path(tmp) / "int4"
            write_slice(src, layers=8, experts=4, hidden=1280)
            parts = ("experts", "shared", "attention", "mlp")
            quantize_checkpoint(src, path, QuantizeOptions(calibrate=False, parts=parts))
        for t in (int(x) for x in args.threads.split(",")):
            print(json.dumps({"model": str(args.model or "scout-width/4"), **measure(path, t, args.reps, args.depth)}))


if __name__ == "__main__":
    main()
