"""GPTQ: INT4 weights chosen for the inputs they will see (Frantar et al., 2022, arXiv:2210.17323).

Given H = E[x x^T] over a linear's calibration inputs, GPTQ quantizes one input column at a time
and spreads each column's rounding error over the columns not yet quantized, in the direction
that H says costs least, so the output error ||(W - Q) x||^2 is what is minimised rather than
||W - Q||^2. The spreading is written in its feedback (LDL) form (error_feedback: one Cholesky
factor of H, where the paper's form takes three); columns go in blocks with the trailing update
as one matrix product (the paper's "lazy batch" form) and the walk inside a block in C++
(quant/gptq_kernel.py); a group's scale (and zero) is fitted, with the plain fit of
quant/int4.py, to the group's columns as GPTQ's update leaves them when the walk reaches the
group. The result is an ordinary compressed-tensors pack-quantized weight: only which integers
are stored changes.

Rows are independent (each row's error moves along its own columns), so a fused gate/up pair
sharing one input is one call. On the trained 256-wide model this takes the mean KL of every
expert, shared expert and attention projection at INT4 group 128 from 0.0103 (the plain fit) to
0.0039, half of llama.cpp Q4_K_M's (docs/benchmarks.md).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from . import cpu_kernel
from .gptq_lowrank import LowRankFeedback
from .int4 import QMAX, QMIN, SYM_RATIOS, Int4Weight, _grouped, fit_scales, pack_int4_transposed
from .int8_forward import activation_qmax, activations_narrow

DAMP = 0.01  # added to H's diagonal, as a fraction of its mean: keeps rarely seen directions stable


@torch.inference_mode()  # h may be a sum made under it (calibration), consumed in place
def error_feedback(h: torch.Tensor, damp: float = DAMP, consume: bool = False) -> torch.Tensor:
    """GPTQ's error feedback for inputs with second moment H: float32 [N, N], strictly lower
    triangular, entry [k, j] the share of column j's rounding error (original minus quantized)
    that column k > j takes on before it is rounded (compute it once for the linears that share
    an input). Only H's lower triangle is read (add_gram's blocks need no mirror), and any
    positive multiple of H gives the same feedback (a sum needs no division by its count).
    Inputs never seen (a zero diagonal) get a unit diagonal: their columns are rounded on their
    own.

    This is GPTQ's update written as QuIP's LDLQ (Chee et al., 2023, arXiv:2307.13304, Theorem 6):
    with H = R R^T, R upper triangular (the Cholesky factor of H with its order reversed), the
    feedback is R^T with each row divided by its diagonal, less I. One Cholesky factor instead of
    the three (factor, invert, factor the inverse) that the paper's inverse-Hessian form takes:
    the same updates, a quarter of the arithmetic. (Walking the columns last to first would take
    the plain factor, but measured worse: KL 0.0044 against 0.0039 on the trained 256-wide model.)

    `consume`: h (float32, contiguous) is the caller's to lose: it is reordered in place instead
    of copied (at Scout's widths 268 MB less to allocate per Hessian)."""
    if not hessian_finite(h):
        raise ValueError("the calibration inputs hold NaN or infinity")
    reuse = consume and h.dtype == torch.float32 and h.is_contiguous()
    # Reversed, H's lower triangle is m's upper one.
    m = _reverse_(h if reuse else h.to(torch.float32, memory_format=torch.contiguous_format, copy=True))
    diag = m.diagonal()
    diag.copy_(damped_diagonal(diag, damp))
    # The damping bounds the condition number by N / damp (8e5 at Scout's widest input), well
    # within float32's reach; float64 finishes the factor all the same where float32 fails.
    # m = U^T U in place (its upper triangle); R = J U^T J, so R^T = J U J: m reversed again.
    f = _reverse_(cholesky_upper_(m))
    f /= f.diagonal().clone()[:, None]  # row k by R[k, k]
    f.diagonal().zero_()
    return f


CHOLESKY_BLOCK = 256


def cholesky_upper_(m: torch.Tensor, block: int = CHOLESKY_BLOCK) -> torch.Tensor:
    """U with m = U^T U, written over m (a contiguous float32 matrix, only its upper triangle
    read; the lower one zeroed); returns m. Left-looking by rows of `block`: each row block
    takes the rows above it in one matrix product (_sub_products), then its diagonal block's
    factor, and its part right of the diagonal a triangular solve with that factor. Nearly all
    of the arithmetic is the products, with a long inner dimension, row-major: at 8192 on two
    Zen 4 threads 1.13-1.19 s against LAPACK's 1.35 (torch.linalg.cholesky) with MKL's GEMM;
    on two Zen 3 threads with the extension's tiles 1.4-1.7 s against LAPACK's 1.9-2.1. A
    diagonal block that float32 cannot factor (not positive definite after rounding) sends the
    rest of the matrix to float64."""
    n = m.shape[0]
    for j0 in range(0, n, block):
        j1 = min(j0 + block, n)
        rows = m[j0:j1, j0:]  # [b, n - j0]: the diagonal block, then what lies right of it
        if j0:
            _sub_products(m[:j0, j0:j1], m[:j0, j0:], rows)
        try:
            diag = torch.linalg.cholesky(rows[:, : j1 - j0], upper=True)
        except torch.linalg.LinAlgError:
            if j0:  # back to m's own rows, then the trailing matrix in float64
                rows.addmm_(m[:j0, j0:j1].mT, m[:j0, j0:])
            _finish_double(m, j0)
            break
        rows[:, : j1 - j0] = diag
        if j1 < n:  # right of it: diag^T X = rows, solved as X^T diag = rows^T (column-major for BLAS)
            right = rows[:, j1 - j0 :]
            right.copy_(torch.linalg.solve_triangular(diag, right.mT, upper=True, left=False).mT)
    return m.triu_()


def _sub_products(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> None:
    """c -= a^T b: the factor's rows above a row block times their columns. On the CPU in the
    extension's FMA tiles (quant/chol_kernel.py: 1.2-1.4x MKL's float32 GEMM on two Zen 3 cores),
    elsewhere torch's addmm."""
    if c.device.type == "cpu" and c.dtype == torch.float32 and cpu_kernel.available():
        cpu_kernel.gemm_tn_sub(a, b, c)
    else:
        c.addmm_(a.mT, b, alpha=-1)


def _finish_double(m: torch.Tensor, j0: int) -> None:
    """Rows j0 on of cholesky_upper_'s factor in float64: the trailing matrix less what the rows
    above give it, factored (LinAlgError if it is not positive definite either)."""
    above = m[:j0, j0:].double()
    rest = m[j0:, j0:].double().triu_()
    rest = rest + rest.triu(1).mT - above.mT @ above
    m[j0:, j0:] = torch.linalg.cholesky(rest, upper=True).float()


def damped_diagonal(diag: torch.Tensor, damp: float) -> torch.Tensor:
    """H's diagonal as GPTQ factors it: inputs never seen (a zero diagonal) get a unit one, then
    damp times the mean is added to every entry (error_feedback and gptq_lowrank alike)."""
    d = torch.where(diag > 0, diag, torch.ones_like(diag))
    return d.add_(damp * d.mean())


def _reverse_(t: torch.Tensor) -> torch.Tensor:
    """A contiguous square matrix's rows and columns put in reverse order, in place (its flat data
    reversed); returns it. On the CPU through numpy, a few MB at a time: memory speed, where
    torch's flip (the copy it makes) took 0.65-0.85 s at 8192 x 8192 float32, 21 s of a 360 s
    slice quantize."""
    if t.device.type != "cpu":
        t.copy_(t.view(-1).flip(0).view(t.shape))
        return t
    v = t.view(-1).numpy()
    n = v.size
    step = 1 << 20
    tmp = np.empty(min(step, n // 2), v.dtype)
    for i in range(0, n // 2, step):  # swap the i-th chunk from the front with its mirror at the back
        k = min(step, n // 2 - i)
        front, back = v[i : i + k], v[n - i - k : n - i]
        tmp[:k] = front
        front[:] = back[::-1]
        back[:] = tmp[:k][::-1]
    return t


def hessian_finite(h: torch.Tensor) -> bool:
    """No NaN or infinity in a second-moment matrix, from its diagonal alone: an input holding one
    puts it on its own diagonal entry, and |H_jk| <= sqrt(H_jj H_kk) bounds every other entry."""
    return bool(torch.isfinite(h.diagonal()).all())


def gptq_int4(
    w: torch.Tensor,
    f: torch.Tensor,
    group_size: int = 128,
    symmetric: bool = True,
    scale_dtype: torch.dtype | None = None,
    iters: int = 4,
    updates: torch.dtype | None = None,
) -> Int4Weight:
    """Quantize w [O, N] for inputs whose second moment H [N, N] (E[x x^T]) has the feedback
    f = error_feedback(H), or f = gptq_lowrank.lowrank_feedback(rows) (the same feedback from the
    rows themselves); scales stored in scale_dtype (default: w's dtype), the integers chosen
    for the scales as stored. `updates`: see gptq_walk."""
    out, inp = w.shape
    scale_dtype = scale_dtype or (w.dtype if w.dtype.is_floating_point else torch.float32)

    def fit(wg):
        return _fit_group(wg, symmetric, scale_dtype, iters)

    fused = _fused_fit(w, group_size, symmetric, scale_dtype, iters)
    q, scales, zeros = gptq_walk(w, f, group_size, fit, QMIN, QMAX, updates, fused)
    return Int4Weight(
        packed=pack_int4_transposed(q),
        scale=scales.t().contiguous().to(scale_dtype),
        zero=None if symmetric else zeros.t().contiguous().to(torch.int8),
        shape=(out, inp),
        group_size=group_size,
    )


def _fused_fit(w: torch.Tensor, group_size: int, symmetric: bool, scale_dtype, iters: int):
    """gptq_walk's `fused` fit where the extension has it (quant/fit_kernel.py, gptq_group_scales:
    the symmetric fit on the CPU, outputs and groups multiples of 8), else None: a group's
    columns as GPTQ sees them and their fit in one pass over 256 outputs at a time. At Scout's
    gate/up width (16384 outputs), two Zen 3 threads: 9.5-13.6 ms a group against 16-22 for
    _as_gptq_sees (an MKL product of K = 128 at a third of its rate, two passes over [128, O])
    and the fit of its result. The same scales as _fit_group's to float32 rounding (the sums
    go in another order), so a near tie between two candidate scales may go the other way."""
    if not (symmetric and w.device.type == "cpu" and w.shape[0] % 8 == 0 and group_size % 8 == 0):
        return None
    if not cpu_kernel.available():
        return None
    tiny = torch.finfo(scale_dtype).tiny

    def fused(state, orig, f_gg):
        lower = _group_inverse(f_gg).tril_(-1)
        s = cpu_kernel.gptq_group_scales(state, orig, lower, SYM_RATIOS, iters)
        return s.to(scale_dtype).float().clamp_min_(tiny), None  # as fit_scales stores it

    return fused


def gptq_walk(w: torch.Tensor, f: torch.Tensor, group_size: int, fit, qmin: int, qmax: int, updates=None, fused=None):
    """GPTQ's walk of w [O, N] onto a grid of integers [qmin, qmax] with one scale (and zero) per
    output and group of `group_size` inputs: fit(wg [O, g]) gives a group's (scales [O], zeros
    [O] or None for 0), as stored, from its columns as GPTQ's update leaves them. Returns (q int8
    [N, O], scales float32 [G, O], zeros float32 [G, O]): INT4 (gptq_int4) and Q6 (quant/q6.py).

    `updates`: the precision of the products that carry a block's errors to the later columns,
    nearly all of GPTQ's arithmetic (O N^2 / 2 multiply-adds). float32: each block's errors
    added to every later column at once (right-looking, as the paper). bfloat16 (the default
    where the CPU multiplies bf16 natively, 2-3x float32's speed there): the feedback and the
    errors rounded to bf16, and each pair of blocks receives every earlier block's errors in one
    product just before it is walked, the pair's second block its first's in a small one
    (left-looking: a long inner dimension and 256 rows, which bf16 GEMMs need to run fast;
    float32 accumulation, the block's columns kept in float32). The rounding moves an
    update by 2^-9 of itself, against a rounding step of the grid that is most of a weight.
    int8 (the default on other CPUs with the extension, where float32 would be the only other
    way): right-looking as float32, each block's product in quant/int8_gemm_kernel.py's int8
    GEMM (_Int8Updates: about 1.6x float32's multiply-adds a second on Zen 3), the feedback and
    errors rounded to 7 or 8 bits per later column and per output over the block: it moves the
    output error by a few tenths of a percent either way (tests/test_gptq.py). The rows' feedback
    (quant/gptq_lowrank.py) is always left-looking, in its own products of the same precision.

    `fused`: fused(state, orig, f_gg) gives a group's (scales, zeros) from the walk's state, the
    original columns and the group's own feedback directly, in place of _as_gptq_sees then fit
    (_fused_fit)."""
    out, inp = w.shape
    _grouped(w[:1], group_size)  # validate the shape
    if f.shape != (inp, inp):
        raise ValueError(f"H is {tuple(f.shape)} for a weight with {inp} inputs")
    f = f.to(w.device)
    updates = updates or default_updates(w.device)
    lowrank = isinstance(f, LowRankFeedback)  # always left-looking, in `updates`' products
    if lowrank and updates == torch.int8 and not LowRankFeedback.int8_available(w.device):
        updates = torch.float32
    left = lowrank or updates == torch.bfloat16
    q = torch.empty(inp, out, dtype=torch.int8, device=w.device)
    groups = inp // group_size
    scales = torch.empty(groups, out, device=w.device)
    zeros = torch.zeros(groups, out, device=w.device)
    block = group_size * -(-128 // group_size)  # whole groups
    ahead_buf = None if fused is not None else _rows(group_size, out, torch.float32, w.device)
    if left:  # each block's columns are read from w when it is reached: no transposed copy of w
        # One set of block buffers for the whole walk (fresh ones per block cost as much again).
        ob_buf, wb_buf, err_buf = (_rows(block, out, torch.float32, w.device) for _ in range(3))
        if lowrank:
            upd = _rows(block, out, torch.float32 if updates == torch.int8 else updates, w.device)
        else:
            f_low = f.to(torch.bfloat16)
            errs = _rows(inp, out, torch.bfloat16, w.device)  # every walked column's error
            upd = _rows(2 * block, out, torch.bfloat16, w.device)  # a pair of blocks' share
            near = _rows(block, out, torch.bfloat16, w.device)  # a pair's second block's share of its first
    else:
        wt = _rows(inp, out, torch.float32, w.device)  # [N, O]: an input column per row, updated in place
        orig = torch.empty(inp, out, device=w.device)
        _transposed(w, wt, orig)
        err_buf = _rows(block, out, torch.float32, w.device)
    walk = _walk_kernel if w.device.type == "cpu" and cpu_kernel.available() else _walk_torch
    int8 = _Int8Updates(wt, f, block) if not left and updates == torch.int8 else None
    for b0 in range(0, inp, block):
        b1 = min(b0 + block, inp)
        n = b1 - b0
        if left:
            ob = _transposed(w[:, b0:b1], ob_buf[:n])  # [block, O]
            wb = wb_buf[:n]
            if lowrank:  # every earlier column's error, through the running sum
                torch.add(ob, f.update(b0, b1, updates, out=upd[:n]), out=wb)
            else:  # every earlier column's error (products rounded to bf16, then added)
                s0 = b0 - b0 % (2 * block)  # pairs of blocks take what came before them in one product
                if b0 == s0 and b0:  # (256 rows: 9% faster than 128 at Scout's widths)
                    s1 = min(b0 + 2 * block, inp)
                    torch.mm(f_low[b0:s1, :b0], errs[:b0], out=upd[: s1 - b0])
                if s0:
                    torch.add(ob, upd[b0 - s0 : b1 - s0], out=wb)
                else:
                    wb.copy_(ob)
                if b0 > s0:  # the second of a pair: the first one's errors too
                    wb.add_(torch.mm(f_low[b0:b1, s0:b0], errs[s0:b0], out=near[:n]))
        else:
            ob, wb = orig[b0:b1], wt[b0:b1]
        fb = f.block(b0, b1) if lowrank else f[b0:b1, b0:b1].contiguous()
        qb = q[b0:b1]
        err = err_buf[:n].copy_(ob)  # the original columns, less what they round to
        for i in range(0, n, group_size):
            g, j = (b0 + i) // group_size, i + group_size
            if fused is not None:
                sg, zg = fused(wb[i:j], err[i:j], fb[i:j, i:j])
            else:
                sg, zg = fit(_as_gptq_sees(wb[i:j], err[i:j], fb[i:j, i:j], ahead_buf).t())
            scales[g] = sg
            if zg is not None:
                zeros[g] = zg
            walk(wb, err, fb, scales[g], zeros[g], qb, i, j, qmin, qmax)
        if lowrank:
            f.record(b0, b1, err, updates)
        elif left:
            errs[b0:b1] = err
        elif int8 is not None:
            int8.walked(b0, b1, err)
        elif b1 < inp:
            wt[b1:].addmm_(f[b1:, b0:b1], err)  # every later column, at once
    return q, scales, zeros


SPAN_BLOCKS = 4  # int8 updates: columns past a span of this many blocks get the span's errors at once


class _Int8Updates:
    """gptq_walk's int8 updates of wt [N, O] (right-looking): f [M, n] rounded per later column
    (row) over each block to the forward's activation levels (int8_forward.activation_qmax: 63
    where the maddubs kernel pairs steps), a block's errors per output to as many levels as
    int8_gemm sums exactly (63 with maddubs), the int32 sums scaled back in float32 and added.

    Columns inside the current span of SPAN_BLOCKS blocks get each block's errors as it is
    walked; columns past it get the whole span's, one block after another, in one pass when the
    span ends (int8_gemm's groups: the same float additions in the same order, so the same
    result). Each update reads and writes every later column of wt ([N, O] float32: 335 MB for a
    routed expert's gate and up at Scout's widths), so one pass per span instead of per block
    is a quarter of that memory traffic: two Zen 3 threads multiplied 88-89 GMAC/s with one
    block (128 inputs, threads taking rows) against 115-116 with four (512, threads taking
    panels) into a [4096, 16384] output."""

    def __init__(self, wt: torch.Tensor, f: torch.Tensor, block: int):
        self.wt, self.f, self.span = wt, f, block * SPAN_BLOCKS
        self.levels = activation_qmax()
        self.narrow = activations_narrow()
        self.done: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # the span's blocks

    def walked(self, b0: int, b1: int, err: torch.Tensor) -> None:
        """Block [b0, b1) is walked, its errors err [n, O]: update what lies after it."""
        n = self.wt.shape[0]
        s1 = min(n, (b0 // self.span + 1) * self.span)  # the span's end
        packed, sums, es = cpu_kernel.int8_packed_cols(err)
        if b1 < s1:  # the span's later columns, now
            fq, fs, _ = cpu_kernel.int8_rows(self.f[b1:s1, b0:b1], self.levels)
            cpu_kernel.int8_gemm(fq, packed, sums, fs, es, self.wt[b1:s1], narrow=self.narrow, add=True)
        self.done.append((b0, b1, packed, sums, es))
        if b1 < s1 or s1 == n:
            return
        lefts = [cpu_kernel.int8_rows(self.f[s1:, c0:c1], self.levels)[:2] for c0, c1, *_ in self.done]
        cpu_kernel.int8_gemm_add_groups(lefts, [d[2:] for d in self.done], self.wt[s1:], self.narrow)
        self.done.clear()


def default_updates(device: torch.device) -> torch.dtype:
    """bf16 updates on a CPU that multiplies bf16 natively, int8 on other CPUs where the extension
    is built (LLAMA4_LOCAL_NO_INT8_UPDATES=1: float32), float32 elsewhere (gptq_int4)."""
    if device.type != "cpu":
        return torch.float32
    if cpu_kernel.native_bf16():
        return torch.bfloat16
    if cpu_kernel.available() and not os.environ.get("LLAMA4_LOCAL_NO_INT8_UPDATES"):
        return torch.int8
    return torch.float32


def _walk_torch(wb, err, fb, s, z, qb, i0: int, i1: int, qmin: int, qmax: int) -> None:
    """Columns [i0, i1) of a block: rounded to the grid (s, z, [qmin, qmax]), their errors kept in
    err, each error fed to the block's later columns (quant/gptq_kernel.py does the same in C++)."""
    for i in range(i0, i1):
        qi = torch.clamp(torch.round(wb[i] / s + z), qmin, qmax)
        qb[i] = qi.to(torch.int8)
        e = err[i].sub_(s * (qi - z))
        wb[i + 1 :].addr_(fb[i + 1 :, i], e)


def _walk_kernel(wb, err, fb, s, z, qb, i0: int, i1: int, qmin: int, qmax: int) -> None:
    cpu_kernel.gptq_columns(wb, err, fb, s, z, qb, i0, i1, qmin, qmax)


def _transposed(w: torch.Tensor, out: torch.Tensor, out2: torch.Tensor | None = None) -> torch.Tensor:
    """out (and out2) = w^T in float32; returns out. On the CPU the extension's blocked transpose
    (quant/gptq_kernel.py: a bf16 8192 x 5120 weight into two copies 0.03 s, against 0.16 s for
    torch's strided copies, 0.25 s widened first), elsewhere torch's converting copy (no widened
    temporary of the whole weight on a GPU)."""
    kernel = w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float32) and w.stride(-1) == 1
    if kernel and cpu_kernel.available():
        cpu_kernel.transpose_widen(w, out, out2)
        return out
    out.copy_(w.t())
    if out2 is not None:
        out2.copy_(out)
    return out


def _rows(n: int, width: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised [n, width] buffer whose rows lie 64 bytes further apart than their width:
    at Scout's widths rows 2^k bytes apart all fall in a few cache sets, and a pass down a
    column missed L1 and L2 (GPTQ's column walk ran at a third of its speed)."""
    return torch.empty(n, width + 64 // dtype.itemsize, dtype=dtype, device=device)[:, :width]


def _as_gptq_sees(state: torch.Tensor, orig: torch.Tensor, f: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A group's columns [g, O] as GPTQ's update leaves them when the walk reaches the group
    (f: the group's own feedback [g, g]).

    The feedback form gives each column its share of the errors of the columns walked before
    the group, counting on the group's own columns walked before it to take theirs when they are
    rounded; GPTQ's state is what the columns hold if those round with no error. The group's
    scale is fitted to the latter, as GPTQ fits it: solve (I + F_gg) y = orig - state, then
    orig - y. The solve goes through the small [g, g] inverse and one matrix product, several
    times faster than a triangular solve with O right-hand sides (LAPACK's wants them by column)."""
    return torch.addmm(orig, _group_inverse(f), orig - state, alpha=-1, out=out[: f.shape[0]])


def _group_inverse(f: torch.Tensor) -> torch.Tensor:
    """(I + f)^-1 for a group's own feedback f [g, g] (strictly lower triangular): unit lower
    triangular (_as_gptq_sees, and _fused_fit's kernel takes its part below the diagonal)."""
    eye = torch.eye(f.shape[0], dtype=f.dtype, device=f.device)
    return torch.linalg.solve_triangular(f + eye, eye, upper=False, unitriangular=True)


def _fit_group(wg: torch.Tensor, symmetric: bool, scale_dtype, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [O] for one group's columns wg [O, g], by quant/int4.py's fit, the scale
    rounded to scale_dtype as it will be stored."""
    s, z = fit_scales(wg.unsqueeze(1), symmetric, scale_dtype, iters)  # [O, 1, 1]; wg as it is (a transpose)
    return s.reshape(-1), z.reshape(-1)


GRAM_BLOCK = 256  # add_gram computes blocks of this many columns on and below the diagonal (1024: 7-15% slower)


def _edges(n: int) -> list[int]:
    return list(range(0, n, GRAM_BLOCK)) + [n]


def add_gram(h: torch.Tensor, x: torch.Tensor, accumulate: bool = True, int8: bool = False) -> None:
    """h += x^T x for x [T, N], h float32 [N, N], in the blocks on and below the diagonal only (a
    little over half the products of one matrix product); mirror(h) fills the rest.
    `accumulate=False`: h = x^T x in those blocks (h's old contents unread: no zeroing pass).
    Float32 sums always: a bf16 GEMM rounds its outputs to bf16, and that rounding (2^-9 of the
    largest entries) breaks positive definiteness where one direction dominates the inputs
    (measured: Cholesky failed on the trained 128-wide model's Hessians). bf16 inputs on a CPU
    with AVX512-BF16 take quant/gram_kernel.py (float32 sums at twice the float32 GEMM's rate:
    8192 bf16 rows at Scout's widths 1.6 against 4.0 s on two Zen 4 threads); on CPUs without
    bf16 dot products its float32 form (gram_f32) takes bf16 or float32 inputs; others are
    widened and multiplied by torch.

    `int8`: where quant/int8_gram_kernel.py can take it (the CPUs that would take gram_f32 and
    multiply int8 by maddubs), the Gram of x rounded to int8 per column and group of like rows
    instead, 1.6-2.1x the rate on two Zen 3 cores, for a measured cost in GPTQ's fit (the
    calibration's Hessians: int8_forward.gram_int8; docs/benchmarks.md)."""
    if int8 and x.shape[0] and _int8_gram(h, x):
        cpu_kernel.int8_gram(x, h, GRAM_BLOCK, accumulate)
        return
    if x.shape[0] and _bf16_gram(h, x):
        cpu_kernel.gram_bf16(x, h, GRAM_BLOCK, accumulate)
        return
    if x.shape[0] and _f32_gram(h, x):
        cpu_kernel.gram_f32(x, h, GRAM_BLOCK, accumulate)
        return
    x = x.float()
    edges = _edges(x.shape[1])
    for i0, i1 in zip(edges, edges[1:], strict=False):
        block = h[i0:i1, :i1]  # row block i, columns up to its diagonal
        if accumulate:
            block.addmm_(x[:, i0:i1].t(), x[:, :i1])
        else:
            block.copy_(x[:, i0:i1].t() @ x[:, :i1])


def _bf16_gram(h: torch.Tensor, x: torch.Tensor) -> bool:
    return (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.shape[1] % 64 == 0
        and h.is_contiguous()
        and cpu_kernel.gram_bf16_available()
    )


def _f32_gram(h: torch.Tensor, x: torch.Tensor) -> bool:
    """quant/gram_kernel.py's float32 form (AVX2 FMA; each input packed once where MKL re-packed
    the long operand for every block): on CPUs without bf16 dot products."""
    return (
        x.dtype in (torch.bfloat16, torch.float32)
        and x.device.type == "cpu"
        and x.shape[1] % 16 == 0
        and h.is_contiguous()
        and not cpu_kernel.native_bf16()
        and cpu_kernel.available()
    )


def _int8_gram(h: torch.Tensor, x: torch.Tensor) -> bool:
    return _f32_gram(h, x) and cpu_kernel.int8_gemm_pairs()


def mirror(h: torch.Tensor) -> torch.Tensor:
    """The blocks above the diagonal from those below (after add_gram), in place."""
    edges = _edges(h.shape[0])
    for i0, i1 in zip(edges, edges[1:], strict=False):
        h[:i0, i0:i1] = h[i0:i1, :i0].t()
    return h


def gram_lower(x: torch.Tensor, int8: bool = False) -> torch.Tensor:
    """x^T x [N, N] (float32) for x [T, N] in add_gram's blocks (`int8` as there), the rest of the
    matrix undefined: what error_feedback reads."""
    h = torch.empty(x.shape[1], x.shape[1], device=x.device)
    add_gram(h, x, accumulate=False, int8=int8)
    return h


class HessianSum:
    """Accumulates sum x x^T over a linear's input rows (float32 on x's device) and their count."""

    def __init__(self, int8: bool = False):
        self.sum: torch.Tensor | None = None  # add_gram's blocks; the rest undefined
        self.rows = 0
        self.int8 = int8  # add_gram's

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        first = self.sum is None
        if first:
            self.sum = torch.empty(x.shape[1], x.shape[1], device=x.device)
        add_gram(self.sum, x, accumulate=not first, int8=self.int8)
        self.rows += x.shape[0]

    def mean(self) -> torch.Tensor | None:
        """E[x x^T], or None when no row was seen."""
        return None if self.sum is None else mirror(self.sum.clone()).div_(self.rows)

    def take_lower(self) -> torch.Tensor | None:
        """The sum itself, its lower blocks alone defined (enough for error_feedback, which needs
        no mean either), given up: the accumulator is empty afterwards. None if no row was seen."""
        h, self.sum, self.rows = self.sum, None, 0
        return h
