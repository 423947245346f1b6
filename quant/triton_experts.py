"""A decode step's experts in two Triton launches: each row of x through its own expert, chosen
by a device index from stacked INT4 weights, gate and up fused with SwiGLU.

In a captured Scout decode step (llama4_local/graph_decode.py) a MoE layer ran eight INT4 GEMV
launches of 22 MB each (gate, up, down for the shared expert and for the routed one, plus two
SwiGLUs), and on an H200 the GEMVs took 6.1 of 10.6 ms of a token's device time at 21 us each
(docs/benchmarks.md): a one-row GEMV over 8192 x 5120 gives too few programs to keep the
memory system busy. Here the shared expert is one more expert of the stack (index E), so a
layer is:

- `experts_gemv(x, sel, gate, up)`: rows [R, D] (the score-scaled input for each routed expert,
  the plain input for the shared one), row r through expert sel[r]: silu(x W_g^T) * (x W_u^T),
  both products from one pass over x, rounded where the eager path rounds (each product to the
  activations' dtype, then silu, then the product);
- `experts_gemv(h, sel, down)`: [R, D] rows, which the caller sums (graph_decode, fused.py).

Weights are the CPU kernel's layout that quant/triton_int4.py reads (packed uint8 [E, N, K/2],
scales [E, N, R, G]); arithmetic as its GEMV (float32 sums per group, then scale and offset).
"""

from __future__ import annotations

import torch

from .triton_int4 import GEMV_BLOCK_N, GEMV_GPB, GEMV_WARPS, _check, triton

if triton is not None:
    import triton.language as tl

    from .triton_int4 import _group_dots

    @triton.jit
    def _experts_gemv_kernel(
        x_ptr,
        e_ptr,  # int64 [R]: row r's expert
        w_ptr,
        sz_ptr,
        w2_ptr,  # with GLU: the up projection's stacks (w_ptr, sz_ptr: gate's)
        sz2_ptr,
        y_ptr,
        N,
        stride_x,
        stride_y,
        kb: tl.constexpr,
        ng: tl.constexpr,
        G: tl.constexpr,
        R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        GPB: tl.constexpr,
        GLU: tl.constexpr,
    ):
        HG: tl.constexpr = G // 2
        BB: tl.constexpr = GPB * HG
        t = tl.program_id(1)
        e = tl.load(e_ptr + t).to(tl.int64)
        w_ptr += e * N * kb
        sz_ptr += e * N * (R * ng)
        if GLU:
            w2_ptr += e * N * kb
            sz2_ptr += e * N * (R * ng)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        jb = tl.arange(0, BB)
        gi = tl.arange(0, GPB)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in range(tl.cdiv(kb, BB)):
            b0 = i * BB
            j = b0 + jb
            jmask = j < kb
            xe = tl.load(x_ptr + t * stride_x + 2 * j, mask=jmask, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + t * stride_x + 2 * j + 1, mask=jmask, other=0.0).to(tl.float32)
            xs = tl.sum(tl.reshape(xe + xo, (GPB, HG)), axis=1)
            g = b0 // HG + gi
            gm = rmask[:, None] & (g < ng)[None, :]
            acc += _group_dots(w_ptr, sz_ptr, rows, rmask, j, jmask, xe, xo, xs, g, gm, kb, ng, R, BLOCK_N, GPB, HG)
            if GLU:
                acc2 += _group_dots(
                    w2_ptr, sz2_ptr, rows, rmask, j, jmask, xe, xo, xs, g, gm, kb, ng, R, BLOCK_N, GPB, HG
                )
        ty = y_ptr.dtype.element_ty
        if GLU:  # as F.silu(gate) * up on tensors of dtype ty: round, silu, round, multiply
            gate = acc.to(ty).to(tl.float32)
            act = (gate * tl.sigmoid(gate)).to(ty).to(tl.float32)
            acc = act * acc2.to(ty).to(tl.float32)
        tl.store(y_ptr + t * stride_y + rows, acc.to(ty), mask=rmask)


def experts_gemv(
    x: torch.Tensor,
    sel: torch.Tensor,
    packed: torch.Tensor,
    sz: torch.Tensor,
    group_size: int,
    up: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_n: int = GEMV_BLOCK_N,
    gpb: int = GEMV_GPB,
    warps: int = GEMV_WARPS,
    stages: int | None = None,
) -> torch.Tensor:
    """x [R, K] -> [R, N]: row r times expert sel[r]'s weights (stacked [E, N, K/2] and
    [E, N, R, G]); with `up` (the up projection's (packed, scales)), silu(gate) * up instead.
    `sel` is int64 [R] on x's device: no host sync, capturable in a CUDA graph. Block shape,
    warps and `stages` (Triton's pipelining depth; its default where None) as int4_gemv's."""
    n, k, r = _check(packed, sz, group_size)
    if packed.dim() != 3 or sel.shape != (x.shape[0],):
        raise ValueError("experts_gemv takes stacked weights and one expert index per row of x")
    if up is not None and (up[0].shape != packed.shape or up[1].shape != sz.shape):
        raise ValueError("gate and up stacks differ in shape")
    x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    w2, sz2 = up if up is not None else (packed, sz)
    _experts_gemv_kernel[(triton.cdiv(n, block_n), x.shape[0])](
        x,
        sel,
        packed,
        sz,
        w2,
        sz2,
        y,
        n,
        x.stride(0),
        y.stride(0),
        kb=k // 2,
        ng=k // group_size,
        G=group_size,
        R=r,
        BLOCK_N=block_n,
        GPB=gpb,
        GLU=up is not None,
        num_warps=warps,
        **({} if stages is None else {"num_stages": stages}),
    )
    return y
