"""INT4 matmul throughput at Scout's expert shapes, next to float matmuls, in one run.

For each weight shape (gate/up [8192, 5120], down [5120, 8192]) and each row count (1 = decode,
more = prefill), times y = x @ W^T through:
  float32 F.linear, bfloat16 (torch.mv for one row), the INT4 kernel Int4Linear picks (ours on
  AVX2 CPUs: "avx2_q8", int8 activations, for bf16 x and "avx2", float activations, for float32
  x; the stock aten one on CUDA), the stock aten CPU kernel beside it, and the
  INT4 reference (dequantize then matmul), and with --nf4 bitsandbytes' NF4 matmul_4bit,
and reports GB/s of weight bytes read (packed bytes for INT4) next to the copy bandwidth and
next to a float32 matvec over as many bytes as the packed INT4 weight ("float32_same_bytes").

    python benchmarks/bench_int4_matmul.py [--device cpu|cuda] [--rows 1,8,64] [--nf4]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import best_time, copy_bandwidth  # noqa: E402

from llama4_local.model import linear  # noqa: E402
from quant.int4 import Int4Weight, dequantize_int4, quantize_rtn  # noqa: E402
from quant.kernels import Int4Linear  # noqa: E402

SHAPES = {"gate_or_up": (8192, 5120), "down": (5120, 8192)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rows", default="1,8,64")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--nf4", action="store_true", help="also bitsandbytes NF4 (block = group size) via matmul_4bit")
    args = ap.parse_args()
    dev = torch.device(args.device)
    bw = copy_bandwidth(dev)
    print(json.dumps({"device": args.device, "threads": torch.get_num_threads(), "copy_GB_s": round(bw / 1e9, 2)}))
    for name, (n, k) in SHAPES.items():
        w32 = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
        qw = quantize_rtn(w32.bfloat16(), args.group_size)  # the kernel's speed does not depend on the fit
        w32 = w32.to(dev)
        w16 = w32.bfloat16()
        # A float32 matrix as many bytes as the packed INT4 weight: the speed a matvec streams
        # this many bytes at (the memory-bound line for the INT4 kernels at one row).
        w_same = torch.randn(n, k // 8, device=dev)
        int4 = Int4Linear(qw, dev, torch.bfloat16)
        int4_f32 = Int4Linear(qw, dev, torch.float32) if dev.type == "cpu" else None
        stock = Int4Linear(qw, dev, torch.bfloat16, path="cpu") if dev.type == "cpu" else None
        int4_bytes = qw.packed.numel() * 4 + qw.scale.numel() * 2
        qw_dev = Int4Weight(qw.packed.to(dev), qw.scale.to(dev), None, qw.shape, qw.group_size)
        nf4 = None
        if args.nf4:
            from quant.nf4 import Nf4Linear, quantize_nf4

            nf4 = Nf4Linear(quantize_nf4(w16, args.group_size), dev, torch.bfloat16)
            nf4_f32 = Nf4Linear(quantize_nf4(w16, args.group_size), dev, torch.float32)
        for rows in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(rows, k, device=dev)
            xb = x.bfloat16()
            x_same = torch.randn(rows, k // 8, device=dev)
            cases = {
                "float32": (lambda: F.linear(x, w32), w32.numel() * 4),
                "float32_same_bytes": (lambda: F.linear(x_same, w_same), w_same.numel() * 4),
                "bfloat16": (lambda: linear(xb, w16), w16.numel() * 2),
                f"int4_{int4.path}_bf16": (lambda: int4(xb), int4_bytes),
                # Dequantize on the device on every call, then a bf16 matmul.
                "int4_dequant_then_bf16": (lambda: F.linear(xb, dequantize_int4(qw_dev, torch.bfloat16)), int4_bytes),
            }
            if nf4 is not None:
                cases["nf4_bnb_bf16"] = (lambda: nf4(xb), nf4.nbytes())
                cases["nf4_bnb_f32"] = (lambda: nf4_f32(x), nf4.nbytes())
            if int4_f32 is not None:
                cases[f"int4_{int4_f32.path}_f32"] = (lambda: int4_f32(x), int4_bytes)
            if stock is not None and int4.path != "cpu":  # the stock aten kernel, side by side
                cases["int4_stock_cpu_bf16"] = (lambda: stock(xb), int4_bytes)
            row = {"shape": name, "rows": rows}
            for case, (fn, nbytes) in cases.items():
                t = best_time(fn, dev, args.reps)
                row[f"{case}_GB_s"] = round(nbytes / t / 1e9, 2)
                row[f"{case}_ms"] = round(t * 1e3, 3)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
