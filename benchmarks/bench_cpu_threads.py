"""Thread scaling of the INT4 CPU kernel at Scout's expert shapes, next to what memory allows.

For each thread count: decode (one bf16 row through `--matrices` distinct 8192 x 5120 INT4
matrices, group 128, so the weights stream from memory, not from cache) in GB/s of packed weight
bytes (on AVX-512 VNNI builds also with the row through the 512-bit tiles); prefill (128 rows
through 4 of them) in GFLOP/s, by the integer kernel and by dequantizing to bf16 a chunk at a
time for bf16 GEMMs (quant/gemm_kernel.py, the default on AMX CPUs; one figure per `--chunks`
size in MB); a bf16 GEMM of the same prefill for comparison; and the memory ceiling: a float32
sum over 1 GiB at that thread count. Scout's decode reads about 12 such matrices' worth per MoE
layer. With --crossover, at the last thread count: one matrix's time by each INT4 path at each
of those row counts, where the GEMM starts to pay (quant.cpu_kernel.AMX_GEMM_ROWS). With
--stream-prefetch, at the first and last thread counts: decode's GB/s with each prefetch distance
and hint (t0, t1, t2, nta) of the INT4 decode stream (e.g. 2048:nta,4096:t1: each vendor's default).
Also decode attention (`cpu_kernel.attend_one`) at Scout's 40 query / 8 KV heads of 128 against
`--attention-keys` keys of a bf16 cache, in GB/s of keys and values read: as it runs (each KV
head's keys cut into ranges where there are more threads than KV heads) and, past 8 threads,
with one range a head (8 threads at most).

    python benchmarks/bench_cpu_threads.py [--threads 1,2,4,8,16] [--matrices 32] [--chunks 2,8,32]
        [--crossover 8,16,32,64,128,512] [--stream-prefetch 2048:nta,4096:t0,4096:t1,8192:t1]
        [--attention-keys 16000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Weights in 2 MB pages, as a run has them (the page cache's large folios, or cli.py's huge-page
# copies): in 4 KB pages the decode stream read 10.6 against 14.2 GB/s on one Xeon thread.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import best_time, prefetch_settings  # noqa: E402

from llama4_local.model import linear  # noqa: E402
from llama4_local.threads import cpu_name, physical_cores  # noqa: E402
from quant import cpu_kernel  # noqa: E402
from quant.int4 import Int4Weight  # noqa: E402
from quant.kernels import Int4Linear  # noqa: E402

N, K, GROUP, ROWS = 8192, 5120, 128, 128


def random_int4(gen: torch.Generator) -> Int4Weight:
    packed = torch.randint(-(2**31), 2**31 - 1, (N, K // 8), dtype=torch.int32, generator=gen)
    scale = torch.rand(N, K // GROUP, generator=gen).mul(0.004).add(0.001).bfloat16()
    return Int4Weight(packed, scale, None, (N, K), GROUP)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = sorted({1, 2, 4, 8, physical_cores(), os.cpu_count() or 1})
    ap.add_argument("--threads", default=",".join(map(str, default)))
    ap.add_argument("--matrices", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunks", default="8", help="MB of bf16 weights per GEMM chunk, comma-separated")
    ap.add_argument("--crossover", help="row counts at which to time both INT4 paths (last thread count)")
    ap.add_argument("--stream-prefetch", help="decode prefetch settings to sweep, as BYTES:HINT (t0, t1, t2, nta)")
    ap.add_argument("--attention-keys", type=int, default=16000, help="keys for decode attention (0: skip)")
    args = ap.parse_args()
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    weights = [random_int4(gen) for _ in range(args.matrices)]
    lins = [Int4Linear(w, cpu, torch.bfloat16) for w in weights]
    nbytes = sum(w.packed.numel() * 4 + w.scale.numel() * 2 for w in weights)
    w16 = torch.randn(N, K).bfloat16()
    x1 = torch.randn(1, K).bfloat16()
    xp = torch.randn(ROWS, K).bfloat16()
    big = torch.ones(1 << 28)  # 1 GiB of float32
    keys = args.attention_keys
    q, kv = torch.randn(40, 1, 128).bfloat16(), torch.randn(2, 8, max(keys, 1), 128).bfloat16()
    print(
        json.dumps(
            {
                "cpu": cpu_name(),
                "logical_cpus": os.cpu_count(),
                "physical_cores": physical_cores(),
                "kernel_path": lins[0].path,
                "amx": cpu_kernel.has_amx(),
                "int4_bf16_gemm_from_rows": cpu_kernel.bf16_gemm_rows(),
                "decode_bytes_MB": round(nbytes / 1e6, 1),
            }
        ),
        flush=True,
    )
    flops = 2 * ROWS * N * K
    counts = [int(t) for t in args.threads.split(",")]
    for n in counts:
        torch.set_num_threads(n)

        def decode():
            for lin in lins:
                lin(x1)

        def prefill():
            for lin in lins[:4]:
                lin(xp)

        t_dec = best_time(decode, cpu, args.reps)
        extra = {}
        if args.stream_prefetch and n in (counts[0], counts[-1]):
            for ahead, hint in prefetch_settings(args.stream_prefetch):
                cpu_kernel.set_stream_prefetch(ahead, hint)
                extra[f"decode_GB_s_{ahead}:{hint}"] = round(nbytes / best_time(decode, cpu, args.reps) / 1e9, 2)
            cpu_kernel.set_stream_prefetch()
        if cpu_kernel.isa() == "avx512-vnni":  # decode's one row through the 512-bit tiles too
            cpu_kernel.set_zmm_one_row(True)
            extra["decode_zmm_one_row_GB_s"] = round(nbytes / best_time(decode, cpu, args.reps) / 1e9, 2)
            cpu_kernel.set_zmm_one_row(False)
        t_pre = best_time(prefill, cpu, max(2, args.reps // 2)) / 4
        t_bf16 = best_time(lambda: linear(xp, w16), cpu, max(2, args.reps // 2))
        gemm = {}
        for mb in [float(c) for c in args.chunks.split(",")]:

            def prefill_gemm():
                for lin in lins[:4]:
                    cpu_kernel.int4_gemm_bf16(xp, lin.packed, lin.scales_and_zeros, GROUP, int(mb * 2**20))

            t = best_time(prefill_gemm, cpu, max(2, args.reps // 2)) / 4
            gemm[f"prefill_int4_bf16_gemm_{mb:g}MB_GFLOP_s"] = round(flops / t / 1e9, 1)
        t_sum = best_time(lambda: big.sum(), cpu, args.reps)
        if keys and cpu_kernel.available():
            for name, parts in (("attention_GB_s", 0), ("attention_one_range_GB_s", 1)):
                if parts == 0 or n > 8:
                    t = best_time(lambda p=parts: cpu_kernel.attend_one(q, kv[0], kv[1], p), cpu, args.reps)
                    extra[name] = round(kv.numel() * 2 / t / 1e9, 2)
        print(
            json.dumps(
                {
                    "threads": n,
                    "decode_GB_s": round(nbytes / t_dec / 1e9, 2),
                    "decode_ms_per_matrix": round(t_dec / len(lins) * 1e3, 3),
                    **extra,
                    "prefill_int4_GFLOP_s": round(flops / t_pre / 1e9, 1),
                    **gemm,
                    "prefill_bf16_GFLOP_s": round(flops / t_bf16 / 1e9, 1),
                    "sum_GB_s": round(big.numel() * 4 / t_sum / 1e9, 2),
                }
            ),
            flush=True,
        )
    if args.crossover:
        crossover(lins[0], [int(r) for r in args.crossover.split(",")], args.reps)


def crossover(lin, rows: list[int], reps: int) -> None:
    """One matrix's time by the integer kernel, the bf16 GEMM path and (AVX-512 VNNI builds) the
    outer-product tiles at each row count."""
    cpu = torch.device("cpu")
    for r in rows:
        x = torch.randn(r, K).bfloat16()
        t_int = best_time(lambda: cpu_kernel.int4_mv(x, lin.packed, lin.scales_and_zeros, GROUP, True), cpu, reps)
        t_gemm = best_time(lambda: cpu_kernel.int4_gemm_bf16(x, lin.packed, lin.scales_and_zeros, GROUP), cpu, reps)
        row = {
            "rows": r,
            "threads": torch.get_num_threads(),
            "int4_ms": round(t_int * 1e3, 3),
            "bf16_gemm_ms": round(t_gemm * 1e3, 3),
            "gemm_speedup": round(t_int / t_gemm, 2),
        }
        if cpu_kernel.outer_available() and GROUP == 128:
            t_outer = best_time(
                lambda: cpu_kernel.int4_gemm_outer(x, lin.packed, lin.scales_and_zeros, GROUP), cpu, reps
            )
            row |= {"outer_ms": round(t_outer * 1e3, 3), "outer_speedup": round(min(t_int, t_gemm) / t_outer, 2)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
