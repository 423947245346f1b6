"""INT4 on CUDA with Triton, reading the CPU kernel's layout (so one host copy serves both).

The weights stay as compressed-tensors stores them: `packed`, uint8 [N, K/2] (byte j of a row
holds input 2j in its low nibble and 2j + 1 in its high one: the int32 words viewed as bytes),
and `scales_and_zeros` as `quant.cpu_kernel.pack_scales` gives it: [N, 1, G] scales (bf16 where
the checkpoint stores bf16) for symmetric weights, or float32 [N, 2, G] scales then constants
c = o - 8 s. Weight = s * u + c with u the unsigned nibble (c = -8 s when symmetric).

- `int4_gemv`: a few rows (decode): each program reads BLOCK_N rows of packed weights once per
  activation row, GPB groups per step, and sums in float32. It reads the weights in place,
  without a repack, where the stock `_weight_int4pack_mm` streams 0.75-0.8 TB/s at one row on an
  H200 (docs/benchmarks.md).
- `int4_dequant`: the weight into a dense [N, K] matrix of the activations' dtype; more rows
  then take one dense GEMM. The stock kernel falls to 3.7 GB/s of packed weights at 2048 rows,
  25x slower than the bf16 GEMM alone. Each packed byte becomes one output word holding its
  two weights, so loads and stores are contiguous (a first version with two strided stores
  per byte and 2-D tiles ran at 166 GB/s on the H200: 0.64 ms per 8192 x 5120 matrix).

Triton is in PyTorch's CUDA wheels; without it (`available()` False) CUDA keeps the stock
kernel. Set TRITON_INTERPRET=1 before import to run these kernels on CPU tensors (tests).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU wheels of torch come without Triton
    triton = None

GEMV_MAX_ROWS = 4  # more rows: dequantize once, then one GEMM
GEMV_BLOCK_N, GEMV_GPB, GEMV_WARPS = 16, 4, 4  # rows per program, groups per step, warps (best of 7 on an H200)
DEQUANT_BLOCK = 2048  # packed bytes per program


def available() -> bool:
    return triton is not None


def supports(n: int, k: int, group_size: int) -> bool:
    """The shapes these kernels take: whole groups of an even size, a power of two (Triton's
    block shapes) of at least 32."""
    return group_size >= 32 and group_size & (group_size - 1) == 0 and k % group_size == 0 and n > 0


if triton is not None:

    @triton.jit
    def _group_dots(
        w_ptr,
        sz_ptr,
        rows,
        rmask,
        j,
        jmask,
        xe,
        xo,
        xs,
        g,
        gm,
        kb: tl.constexpr,
        ng: tl.constexpr,
        R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        GPB: tl.constexpr,
        HG: tl.constexpr,
    ):
        """One step's contribution [BLOCK_N] of GPB groups to a GEMV: the rows' packed bytes j
        (low nibble input 2j, high 2j + 1) times x's even and odd inputs xe, xo, scaled per group
        (xs: each group's sum of x, for the constant term); shared by _gemv_kernel and
        triton_experts."""
        wb = tl.load(w_ptr + rows[:, None] * kb + j[None, :], mask=rmask[:, None] & jmask[None, :], other=0)
        wb = wb.to(tl.int32)
        lo = (wb & 15).to(tl.float32)
        hi = (wb >> 4).to(tl.float32)
        part = tl.sum(tl.reshape(lo * xe[None, :] + hi * xo[None, :], (BLOCK_N, GPB, HG)), axis=2)
        srow = sz_ptr + rows[:, None] * (R * ng) + g[None, :]
        s = tl.load(srow, mask=gm, other=0.0).to(tl.float32)
        if R == 2:
            c = tl.load(srow + ng, mask=gm, other=0.0).to(tl.float32)
        else:
            c = -8.0 * s
        return tl.sum(s * part + c * xs[None, :], axis=1)

    @triton.jit
    def _gemv_kernel(
        x_ptr,
        w_ptr,
        sz_ptr,
        y_ptr,
        e_ptr,  # with HAS_E: the expert's index (int64 [1], on the device) into stacked weights
        N,
        stride_x,
        stride_y,
        kb: tl.constexpr,  # K / 2: a compile-time loop bound (one build per input width)
        ng: tl.constexpr,
        G: tl.constexpr,
        R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        GPB: tl.constexpr,
        HAS_E: tl.constexpr,
        STEPS: tl.constexpr,  # steps of BB bytes per program: all of K, or K / SPLIT (split-K)
        SPLIT: tl.constexpr,  # > 1: programs along K too, float32 partial sums added atomically
    ):
        HG: tl.constexpr = G // 2  # bytes per group
        if HAS_E:  # stacked [E, N, K/2] and [E, N, R, G]: read expert e's in place, no gather
            e = tl.load(e_ptr)
            w_ptr += e * N * kb
            sz_ptr += e * N * (R * ng)
        BB: tl.constexpr = GPB * HG  # bytes per step
        t = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        jb = tl.arange(0, BB)
        gi = tl.arange(0, GPB)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        first = tl.program_id(2) * STEPS if SPLIT > 1 else 0
        for i in range(STEPS):
            b0 = (first + i) * BB
            j = b0 + jb
            jmask = j < kb
            xe = tl.load(x_ptr + t * stride_x + 2 * j, mask=jmask, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + t * stride_x + 2 * j + 1, mask=jmask, other=0.0).to(tl.float32)
            xs = tl.sum(tl.reshape(xe + xo, (GPB, HG)), axis=1)  # [GPB]: each group's sum of x
            g = b0 // HG + gi
            gm = rmask[:, None] & (g < ng)[None, :]
            acc += _group_dots(w_ptr, sz_ptr, rows, rmask, j, jmask, xe, xo, xs, g, gm, kb, ng, R, BLOCK_N, GPB, HG)
        if SPLIT > 1:  # y is float32 and zeroed: each program adds its share of K
            tl.atomic_add(y_ptr + t * stride_y + rows, acc, mask=rmask)
        else:
            tl.store(y_ptr + t * stride_y + rows, acc.to(y_ptr.dtype.element_ty), mask=rmask)

    @triton.jit
    def _dequant_kernel(
        w_ptr,
        sz_ptr,
        out_ptr,  # the output viewed as one word per packed byte: int32 (16-bit types) or int64
        total,  # N * K / 2 packed bytes
        kb: tl.constexpr,
        ng: tl.constexpr,
        G: tl.constexpr,
        R: tl.constexpr,
        KIND: tl.constexpr,  # 0 bf16, 1 fp16, 2 float32
        BLOCK: tl.constexpr,
    ):
        # One packed byte -> its two weights, stored as one word: every load and store contiguous.
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < total
        wb = tl.load(w_ptr + i, mask=m, other=0).to(tl.int32)
        row = i // kb
        sidx = row * (R * ng) + (2 * (i - row * kb)) // G
        s = tl.load(sz_ptr + sidx, mask=m, other=0.0).to(tl.float32)
        if R == 2:
            c = tl.load(sz_ptr + sidx + ng, mask=m, other=0.0).to(tl.float32)
        else:
            c = -8.0 * s
        lo = (wb & 15).to(tl.float32) * s + c
        hi = (wb >> 4).to(tl.float32) * s + c
        if KIND == 2:
            lo_bits = lo.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
            word = lo_bits | (hi.to(tl.int32, bitcast=True).to(tl.int64) << 32)
        else:
            ty = tl.bfloat16 if KIND == 0 else tl.float16
            lo_bits = lo.to(ty).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            word = lo_bits | (hi.to(ty).to(tl.int16, bitcast=True).to(tl.int32) << 16)
        tl.store(out_ptr + i, word, mask=m)


def _check(packed: torch.Tensor, sz: torch.Tensor, group_size: int) -> tuple[int, int, int]:
    """(N, K, R) of weights [N, K/2] with scales [N, R, G], or stacked ones [E, N, K/2], [E, N, R, G]."""
    n, kb = packed.shape[-2:]
    if packed.dtype != torch.uint8 or not packed.is_contiguous() or not sz.is_contiguous():
        raise ValueError("int4 triton kernels take contiguous uint8 [N, K/2] weights and [N, R, G] scales")
    r = sz.shape[-2]
    if sz.shape[-3:] != (n, r, 2 * kb // group_size) or r not in (1, 2) or sz.shape[:-3] != packed.shape[:-2]:
        raise ValueError(f"scales {tuple(sz.shape)} do not fit weights {tuple(packed.shape)} at group {group_size}")
    return n, 2 * kb, r


def int4_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    sz: torch.Tensor,
    group_size: int,
    block_n: int = GEMV_BLOCK_N,
    gpb: int = GEMV_GPB,
    warps: int = GEMV_WARPS,
    stages: int | None = None,
    expert: torch.Tensor | None = None,
    split: int = 1,
) -> torch.Tensor:
    """x [T, K] -> [T, N] in x's dtype, reading the packed weights once per row of x. With
    `expert` (int64 [1] on x's device), `packed` and `sz` are stacked over experts and the kernel
    reads that expert's in place (no host sync, no copy: what a captured decode step needs).
    `split` > 1 also splits K over that many programs (more of them in flight for one row),
    adding float32 partial sums atomically: not bitwise repeatable. `stages`: Triton's software
    pipelining depth for the loop over K (its default where None)."""
    n, k, r = _check(packed, sz, group_size)
    if (expert is None) != (packed.dim() == 2):
        raise ValueError("stacked weights need an expert index, and an expert index stacked weights")
    x = x.contiguous()
    if split > 1:  # partial sums in float32, added atomically (so not bitwise repeatable)
        y = torch.zeros(x.shape[0], n, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    steps = triton.cdiv(triton.cdiv(k // 2, gpb * group_size // 2), split)
    grid = (triton.cdiv(n, block_n), x.shape[0], split)
    e = expert if expert is not None else y  # unread without HAS_E
    _gemv_kernel[grid](
        x,
        packed,
        sz,
        y,
        e,
        n,
        x.stride(0),
        y.stride(0),
        kb=k // 2,
        ng=k // group_size,
        G=group_size,
        R=r,
        BLOCK_N=block_n,
        GPB=gpb,
        HAS_E=expert is not None,
        STEPS=steps,
        SPLIT=split,
        num_warps=warps,
        **({} if stages is None else {"num_stages": stages}),
    )
    return y if split == 1 else y.to(x.dtype)


def int4_dequant(packed: torch.Tensor, sz: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] in `dtype` (bf16, fp16 or float32)."""
    n, k, r = _check(packed, sz, group_size)
    if packed.dim() != 2:
        raise ValueError("int4_dequant takes one weight, not a stack")
    kind = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}[dtype]
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    words = out.view(torch.int64 if kind == 2 else torch.int32)  # [N, K/2]: one word per packed byte
    total = n * k // 2
    grid = (triton.cdiv(total, DEQUANT_BLOCK),)
    _dequant_kernel[grid](
        packed, sz, words, total, kb=k // 2, ng=k // group_size, G=group_size, R=r, KIND=kind, BLOCK=DEQUANT_BLOCK
    )
    return out


def int4_matmul_triton(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [T, K] @ W^T: the GEMV for up to GEMV_MAX_ROWS rows, else dequantize and one GEMM."""
    if x.shape[0] <= GEMV_MAX_ROWS:
        return int4_gemv(x, packed, sz, group_size)
    return torch.nn.functional.linear(x, int4_dequant(packed, sz, group_size, x.dtype))
