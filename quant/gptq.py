"""GPTQ: INT4 weights chosen for the inputs they will see (Frantar et al., 2022, arXiv:2210.17323).

Given H = E[x x^T] over a linear's calibration inputs, GPTQ quantizes one input column at a time
and spreads each column's rounding error over the columns not yet quantized, in the direction
that H says costs least (the inverse Hessian's Cholesky factor), so the output error
||(W - Q) x||^2 is what is minimised rather than ||W - Q||^2. Columns go in blocks with the
trailing update as one matrix product (the paper's "lazy batch" form); a group's scale (and
zero) is fitted, with the plain fit of quant/int4.py, to the group's columns as the errors
before it have left them, when the walk reaches the group. The result is an ordinary
compressed-tensors pack-quantized weight: only which integers are stored changes.

Rows are independent (each row's error moves along its own columns), so a fused gate/up pair
sharing one input is one call. On the trained 256-wide model this takes the mean KL of every
expert, shared expert and attention projection at INT4 group 128 from 0.0103 (the plain fit) to
0.0039, half of llama.cpp Q4_K_M's (docs/benchmarks.md).
"""

from __future__ import annotations

import torch

from .int4 import QMAX, QMIN, Int4Weight, _grouped, fit_scales, pack_int4

DAMP = 0.01  # added to H's diagonal, as a fraction of its mean: keeps rarely seen directions stable


def inverse_factor(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, float32 [N, N] (what
    gptq_int4 takes; compute it once for the linears that share an input). Inputs never seen (a
    zero diagonal) get a unit diagonal: their columns are rounded on their own."""
    if not torch.isfinite(h).all():
        raise ValueError("the calibration inputs hold NaN or infinity")
    m = h.float().clone()
    diag = m.diagonal()
    diag[diag <= 0] = 1.0
    diag += damp * diag.mean()
    # The damping bounds the condition number by N / damp (8e5 at Scout's widest input), well
    # within float32's reach; float64 is the fallback all the same.
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(m)), upper=True)
    except torch.linalg.LinAlgError:
        m = m.double()
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(m)), upper=True).float()


def gptq_int4(
    w: torch.Tensor,
    u: torch.Tensor,
    group_size: int = 128,
    symmetric: bool = True,
    scale_dtype: torch.dtype | None = None,
    iters: int = 4,
) -> Int4Weight:
    """Quantize w [O, N] for inputs whose second moment H [N, N] (E[x x^T]) has the inverse
    factor u = inverse_factor(H); scales stored in scale_dtype (default: w's dtype), the integers
    chosen for the scales as stored."""
    out, inp = w.shape
    _grouped(w[:1], group_size)  # validate the shape
    if u.shape != (inp, inp):
        raise ValueError(f"H is {tuple(u.shape)} for a weight with {inp} inputs")
    scale_dtype = scale_dtype or (w.dtype if w.dtype.is_floating_point else torch.float32)
    u = u.to(w.device)
    wt = w.float().t().contiguous()  # [N, O]: one input column per row, updated in place
    q = torch.empty(inp, out, dtype=torch.int8, device=w.device)
    groups = inp // group_size
    scales = torch.empty(groups, out, device=w.device)
    zeros = torch.zeros(groups, out, device=w.device)
    block = max(group_size, 128)
    for b0 in range(0, inp, block):
        b1 = min(b0 + block, inp)
        wb, ub = wt[b0:b1], u[b0:b1, b0:b1]
        err = torch.empty_like(wb)
        for i in range(b1 - b0):
            col = b0 + i
            if col % group_size == 0:
                g = col // group_size
                s, z = _fit_group(wb[i : i + group_size].t(), symmetric, scale_dtype, iters)
                scales[g], zeros[g] = s, z
            s, z = scales[col // group_size], zeros[col // group_size]
            qi = torch.clamp(torch.round(wb[i] / s + z), QMIN, QMAX)
            q[col] = qi.to(torch.int8)
            e = (wb[i] - s * (qi - z)) / ub[i, i]
            err[i] = e
            wb[i + 1 :].addr_(ub[i, i + 1 :], e, alpha=-1.0)  # the rest of the block
        if b1 < inp:
            wt[b1:].addmm_(u[b0:b1, b1:].t(), err, alpha=-1.0)  # every later column, at once
    return Int4Weight(
        packed=pack_int4(q.t().contiguous()),
        scale=scales.t().contiguous().to(scale_dtype),
        zero=None if symmetric else zeros.t().contiguous().to(torch.int8),
        shape=(out, inp),
        group_size=group_size,
    )


def _fit_group(wg: torch.Tensor, symmetric: bool, scale_dtype, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [O] for one group's columns wg [O, g], by quant/int4.py's fit, the scale
    rounded to scale_dtype as it will be stored."""
    s, z = fit_scales(wg.contiguous().unsqueeze(1), symmetric, scale_dtype, iters)  # [O, 1, 1]
    return s.reshape(-1), z.reshape(-1)


class HessianSum:
    """Accumulates sum x x^T over a linear's input rows (float32 on x's device) and their count."""

    def __init__(self):
        self.sum: torch.Tensor | None = None
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.sum is None:
            self.sum = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        self.sum.addmm_(x.t(), x)
        self.rows += x.shape[0]

    def mean(self) -> torch.Tensor | None:
        """E[x x^T], or None when no row was seen."""
        return None if self.sum is None or self.rows == 0 else self.sum / self.rows
