"""The Triton INT4 kernels (quant/triton_int4.py) against the stock CUDA kernel and bf16, at
Scout's expert shapes, with a sweep of the GEMV's block shapes.

For gate/up [8192, 5120] and down [5120, 8192] at group 128: per row count, microseconds and
GB/s of packed weight bytes for the Triton GEMV (block shapes and pipelining depths, replayed in a
CUDA graph), the path Int4Linear takes
("triton": GEMV up to GEMV_MAX_ROWS rows, else dequantize + GEMM), the stock
`_weight_int4pack_mm`, and a bf16 matmul; and the dequantize kernel alone (bytes in + out).
First Scout's lm_head in Q6 (quant/triton_q6.py) against bf16; last a layer's experts by index.

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
# BLOCK_N, GPB, warps, Triton's num_stages (None: its default), timed replayed in a CUDA graph
# (`graph_us`: no host launch cost, weights cycled past the L2: what a captured decode step pays),
# stages swept at one row only. Session 14 (H200, do_bench): of 12 block shapes (16,4,4) and
# (8,4,4) were best at one row (24.1 / 24.3 us, gate/up), split-K over 2-8 programs slower
# (28-66 us), a variant loading int32 words 2x slower (38.6 against 18.8 us replayed): dropped.
GRAPH_CONFIGS = [(16, 4, 4), (8, 4, 4), (16, 8, 8), (32, 4, 8), (8, 8, 4), (16, 2, 4)]
STAGES = [None, 4]


def us(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40) * 1e3


def graph_us(fns, reps: int = 20) -> float:
    """Microseconds per call of fns (called in turn, `reps` calls) replayed as one CUDA graph: no
    host launch cost; several weight copies so one call's bytes are not the last one's in L2."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * reps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,64,512,2048")
    args = ap.parse_args()
    dev = torch.device("cuda")
    q6_head(dev)  # first: seconds, where the INT4 sweep below may meet the run's time limit
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
                copies = [(p.clone(), sz.clone()) for _ in range(4)]  # 4 x 22 MB: more than the L2
                gemv = triton_int4.int4_gemv
                for bn, gpb, w in GRAPH_CONFIGS:
                    for st in STAGES if rows == 1 else [None]:
                        fns = [
                            lambda c=c, a=(bn, gpb, w, st): gemv(x, c[0], c[1], 128, *a[:3], stages=a[3])
                            for c in copies
                        ]
                        row[f"graph_gemv_{bn}_{gpb}_{w}_s{st or 'd'}_us"] = round(graph_us(fns), 1)
                stocks = [Int4Linear(qw, dev, torch.bfloat16, path="cuda") for _ in range(4)]
                row["graph_stock_us"] = round(graph_us([lambda m=m: m(x) for m in stocks]), 1)
                del copies, stocks
            for label, fn in (("triton", lambda: tri(x)), ("stock", lambda: stock(x)), ("bf16", lambda: x @ w16.t())):
                t = us(fn)
                row[f"{label}_us"] = round(t, 1)
                row[f"{label}_GB_s"] = round((w16.numel() * 2 if label == "bf16" else nbytes) / t / 1e3, 1)
            print(json.dumps(row), flush=True)
    experts_layer(dev)


def q6_head(dev, n: int = 202048, k: int = 5120) -> None:
    """Scout's lm_head in Q6 (quant/triton_q6.py) against bf16 at one and four rows: microseconds
    and GB/s of stored bytes, per block shape, replayed in a CUDA graph (two copies: past the L2)."""
    from bench_offload_gpu import random_q6

    from quant import triton_q6

    packed = random_q6(n, k, dev)
    copies = [packed, packed.clone()]
    w16 = torch.randn(n, k, device=dev).bfloat16()
    for rows in (1, 4):
        x = torch.randn(rows, k, device=dev).bfloat16()
        row = {"shape": "q6_lm_head", "rows": rows, "q6_MB": round(packed.nbytes / 1e6, 1)}
        for bn, w in ((16, 4), (32, 4), (32, 8), (64, 8), (128, 8)):
            fns = [lambda c=c, a=(bn, w): triton_q6.q6_gemv(x, c, *a) for c in copies]
            t = graph_us(fns, 10)
            row[f"graph_q6_{bn}_{w}_us"] = round(t, 1)
            row[f"graph_q6_{bn}_{w}_GB_s"] = round(packed.nbytes / t / 1e3, 1)
        t = graph_us([lambda: x @ w16.t()], 10)
        row["graph_bf16_us"], row["graph_bf16_GB_s"] = round(t, 1), round(w16.nbytes / t / 1e3, 1)
        print(json.dumps(row), flush=True)


def experts_layer(dev, n_experts: int = 17) -> None:
    """One Scout MoE layer's decode experts (a routed expert and the shared one, stacked as
    graph_decode stacks them: 17 experts), replayed in a CUDA graph: quant/triton_experts.py's two
    launches against six Triton GEMVs by index and two SwiGLUs (as the static step ran them
    before)."""
    from llama4_local.model import silu_mul
    from quant.triton_experts import experts_gemv

    d, inter, g = 5120, 8192, 128
    protos = {}
    for p, (n, k) in (("gate", (inter, d)), ("up", (inter, d)), ("down", (d, inter))):
        protos[p] = Int4Linear(quantize_rtn(torch.randn(n, k) * 0.02, g), dev, torch.bfloat16, path="triton")
    stacks = {
        p: (lin.packed[None].repeat(n_experts, 1, 1), lin.scales_and_zeros[None].repeat(n_experts, 1, 1, 1))
        for p, lin in protos.items()
    }
    x = torch.randn(2, d, device=dev).bfloat16()
    sel = torch.tensor([3, n_experts - 1], device=dev)
    nbytes = 2 * sum(lin.nbytes() for lin in protos.values())

    def fused_two():
        h = experts_gemv(x, sel, *stacks["gate"], g, up=stacks["up"])
        return experts_gemv(h, sel, *stacks["down"], g)

    def separate():
        out = []
        for r in range(2):
            e = sel[r : r + 1]
            gemv = triton_int4.int4_gemv
            h = silu_mul(
                gemv(x[r : r + 1], *stacks["gate"], g, expert=e), gemv(x[r : r + 1], *stacks["up"], g, expert=e)
            )
            out.append(gemv(h, *stacks["down"], g, expert=e))
        return torch.cat(out)

    row = {"experts_layer": "routed + shared, one token", "packed_MB": round(nbytes / 1e6, 1)}
    for label, fn in (("experts_gemv_us", fused_two), ("separate_gemvs_us", separate)):
        row[label] = round(graph_us([fn], reps=8), 1)
    row["experts_gemv_GB_s"] = round(nbytes / row["experts_gemv_us"] / 1e3, 1)
    for bn, gpb, w in GRAPH_CONFIGS[:5]:  # the two launches' block shape and pipelining
        for st in STAGES:

            def two(a=(bn, gpb, w), st=st):
                h = experts_gemv(
                    x, sel, *stacks["gate"], g, up=stacks["up"], block_n=a[0], gpb=a[1], warps=a[2], stages=st
                )
                return experts_gemv(h, sel, *stacks["down"], g, block_n=a[0], gpb=a[1], warps=a[2], stages=st)

            row[f"experts_{bn}_{gpb}_{w}_s{st or 'd'}_us"] = round(graph_us([two], reps=8), 1)
    err = (fused_two().float() - separate().float()).norm() / separate().float().norm()
    row["rel_diff"] = round(float(err), 5)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
