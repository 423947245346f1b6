"""The Triton INT4 kernels (quant/triton_int4.py) against the stock CUDA kernel and bf16, at
Scout's expert shapes, with a sweep of the GEMV's block shapes.

For gate/up [8192, 5120] and down [5120, 8192] at group 128: per row count, microseconds and
GB/s of packed weight bytes for the Triton GEMV (each block shape, and split-K at one row), the path Int4Linear takes
("triton": GEMV up to GEMV_MAX_ROWS rows, else dequantize + GEMM), the stock
`_weight_int4pack_mm`, and a bf16 matmul; and the dequantize kernel alone (bytes in + out).

    python benchmarks/bench_triton_int4.py [--rows 1,2,4,8,64,512,2048]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant import triton_int4  # noqa: E402
from quant.int4 import quantize_rtn  # noqa: E402
from quant.kernels import Int4Linear  # noqa: E402

SHAPES = {"gate_or_up": (8192, 5120), "down": (5120, 8192)}
# BLOCK_N, GPB, warps. On an H200 (2026-12-04) the first seven gave 23-39 us at one row (gate/up),
# (16, 4, 4) best; the rest try more bytes in flight per thread (fewer rows, more groups a step).
CONFIGS = [(8, 4, 4), (16, 2, 4), (16, 4, 4), (32, 2, 4), (32, 4, 8), (64, 2, 8), (64, 4, 8)]
CONFIGS += [(4, 8, 4), (8, 8, 4), (8, 16, 8), (16, 8, 8), (4, 16, 4)]
SPLITS = [(16, 4, 4, 2), (16, 4, 4, 4), (8, 4, 4, 4), (32, 4, 8, 4), (16, 2, 4, 8)]  # ... and split-K, one row


def us(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,64,512,2048")
    args = ap.parse_args()
    dev = torch.device("cuda")
    for name, (n, k) in SHAPES.items():
        qw = quantize_rtn(torch.randn(n, k) * 0.02, 128)
        tri = Int4Linear(qw, dev, torch.bfloat16, path="triton")
        stock = Int4Linear(qw, dev, torch.bfloat16, path="cuda")
        w16 = torch.randn(n, k, device=dev).bfloat16()
        nbytes = tri.nbytes()
        p, sz = tri.packed, tri.scales_and_zeros
        t = us(lambda: triton_int4.int4_dequant(p, sz, 128, torch.bfloat16))
        print(
            json.dumps(
                {"shape": name, "dequant_us": round(t, 1), "dequant_GB_s": round((nbytes + n * k * 2) / t / 1e3, 1)}
            )
        )
        for rows in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(rows, k, device=dev).bfloat16()
            row = {"shape": name, "rows": rows, "packed_MB": round(nbytes / 1e6, 2)}
            if rows <= 8:
                for bn, gpb, w in CONFIGS:
                    t = us(lambda bn=bn, gpb=gpb, w=w: triton_int4.int4_gemv(x, p, sz, 128, bn, gpb, w))
                    row[f"gemv_{bn}_{gpb}_{w}_us"] = round(t, 1)
            if rows == 1:
                for bn, gpb, w, sp in SPLITS:
                    gemv = triton_int4.int4_gemv
                    t = us(lambda bn=bn, gpb=gpb, w=w, sp=sp: gemv(x, p, sz, 128, bn, gpb, w, split=sp))
                    row[f"gemv_{bn}_{gpb}_{w}_split{sp}_us"] = round(t, 1)
            for label, fn in (("triton", lambda: tri(x)), ("stock", lambda: stock(x)), ("bf16", lambda: x @ w16.t())):
                t = us(fn)
                row[f"{label}_us"] = round(t, 1)
                row[f"{label}_GB_s"] = round((w16.numel() * 2 if label == "bf16" else nbytes) / t / 1e3, 1)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
