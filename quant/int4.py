"""Group-wise INT4 quantization of a weight [out, in] (groups of `group_size` along `in`).

The values follow compressed-tensors' "pack-quantized" convention, so what we write is what
vLLM reads: integers q in [-8, 7]; w ~= scale * (q - zero) with zero = 0 when symmetric;
`pack_int4` stores q + 8 in 4 bits, 8 consecutive inputs per int32, lowest nibble first;
asymmetric zero points are integers in [-8, 7] packed the same way along `out`.

Calibration-free, but better than round-to-nearest: every group's scale (and zero) is chosen
to minimise the squared reconstruction error: a search over clipping ratios, then alternating
rounding and least-squares refits of the scale (and zero), keeping the best.

Shapes: O outputs, N inputs, G = N / group_size groups per row, g = group_size.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

QMIN, QMAX = -8, 7
GROUP_SIZES = (32, 64, 128)
# Clipping ratios tried per group (of the min-max range). Finer grids gain under 0.5% error.
SYM_RATIOS = [0.55 + 0.05 * i for i in range(11)]  # 0.55 .. 1.05
ASYM_RATIOS = [0.7, 0.8, 0.9, 1.0]
CHUNK_ELEMENTS = 1 << 19  # rows are fitted in chunks of about this many weights (cache-sized)


@dataclass
class Int4Weight:
    """One quantized linear weight in the portable (on-disk) layout."""

    packed: torch.Tensor  # int32 [O, N/8]
    scale: torch.Tensor  # [O, G], the model's float dtype
    zero: torch.Tensor | None  # int8 [O, G] in [-8, 7]; None when symmetric
    shape: tuple[int, int]  # (O, N)
    group_size: int

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def nbytes(self) -> int:
        n = self.packed.numel() * 4 + self.scale.numel() * self.scale.element_size()
        return n + (self.zero.numel() // 2 if self.zero is not None else 0)


def pack_int4(q: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """int8 values in [-8, 7] [O, N] -> int32 [O, N/8] (dim=1) or [O/8, N] (dim=0)."""
    if dim == 0:
        return pack_int4(q.t(), 1).t().contiguous()
    rows, cols = q.shape
    if cols % 8:
        raise ValueError(f"cannot pack {cols} values per row into int32 words of 8")
    if sys.byteorder == "little":
        # Byte j of a row: input 2j in its low nibble, 2j + 1 in its high one; four bytes make
        # a little-endian word with nibble i at bits [4i, 4i+3], as below, in a few byte passes.
        u = (q + 8).to(torch.uint8).contiguous().view(rows, cols // 2, 2)
        return (u[..., 0] | (u[..., 1] << 4)).contiguous().view(torch.int32)
    u = (q.to(torch.int32) + 8).view(rows, cols // 8, 8)  # unsigned nibbles
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=q.device)
    # Nibble j goes to bits [4j, 4j+3]. Summing disjoint bit fields equals OR-ing them; the
    # top nibble may set the sign bit, and int32 arithmetic wraps as two's complement.
    return (u << shifts).sum(-1, dtype=torch.int32)


def pack_int4_transposed(qt: torch.Tensor) -> torch.Tensor:
    """pack_int4(qt.t()) for qt [N, O] (one input column per row, as GPTQ produces them), without
    transposing the int8 values first: input pairs become bytes along qt's rows, and only the
    half-size byte matrix is transposed (2.3x faster at [5120, 16384])."""
    n, out = qt.shape
    if sys.byteorder != "little" or n % 8:
        return pack_int4(qt.t().contiguous())
    u = (qt + 8).to(torch.uint8).view(n // 2, 2, out)
    return (u[:, 0] | (u[:, 1] << 4)).t().contiguous().view(torch.int32)


def unpack_int4(packed: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Inverse of pack_int4: int32 words -> int8 values in [-8, 7]."""
    if dim == 0:
        return unpack_int4(packed.t(), 1).t().contiguous()
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    u = (packed.unsqueeze(-1) >> shifts) & 0xF  # [O, N/8, 8]
    return (u.flatten(-2) - 8).to(torch.int8)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out, inp = w.shape
    if group_size <= 0:
        raise ValueError(f"group size must be positive, got {group_size}")
    if inp % group_size:
        raise ValueError(f"input dimension {inp} is not a multiple of group size {group_size}")
    return w.float().reshape(out, inp // group_size, group_size)  # [O, G, g]


def _err(wg, s, z, q):
    return (wg - s * (q - z)).pow(2).sum(-1, keepdim=True)  # [O, G, 1]


def _fit_symmetric(wg: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale [O, G, 1] and q [O, G, g] minimising ||w - s q||^2 per group."""
    amax = wg.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    best_s = amax / 7.5  # compressed-tensors' min-max scale
    best_q = torch.clamp(torch.round(wg / best_s), QMIN, QMAX)
    best_e = _err(wg, best_s, 0, best_q)
    # Clip search: a smaller range rounds the bulk of the group more finely.
    for ratio in SYM_RATIOS:
        s = amax * (ratio / 7.5)
        q = torch.clamp(torch.round(wg / s), QMIN, QMAX)
        e = _err(wg, s, 0, q)
        better = e < best_e
        best_s, best_q, best_e = torch.where(better, s, best_s), torch.where(better, q, best_q), torch.min(e, best_e)
    # Alternate: least-squares scale for the current integers, then re-round.
    s, q = best_s, best_q
    for _ in range(iters):
        s = ((wg * q).sum(-1, keepdim=True) / q.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)).clamp_min(1e-12)
        q = torch.clamp(torch.round(wg / s), QMIN, QMAX)
        e = _err(wg, s, 0, q)
        better = e < best_e
        best_s, best_q, best_e = torch.where(better, s, best_s), torch.where(better, q, best_q), torch.min(e, best_e)
    return best_s, best_q


def _symmetric_scales(wg: torch.Tensor, iters: int) -> torch.Tensor:
    """The symmetric fit's scales [O, G, 1]: our AVX2 kernel on the CPU where it is built (the
    same search, one group at a time in registers, about 10x faster), else the torch version."""
    if wg.device.type == "cpu":
        from . import cpu_kernel

        if cpu_kernel.available():
            o, groups, g = wg.shape
            return cpu_kernel.fit_symmetric(wg.reshape(o, groups * g), g, SYM_RATIOS, iters).unsqueeze(-1)
    return _fit_symmetric(wg.contiguous(), iters)[0]  # contiguous: the same sums as quantize_int4's


def _fit_asymmetric(wg: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale, integer zero [O, G, 1] and q [O, G, g] minimising ||w - s (q - z)||^2."""
    lo = wg.amin(-1, keepdim=True).clamp(max=0)
    hi = wg.amax(-1, keepdim=True).clamp(min=0)
    best = None
    for ratio in ASYM_RATIOS:
        s = ((hi - lo) * ratio / (QMAX - QMIN)).clamp_min(1e-12)
        z = torch.clamp(torch.round(QMIN - lo * ratio / s), QMIN, QMAX)
        q = torch.clamp(torch.round(wg / s + z), QMIN, QMAX)
        for _ in range(iters):
            # Regress w on q: w ~= s q + b, so z = -b / s (rounded: zeros are stored as int).
            qm, wm = q.mean(-1, keepdim=True), wg.mean(-1, keepdim=True)
            var = (q - qm).pow(2).sum(-1, keepdim=True)
            s_new = ((q - qm) * (wg - wm)).sum(-1, keepdim=True) / var.clamp_min(1e-12)
            ok = (var > 0) & (s_new > 1e-12)
            s_new = torch.where(ok, s_new, s)
            z = torch.where(ok, torch.clamp(torch.round(qm - wm / s_new), QMIN, QMAX), z)
            # Best scale for that integer zero, then re-round.
            d = q - z
            s = torch.where(
                ok, ((wg * d).sum(-1, keepdim=True) / d.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)), s
            ).clamp_min(1e-12)
            q = torch.clamp(torch.round(wg / s + z), QMIN, QMAX)
        e = _err(wg, s, z, q)
        if best is None:
            best = [s, z, q, e]
        else:
            better = e < best[3]
            best = [torch.where(better, a, b) for a, b in zip((s, z, q), best[:3], strict=True)] + [
                torch.min(e, best[3])
            ]
    return best[0], best[1], best[2]


def fit_scales(wg: torch.Tensor, symmetric: bool, scale_dtype, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero [O, G, 1] (float32) for groups wg [O, G, g], the scale rounded to
    scale_dtype as it will be stored (so the integers are chosen for the stored scale)."""
    if symmetric:
        s = _symmetric_scales(wg, iters)
        z = torch.zeros_like(s)
    else:
        s, z, _ = _fit_asymmetric(wg.contiguous(), iters)
    return s.to(scale_dtype).float().clamp_min(torch.finfo(scale_dtype).tiny), z


def quantize_int4(
    w: torch.Tensor, group_size: int = 128, symmetric: bool = True, iters: int = 4, scale_dtype=None
) -> Int4Weight:
    """Quantize w [O, N]; scales are stored in `scale_dtype` (default: w's dtype).

    The integers are chosen for the scales as stored (after rounding to scale_dtype), so the
    rounding of the scale costs nothing extra. Rows are fitted a cache-sized chunk at a time.
    """
    out, inp = w.shape
    _grouped(w[:1], group_size)  # validate the shape
    scale_dtype = scale_dtype or (w.dtype if w.dtype.is_floating_point else torch.float32)
    rows = max(1, CHUNK_ELEMENTS // inp)
    qs, ss, zs = [], [], []
    for r in range(0, out, rows):
        wg = _grouped(w[r : r + rows], group_size)  # [o, G, g] float32
        s, z = fit_scales(wg, symmetric, scale_dtype, iters)
        qs.append(torch.clamp(torch.round(wg / s + z), QMIN, QMAX).reshape(-1, inp).to(torch.int8))
        ss.append(s.squeeze(-1).to(scale_dtype))
        zs.append(z.squeeze(-1).to(torch.int8))
    return Int4Weight(
        packed=pack_int4(torch.cat(qs)),
        scale=torch.cat(ss),
        zero=None if symmetric else torch.cat(zs),
        shape=(out, inp),
        group_size=group_size,
    )


def quantize_rtn(w: torch.Tensor, group_size: int = 128, scale_dtype=None) -> Int4Weight:
    """Plain symmetric round-to-nearest with compressed-tensors' min-max scale (the baseline)."""
    out, inp = w.shape
    wg = _grouped(w, group_size)
    scale_dtype = scale_dtype or w.dtype
    s = (wg.abs().amax(-1, keepdim=True) / 7.5).clamp_min(1e-12).to(scale_dtype).float()
    q = torch.clamp(torch.round(wg / s), QMIN, QMAX).reshape(out, inp).to(torch.int8)
    return Int4Weight(pack_int4(q), s.squeeze(-1).to(scale_dtype), None, (out, inp), group_size)


def dequantize_int4(qw: Int4Weight, dtype=None) -> torch.Tensor:
    """The float weight [O, N] that qw stands for (the reference for every kernel)."""
    out, inp = qw.shape
    q = unpack_int4(qw.packed).float().reshape(out, inp // qw.group_size, qw.group_size)
    if qw.zero is not None:
        q = q - qw.zero.float().unsqueeze(-1)
    w = (q * qw.scale.float().unsqueeze(-1)).reshape(out, inp)
    return w.to(dtype or qw.scale.dtype)


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||w - w_hat|| / ||w|| in float32."""
    w = w.float()
    return ((w - w_hat.float()).norm() / w.norm()).item()
