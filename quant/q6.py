"""Q6: the lm_head in 6 bits for CPU runs (what `quantize` writes beside the checkpoint).

A decoded token reads the whole lm_head: Scout's is 202048 x 5120, 2.07 GB in bf16, 1.10 GB as
Q8_0, and llama.cpp's Q4 files keep it in Q6_K (0.85 GB). Q6 here is 6-bit integers q in
[-32, 31] with one fp16 scale d per block of 32 inputs, w = d * q: 6.5 bits per weight (Q6_K
6.5625), 0.84 GB for Scout's head. The integers are chosen by GPTQ against the head's own
inputs (the final norm's output on the calibration text) with each block's scale fitted as
GPTQ reaches it: on the trained 256-wide model the head then costs +1.4% of mean KL against
the kept bf16 head, where rounding each block on its own costs +3.8% and Q8_0 +0.3%
(docs/benchmarks.md).

Layout, one row of uint8 per output in super-blocks of 128 inputs (four blocks; the last one
padded with zero blocks, scale 0), 104 bytes each: 6.5 bits a weight, one stream to read. The 128
values u = q + 32 (0-63) are stored in the kernel's order (ORDER): four vectors of 32, vector v's
4-byte group l (0-7) holding elements 8 v + 4 (l // 4) .. + 3 of block l % 4, so that each int32
lane of the kernel's 4-byte dot products stays inside one block. Bytes 0-31: vectors 0 (low
nibble) and 1 (high nibble), the low four bits of u; bytes 32-63 the same for vectors 2 and 3;
bytes 64-95: the top two bits of vector v's byte j at bits 2v, 2v + 1 of byte j; bytes 96-103 the
four blocks' scales (fp16, little-endian). The kernel (quant/matvec_kernel.py, `q6_mv`) rebuilds u
with a shift and masks, multiplies it as unsigned bytes against int8-rounded activations
(Q8_0) from -32 x their sum, and scales each lane by its block's d. The first layout (FORMAT_V1:
26 bytes a block of 32, scale beside it) is read by `unpack_v1` and repacked where an older
sidecar holds it.
"""

from __future__ import annotations

import functools
import sys

import torch

BLOCK = 32
SUPER = 128  # inputs a super-block: four blocks
SUPER_BYTES = 104  # per super-block: 64 bytes of low nibbles, 32 of top bits, 8 of scales
BYTES_V1 = 26  # the first layout, per block: 16 low nibbles' bytes, 8 top-bits' bytes, 2 scale bytes
FORMAT, FORMAT_V1 = "q6-128", "q6"  # the sidecar's metadata names its layout
QMIN, QMAX = -32, 31
ROWS = 16384  # GPTQ's rows per pass: at Scout's width two float32 copies of 335 MB, not of 4 GB
# ORDER[p]: which of a super-block's 128 inputs (block-major) sits at the kernel's position p
ORDER = torch.tensor([32 * (g % 4) + 8 * v + 4 * (g // 4) + j for v in range(4) for g in range(8) for j in range(4)])
TOP_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]  # vector v's top bits at bits 2v, 2v + 1


@functools.cache
def constants_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ORDER, TOP_SHIFTS) on `device`, copied there once (no host-to-device copy per call)."""
    return ORDER.to(device), TOP_SHIFTS.to(device)


def row_bytes(k: int) -> int:
    """Bytes of one packed row of k inputs (k a multiple of 32)."""
    return -(-k // SUPER) * SUPER_BYTES


def fit_scales(wg: torch.Tensor) -> torch.Tensor:
    """Scales [R] for blocks wg [R, 32] (any strides): the block's largest magnitude, with its
    sign (the positive one on a tie), to -32 (the grid's far end), then the least-squares scale
    for those integers, rounded to fp16 as stored (returned as float32). An all-zero block gets 1
    (its integers are 0 either way; the walk divides by it), a block holding NaN or infinity NaN."""
    v = wg.float().t()  # [32, R]: GPTQ's groups come as transposed views; reductions run along rows
    top, bottom = v.amax(0), v.amin(0)
    m = torch.where(top >= -bottom, top, bottom)  # NaN where the block has one; +-inf where it has one
    inv = torch.where(m != 0, -32.0 / m, torch.zeros_like(m))
    q = torch.round(v * inv).clamp_(QMIN, QMAX)
    qq, wq = (q * q).sum(0), (v * q).sum(0)
    d = torch.where(qq > 0, wq / qq.clamp(min=1), torch.ones_like(qq))
    # fp16 keeps 2^-24 as its smallest magnitude: a scale under it would round to 0
    d = torch.where(d.abs() < 2.0**-24, torch.full_like(d, 2.0**-24).copysign(d), d)
    return torch.where(torch.isfinite(m), d, torch.full_like(d, float("nan"))).half().float()


def rtn(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], scales float32 [N, K/32]): each block rounded on its own."""
    n, k = w.shape
    v = w.float().reshape(-1, BLOCK)
    d = fit_scales(v)
    q = torch.round(v / d[:, None]).nan_to_num_(0).clamp_(QMIN, QMAX).to(torch.int8)
    return q.reshape(n, k), d.reshape(n, k // BLOCK)


def pack(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """q int8 [N, K] in [QMIN, QMAX] and scales [N, K/32] -> uint8 [N, row_bytes(K)] (the layout above)."""
    n, k = q.shape
    s = -(-k // SUPER)
    qp = torch.zeros(n, s * SUPER, dtype=torch.int8)
    qp[:, :k] = q
    dp = torch.zeros(n, s * SUPER // BLOCK, dtype=torch.float16)
    dp[:, : k // BLOCK] = scales
    u = (qp.view(torch.uint8) + 32).reshape(n, s, SUPER)[..., ORDER].reshape(n, s, 4, 32)  # wraps: q + 32
    low = (u[..., 0::2, :] & 0xF) | ((u[..., 1::2, :] & 0xF) << 4)  # [n, s, 2, 32]
    top = (u >> 4) << TOP_SHIFTS
    top = top[..., 0, :] | top[..., 1, :] | top[..., 2, :] | top[..., 3, :]
    d = dp.view(torch.uint8).reshape(n, s, 4, 2)
    if sys.byteorder != "little":
        d = d.flip(-1)
    return torch.cat([low.reshape(n, s, 64), top, d.reshape(n, s, 8)], dim=-1).reshape(n, -1)


def unpack(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pack's inverse: uint8 [N, row_bytes(K)] -> (q int8 [N, K], scales float32 [N, K/32])."""
    n = w.shape[0]
    b = w.reshape(n, -1, SUPER_BYTES)
    s = b.shape[1]
    low = b[..., :64].reshape(n, s, 2, 1, 32)
    nib = torch.cat([low & 0xF, low >> 4], dim=3).reshape(n, s, 4, 32)
    order, shifts = constants_on(w.device)
    top = (b[..., None, 64:96] >> shifts) & 3
    u = torch.empty(n, s, SUPER, dtype=torch.uint8, device=w.device)
    u[..., order] = (nib | (top << 4)).reshape(n, s, SUPER)
    q = (u - 32).view(torch.int8).reshape(n, -1)[:, :k]  # wraps back: u - 32
    d = b[..., 96:].contiguous().reshape(n, s, 4, 2)
    if sys.byteorder != "little":
        d = d.flip(-1)
    return q.contiguous(), d.contiguous().view(torch.float16).reshape(n, -1)[:, : k // BLOCK].float()


def unpack_v1(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first layout's (FORMAT_V1) inverse: uint8 [N, K/32 * 26], per block of 32 the low
    nibbles as Q4_0 (byte j: element j low, element j + 16 high), the top bits four to a byte (byte
    i: elements i, i + 8, i + 16, i + 24), the fp16 scale -> (q int8 [N, K], scales float32 [N, K/32])."""
    n = w.shape[0]
    b = w.reshape(n, k // BLOCK, BYTES_V1)
    low, high = b[..., :16], b[..., 16:24]
    u_low = torch.cat([low & 0xF, low >> 4], dim=-1)
    u_high = torch.cat([(high >> (2 * m)) & 3 for m in range(4)], dim=-1)
    q = ((u_low | (u_high << 4)) - 32).view(torch.int8)  # wraps back: u - 32
    d = b[..., 24:26].contiguous()
    if sys.byteorder != "little":
        d = d.flip(-1)
    return q.reshape(n, k), d.view(torch.float16).reshape(n, k // BLOCK).float()


def repack_v1(w: torch.Tensor, k: int, chunk: int = ROWS // 8) -> torch.Tensor:
    """The first layout's rows (uint8 [N, K/32 * 26]) in this one (uint8 [N, row_bytes(K)]),
    `chunk` rows at a time: what a run does with a sidecar written before it (a few seconds for
    Scout's head, in anonymous memory)."""
    out = torch.empty(w.shape[0], row_bytes(k), dtype=torch.uint8)
    for r in range(0, w.shape[0], chunk):
        out[r : r + chunk] = pack(*unpack_v1(w[r : r + chunk], k))
    return out


def dequantize(w: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [N, K] weight a packed Q6 matrix stands for, in `dtype` (computed in float32)."""
    q, d = unpack(w, k)
    return (q.float().reshape(q.shape[0], -1, BLOCK) * d[..., None]).reshape(q.shape).to(dtype)


def gptq(w: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """w [N, K] quantized by GPTQ with error feedback f (quant.gptq.error_feedback of its inputs'
    Hessian) to packed Q6, ROWS rows at a time (rows are independent: the same result)."""
    from .gptq import gptq_walk

    out = torch.empty(w.shape[0], row_bytes(w.shape[1]), dtype=torch.uint8)  # filled in place: no second copy
    for r in range(0, w.shape[0], ROWS):
        q, scales, _ = gptq_walk(w[r : r + ROWS], f, BLOCK, lambda wg: (fit_scales(wg), None), QMIN, QMAX)
        out[r : r + ROWS] = pack(q.t(), scales.t())
    return out
