"""Grouped INT4 expert matmuls for prefill on CUDA (Triton), with no host sync.

The eager MoE prefill asks the host how many tokens each expert got (`bincount(...).tolist()`)
and runs one matmul per chosen expert. Here, as vLLM's and SGLang's fused MoE kernels do, the
(token, slot) pairs are sorted by expert on the device and padded per expert to whole blocks of
BLOCK_M rows (`align`); one kernel launch then computes every block: it reads its expert's INT4
weights (the CPU kernel's layout, stacked over the experts: quant.triton_int4), dequantizes a
group of G inputs at a time into the activations' dtype and multiplies with `tl.dot` on the
tensor cores. The grid has the static upper bound of blocks, so a step is capturable as a CUDA
graph; blocks past the used ones do nothing.

Arithmetic: the weights are rounded to the activations' dtype before the products (as
dequantize-then-GEMM does), float32 accumulation; so results equal the per-expert path up to
summation order. bf16 and fp16 activations only (float32 runs keep the per-expert path).
"""

from __future__ import annotations

import os

import torch

from llama4_local.model import silu_mul

from .triton_int4 import triton

if triton is not None:
    import triton.language as tl

BLOCK_M, BLOCK_N = 32, 64
# Up to this many tokens per forward the grouped kernels run; more take the per-expert path
# (Triton dequantize into a bf16 scratch at 3.1 TB/s, then one cuBLAS GEMM per expert). On an
# H200 (docs/benchmarks.md, Scout's shapes, 2026-12-04) that path prefilled 2048 tokens at 5740
# tok/s in one forward and 3270 in the CLI's 512-token chunks, the grouped kernels at 1430 and
# 1170: so they are off (0) until tuned. bench_graph_decode.py times both.
MAX_TOKENS = 0


def available() -> bool:
    return triton is not None


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int = BLOCK_M) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair ids sorted by expert, padded per expert to whole blocks with the sentinel P = T*k;
    each block's expert, -1 past the used blocks). Pair p is token p // k, slot p % k. Device ops
    only; the sizes are static upper bounds."""
    flat = topk_ids.flatten()
    p, dev = flat.numel(), flat.device
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    pend = torch.cumsum(padded, 0)
    pstart, cstart = pend - padded, torch.cumsum(counts, 0) - counts
    e_sorted = flat[order]
    pos = pstart[e_sorted] + torch.arange(p, device=dev) - cstart[e_sorted]
    cap = -(-(p + num_experts * (block_m - 1)) // block_m) * block_m
    rows = torch.full((cap,), p, dtype=torch.int64, device=dev)
    rows[pos] = order
    starts = torch.arange(0, cap, block_m, device=dev)
    blk = torch.searchsorted(pend, starts, right=True)
    return rows, torch.where(blk < num_experts, blk, torch.full_like(blk, -1))


if triton is not None:

    @triton.jit
    def _moe_kernel(
        a_ptr,  # activations [P, K], one row per pair
        w_ptr,  # uint8 [E, N, K/2]
        sz_ptr,  # [E, N, R, G]
        c_ptr,  # out [P, N]
        rows_ptr,  # [blocks * BLOCK_M] pair ids, sentinel P
        blk_ptr,  # [blocks] expert per block, -1 unused
        P,
        N,
        kb: tl.constexpr,
        ng: tl.constexpr,
        G: tl.constexpr,
        R: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        F32_DOT: tl.constexpr,
    ):
        HG: tl.constexpr = G // 2
        pid_m = tl.program_id(0)
        e = tl.load(blk_ptr + pid_m)
        rows = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        rmask = rows < P  # a block past the used ones holds only the sentinel P
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        # ... and reads no weights. The block's flag as a vector: Triton 3.9's interpreter fails
        # on a mask made from a vector and a scalar ("mask has unsupported dtype").
        cmask = (cols < N) & (tl.zeros_like(cols) + e >= 0)
        e = tl.maximum(e, 0)
        w_base = w_ptr + e * N * kb
        s_base = sz_ptr + e * N * (R * ng)
        jj = tl.arange(0, HG)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g in range(ng):  # one group of G inputs (HG bytes) per step
            j = g * HG + jj
            arow = a_ptr + rows[:, None] * (2 * kb) + 2 * j[None, :]
            ae = tl.load(arow, mask=rmask[:, None], other=0.0)  # even inputs [BLOCK_M, HG]
            ao = tl.load(arow + 1, mask=rmask[:, None], other=0.0)  # odd inputs
            wb = tl.load(w_base + cols[:, None] * kb + j[None, :], mask=cmask[:, None], other=0).to(tl.int32)
            s = tl.load(s_base + cols * (R * ng) + g, mask=cmask, other=0.0).to(tl.float32)
            if R == 2:
                c = tl.load(s_base + cols * (R * ng) + ng + g, mask=cmask, other=0.0).to(tl.float32)
            else:
                c = -8.0 * s
            lo = ((wb & 15).to(tl.float32) * s[:, None] + c[:, None]).to(ae.dtype)  # [BLOCK_N, HG]
            hi = ((wb >> 4).to(tl.float32) * s[:, None] + c[:, None]).to(ae.dtype)
            if F32_DOT:  # Triton's interpreter multiplies bf16 wrongly: widen there (tests only)
                acc += tl.dot(ae.to(tl.float32), tl.trans(lo.to(tl.float32)))
                acc += tl.dot(ao.to(tl.float32), tl.trans(hi.to(tl.float32)))
            else:
                acc += tl.dot(ae, tl.trans(lo))
                acc += tl.dot(ao, tl.trans(hi))
        dst = c_ptr + rows[:, None] * N + cols[None, :]
        tl.store(dst, acc.to(c_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def grouped(a: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group: int, rows, blk) -> torch.Tensor:
    """a [P, K] (row p for pair p) through each pair's expert: [P, N]. `packed` [E, N, K/2] and
    `sz` [E, N, R, G] stacked over the experts; `rows`, `blk` from `align`."""
    e, n, kb = packed.shape
    if a.dtype not in (torch.bfloat16, torch.float16) or a.shape[1] != 2 * kb or group < 32:
        raise ValueError("grouped INT4 matmul takes bf16/fp16 activations of the weights' width, groups >= 32")
    a = a.contiguous()
    out = torch.empty(a.shape[0], n, dtype=a.dtype, device=a.device)
    grid = (blk.numel(), triton.cdiv(n, BLOCK_N))
    _moe_kernel[grid](
        a,
        packed,
        sz,
        out,
        rows,
        blk,
        a.shape[0],
        n,
        kb=kb,
        ng=2 * kb // group,
        G=group,
        R=sz.shape[2],
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        F32_DOT=os.environ.get("TRITON_INTERPRET") == "1",
    )
    return out


def moe_experts(x: torch.Tensor, idx: torch.Tensor, scores: torch.Tensor, stacks: dict, group: int) -> torch.Tensor:
    """Sum over each token's k chosen experts of expert(x * score), [T, D], as MoE.forward's
    routed part: `stacks[proj]` = (packed, scales) for gate_proj, up_proj and down_proj."""
    t, k = idx.shape
    rows, blk = align(idx, stacks["gate_proj"][0].shape[0])
    xp = x.repeat_interleave(k, dim=0) * scores.reshape(-1, 1)  # pair p: token p // k, scaled as eager
    gate = grouped(xp, *stacks["gate_proj"], group, rows, blk)
    up = grouped(xp, *stacks["up_proj"], group, rows, blk)
    y = grouped(silu_mul(gate, up), *stacks["down_proj"], group, rows, blk)
    return y.view(t, k, -1).sum(1) if k > 1 else y
