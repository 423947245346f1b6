"""The Q6 lm_head (quant/q6.py's packed rows, the sidecar's layout) on CUDA with Triton.

Beside an expert cache on a 24 GB GPU, Scout's bf16 lm_head (1.93 GiB, read whole every token)
takes the room of 29 experts; its Q6 blocks, which CPU runs already read, are 0.78 GiB and cost
+1.4% of mean KL on the trained model (quant/q6.py). `q6_gemv` reads them as stored: each
program takes BLOCK_N rows, walks their super-blocks of 128 inputs (104 bytes: the low nibbles,
the top bits, four fp16 scales; each byte read once, in 32-byte runs), rebuilds the 6-bit
integers with shifts and masks, multiplies them by the activations (permuted once per call into
the layout's order, q6.ORDER) and sums each block of 32 before its scale, in float32. More
activation rows than GEMV_MAX_ROWS (evaluation's logits for every position) dequantize the head a
slab of rows at a time into the activations' dtype and take one GEMM per slab.

Set TRITON_INTERPRET=1 before import to run these kernels on CPU tensors (tests).
"""

from __future__ import annotations

import torch

from . import q6
from .triton_int4 import available, triton

GEMV_MAX_ROWS = 4
BLOCK_N, WARPS = 32, 4  # rows per program, warps (not yet swept on a GPU: bench_triton_int4.py's q6 rows)
SLAB = 8192  # rows dequantized at a time for many activation rows (80 MB of bf16 at Scout's width)

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _vector(lo, top, xs, v: tl.constexpr, BLOCK_N: tl.constexpr):
        """Vector v's share [BLOCK_N, 4] (by block) of a super-block's products: its 32 6-bit
        integers from their low-nibble plane (lo: the plane's 32 bytes, low or high nibble) and
        the top-bit plane (bits 2v, 2v + 1), less 32, times their activations xs [32]."""
        low = (lo >> (4 * (v % 2))) & 15
        u = low | (((top >> (2 * v)) & 3) << 4)
        prod = (u - 32).to(tl.float32) * xs[None, :]
        # element e of a vector sits in block (e // 4) % 4: e = 16 (g // 4) + 4 (g % 4) + j
        return tl.sum(tl.sum(tl.reshape(prod, (BLOCK_N, 2, 4, 4)), axis=3), axis=1)

    @triton.jit
    def _q6_gemv_kernel(x_ptr, w_ptr, y_ptr, n, S: tl.constexpr, RB: tl.constexpr, BLOCK_N: tl.constexpr):
        """y[m, rows] = the rows' Q6 weights times x[m] (permuted into the layout's order, zero
        past K), one activation row m per program column. Each super-block's 104 bytes are read
        once, as three 32-byte runs a row (the two low-nibble planes, the top bits) and the scales."""
        pid, m = tl.program_id(0), tl.program_id(1)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows[:, None] < n
        e = tl.arange(0, 32)
        b = tl.arange(0, 4)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for s in range(S):
            base = w_ptr + rows[:, None].to(tl.int64) * RB + s * 104
            lo01 = tl.load(base + e[None, :], mask=rmask, other=0).to(tl.int32)  # vectors 0 and 1
            lo23 = tl.load(base + 32 + e[None, :], mask=rmask, other=0).to(tl.int32)  # vectors 2 and 3
            top = tl.load(base + 64 + e[None, :], mask=rmask, other=0).to(tl.int32)
            xb = x_ptr + m * (S * 128) + s * 128 + e
            sums = _vector(lo01, top, tl.load(xb), 0, BLOCK_N)
            sums += _vector(lo01, top, tl.load(xb + 32), 1, BLOCK_N)
            sums += _vector(lo23, top, tl.load(xb + 64), 2, BLOCK_N)
            sums += _vector(lo23, top, tl.load(xb + 96), 3, BLOCK_N)
            d0 = tl.load(base + 96 + 2 * b[None, :], mask=rmask, other=0).to(tl.uint16)
            d1 = tl.load(base + 97 + 2 * b[None, :], mask=rmask, other=0).to(tl.uint16)
            d = (d0 | (d1 << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            acc += tl.sum(sums * d, axis=1)
        tl.store(y_ptr + m * n + rows, acc, mask=rows < n)


def _permuted(x: torch.Tensor, supers: int) -> torch.Tensor:
    """x [M, K] as the kernel reads it: float32 [M, supers * 128], each super-block's inputs in
    the layout's order (q6.ORDER), zero past K."""
    xp = torch.zeros(x.shape[0], supers * q6.SUPER, dtype=torch.float32, device=x.device)
    xp[:, : x.shape[1]] = x
    order = q6.constants_on(x.device)[0]
    return xp.view(x.shape[0], supers, q6.SUPER)[:, :, order].reshape(x.shape[0], -1).contiguous()


def q6_gemv(x: torch.Tensor, packed: torch.Tensor, block_n: int = BLOCK_N, warps: int = WARPS) -> torch.Tensor:
    """x [M, K] (any float dtype) times the Q6 rows packed [N, q6.row_bytes(K)] (on x's device):
    [M, N] float32."""
    n, rb = packed.shape
    supers = rb // q6.SUPER_BYTES
    xp = _permuted(x, supers)
    y = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, block_n), x.shape[0])
    _q6_gemv_kernel[grid](xp, packed, y, n, S=supers, RB=rb, BLOCK_N=block_n, num_warps=warps)
    return y


def q6_matmul(x: torch.Tensor, packed: torch.Tensor, k: int) -> torch.Tensor:
    """x [M, K] times the Q6 rows: [M, N] float32; a few rows by q6_gemv, more by slabs of the
    head dequantized into x's dtype, one GEMM each."""
    if x.shape[0] <= GEMV_MAX_ROWS:
        return q6_gemv(x, packed)
    y = torch.empty(x.shape[0], packed.shape[0], dtype=torch.float32, device=x.device)
    for r in range(0, packed.shape[0], SLAB):
        w = q6.dequantize(packed[r : r + SLAB], k, x.dtype)
        y[:, r : r + SLAB] = (x @ w.t()).float()
    return y


__all__ = ["available", "q6_gemv", "q6_matmul"]
