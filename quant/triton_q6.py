"""The Q6 lm_head (quant/q6.py's packed rows, the sidecar's layout) on CUDA with Triton.

Beside an expert cache on a 24 GB GPU, Scout's bf16 lm_head (1.93 GiB, read whole every token)
takes the room of 29 experts; its Q6 blocks, which CPU runs already read, are 0.78 GiB and cost
+1.4% of mean KL on the trained model (quant/q6.py). `q6_gemv` reads them as stored: each
program takes BLOCK_N rows, walks their super-blocks of 128 inputs (104 bytes: the low nibbles,
the top bits, four fp16 scales), rebuilds the 6-bit integers with shifts and masks, multiplies
them by the activations (permuted once per call into the layout's order, q6.ORDER) and sums
each block of 32 before its scale, in float32. More activation rows than GEMV_MAX_ROWS
(evaluation's logits for every position) dequantize the head a slab of rows at a time into the
activations' dtype and take one GEMM per slab.

Set TRITON_INTERPRET=1 before import to run these kernels on CPU tensors (tests).
"""

from __future__ import annotations

import torch

from . import q6
from .triton_int4 import available, triton

GEMV_MAX_ROWS = 4
BLOCK_N, WARPS = 32, 4  # rows per program, warps (not yet swept on a GPU: bench_triton_int4.py --q6)
SLAB = 8192  # rows dequantized at a time for many activation rows (80 MB of bf16 at Scout's width)

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _q6_gemv_kernel(x_ptr, w_ptr, y_ptr, n, S: tl.constexpr, RB: tl.constexpr, BLOCK_N: tl.constexpr):
        """y[m, rows] = the rows' Q6 weights times x[m] (permuted into the layout's order, zero
        past K), one activation row m per program column."""
        pid, m = tl.program_id(0), tl.program_id(1)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < n
        p = tl.arange(0, 128)  # a super-block's positions in the layout's order
        v, e = p // 32, p % 32
        lo_off, lo_shift = (v // 2) * 32 + e, (v % 2) * 4
        top_off, top_shift = 64 + e, 2 * v
        b = tl.arange(0, 4)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for s in range(S):
            base = w_ptr + rows[:, None].to(tl.int64) * RB + s * 104
            lo = tl.load(base + lo_off[None, :], mask=rmask[:, None], other=0).to(tl.int32)
            top = tl.load(base + top_off[None, :], mask=rmask[:, None], other=0).to(tl.int32)
            u = ((lo >> lo_shift[None, :]) & 15) | (((top >> top_shift[None, :]) & 3) << 4)
            xs = tl.load(x_ptr + m * (S * 128) + s * 128 + p).to(tl.float32)
            prod = (u - 32).to(tl.float32) * xs[None, :]
            # position p = 32 v + 16 (g // 4) + 4 (g % 4) + j sits in block g % 4
            sums = tl.sum(tl.sum(tl.reshape(prod, (BLOCK_N, 8, 4, 4)), axis=3), axis=1)  # [BLOCK_N, 4]
            d0 = tl.load(base + 96 + 2 * b[None, :], mask=rmask[:, None], other=0).to(tl.uint16)
            d1 = tl.load(base + 97 + 2 * b[None, :], mask=rmask[:, None], other=0).to(tl.uint16)
            d = (d0 | (d1 << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            acc += tl.sum(sums * d, axis=1)
        tl.store(y_ptr + m * n + rows, acc, mask=rmask)


_ORDER: dict[torch.device, torch.Tensor] = {}


def _permuted(x: torch.Tensor, supers: int) -> torch.Tensor:
    """x [M, K] as the kernel reads it: float32 [M, supers * 128], each super-block's inputs in
    the layout's order (q6.ORDER), zero past K."""
    xp = torch.zeros(x.shape[0], supers * q6.SUPER, dtype=torch.float32, device=x.device)
    xp[:, : x.shape[1]] = x
    order = _ORDER.get(x.device)
    if order is None:  # once per device: no host-to-device copy per call
        order = _ORDER[x.device] = q6.ORDER.to(x.device)
    return xp.view(x.shape[0], supers, q6.SUPER)[:, :, order].reshape(x.shape[0], -1).contiguous()


def q6_gemv(x: torch.Tensor, packed: torch.Tensor, k: int, block_n: int = BLOCK_N, warps: int = WARPS) -> torch.Tensor:
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
        return q6_gemv(x, packed, k)
    y = torch.empty(x.shape[0], packed.shape[0], dtype=torch.float32, device=x.device)
    for r in range(0, packed.shape[0], SLAB):
        w = q6.dequantize(packed[r : r + SLAB], k, x.dtype)
        y[:, r : r + SLAB] = (x @ w.t()).float()
    return y


__all__ = ["available", "q6_gemv", "q6_matmul"]
