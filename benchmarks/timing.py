"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device: torch.device, reps: int) -> float:
    """Seconds of the fastest of `reps` calls of fn (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def spread(values: list[float], digits: int = 2) -> dict[str, float]:
    """The median and range of alternated runs' figures, rounded."""
    return {k: round(f(values), digits) for k, f in (("median", statistics.median), ("min", min), ("max", max))}


def prefetch_settings(text: str) -> list[tuple[int, str]]:
    """BYTES:HINT,... (e.g. 2048:t0,4096:t1) as (bytes, hint) pairs for cpu_kernel.set_stream_prefetch."""
    return [(int(a), h) for a, h in (s.split(":") for s in text.split(","))]


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 29, reps: int = 5) -> float:
    """Bytes/s of a large tensor copy, counting the source bytes."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return nbytes / best_time(lambda: dst.copy_(src), device, reps)


def matvec_bandwidth(device: torch.device, nbytes: int = 1 << 29, reps: int = 5) -> float:
    """Bytes/s a float32 matrix-vector product streams (what a decode step does)."""
    ws = [torch.randn(4096, 1024, device=device) for _ in range(nbytes // (4096 * 1024 * 4))]
    x = torch.randn(1, 1024, device=device)

    def run():
        for w in ws:
            torch.nn.functional.linear(x, w)

    return nbytes / best_time(run, device, reps)
