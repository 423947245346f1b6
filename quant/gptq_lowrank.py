"""GPTQ's error feedback from the calibration rows themselves, for linears that saw few of them.

A routed expert sees only the rows routed to it: on Scout, 8192 calibration tokens over 16
experts are about 512 rows against 5120 (gate/up) or 8192 (down) inputs. Its Hessian is then
H = D + X^T X with X those r rows and D the diagonal damping, and GPTQ's feedback (quant/gptq.py:
column k receives F_kj times column j's original-minus-quantized error, j < k) is, through
Woodbury,

    F_kj = a_k^T x_j,    a_k = M_k^-1 x_k / d_k,    M_k = I + sum_{i >= k} x_i x_i^T / d_i

(x_k: column k of X, an r-vector; M_k: r x r). So a block of columns J receives
the errors of every earlier column as A_J^T v, with v the running sum of x_j times column j's
error ([r, O]): 2 r N O multiply-adds in all instead of N^2 O / 2, and no N x N Cholesky
factor. The products alone pay from 4 r < N; with the feedback's column loop and its float64
r x r work, 8 r <= N (6 r <= N where the Hessian's walk would run in float32:
LowRankFeedback.pays). The a_k come from the last column backwards, 128 at a time, in float64:
M_{k+1}^-1 as the block's starting inverse P less the rank-one terms of the block's later
columns, so each column costs O(r * 128) and each block one r x r x 128
product.
"""

from __future__ import annotations

import torch

from . import cpu_kernel

BLOCK = 128


class LowRankFeedback:
    """F = tril(A^T X, -1) for A, X [r, N] (float32), with the running sum v of GPTQ's left-looking
    walk: update() gives a block's share of every earlier column's error, record() adds a block's
    errors once walked. v belongs to one walk: quant.gptq.gptq_int4 starts from a copy (to()),
    so one feedback serves the linears that share an input (gate and up)."""

    def __init__(self, a: torch.Tensor, x: torch.Tensor):
        self.a, self.x = a, x
        self.v: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.x.shape[1], self.x.shape[1])

    def to(self, device) -> LowRankFeedback:
        return LowRankFeedback(self.a.to(device), self.x.to(device))

    @staticmethod
    def pays(rows: int, inputs: int, dense_float32: bool = False) -> bool:
        """Whether the rows' form is the faster for r rows and N inputs: the products alone pay
        from 4 r < N, but the feedback's column loop and float64 r x r work take their share.
        `dense_float32`: the Hessian's walk would update in float32 (a CPU without bf16 dot
        products where the int8 updates are off), twice its cost in bf16 or int8, so the rows'
        form pays longer (with int8 updates on Zen 3: 512 rows 1.85x the Hessian's path, at
        1024 gate 0.85x, down 1.39x; session 37). At Scout's shapes,
        two threads (benchmarks/bench_gptq_lowrank.py): Zen 4, bf16 updates: 1.59x a routed
        expert at 512 rows, at 1024 gate 0.66x, down 1.26x (8 r <= N); Zen 3, float32: gate
        1.26x at 768 rows, 0.79x at 1024, down 1.60x at 1024, 1.04x at 1536 (6 r <= N)."""
        return (6 if dense_float32 else 8) * rows <= inputs

    def block(self, b0: int, b1: int) -> torch.Tensor:
        """The feedback among columns [b0, b1): [n, n] float32, strictly lower triangular."""
        return (self.a[:, b0:b1].t() @ self.x[:, b0:b1]).tril_(-1)

    def dense(self) -> torch.Tensor:
        """F itself, [N, N] (tests; the float32 right-looking walk)."""
        return (self.a.t() @ self.x).tril_(-1)

    def update(self, b0: int, b1: int, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
        """Columns [b0, b1)'s share of the errors recorded so far: A_J^T v [n, O] in `dtype`'s
        products (bf16: both sides rounded, float32 sums), written to out."""
        if self.v is None:
            return out.zero_()
        return torch.mm(self.a[:, b0:b1].t().to(dtype), self.v.to(dtype), out=out)

    def record(self, b0: int, b1: int, err: torch.Tensor, dtype: torch.dtype) -> None:
        """Add columns [b0, b1)'s errors (err [n, O], original minus quantized) to v (float32),
        the product in `dtype`'s arithmetic (bf16: both sides rounded, float32 sums)."""
        if dtype == torch.float32 and self.v is not None:  # in place: no [r, O] temporary per block
            self.v.addmm_(self.x[:, b0:b1], err)
            return
        term = (self.x[:, b0:b1].to(dtype) @ err.to(dtype)).float()
        self.v = term if self.v is None else self.v.add_(term)


def _columns_torch(px, xj, d, u, aj) -> None:
    """The block's columns, last to first: u_k = M_{k+1}^-1 x_k, a_k = u_k / (d_k + x_k^T u_k)
    (quant/gptq_kernel.py does the same in C++: 0.15 against 0.64 s per 8192 columns at 512 rows, Zen 3)."""
    for k in range(xj.shape[1] - 1, -1, -1):
        uk = px[:, k] - aj[:, k + 1 :] @ (u[:, k + 1 :].t() @ xj[:, k])
        u[:, k] = uk
        aj[:, k] = uk / (d[k] + xj[:, k] @ uk)


def _columns_kernel(px, xj, d, u, aj) -> None:
    cpu_kernel.lowrank_columns(px, xj.contiguous(), d.contiguous(), u, aj)


def lowrank_feedback(x: torch.Tensor, damp: float) -> LowRankFeedback | None:
    """The feedback for inputs given as rows x [r, N] (H = x^T x plus the damping of
    quant.gptq.error_feedback: inputs never seen a unit diagonal, then damp times the mean
    diagonal added), or None where x holds NaN or infinity."""
    if not bool(torch.isfinite(x).all()):
        return None
    xd = x.to(torch.float64)
    r, n = xd.shape
    from .gptq import damped_diagonal  # (quant.gptq imports this module)

    seen = (xd * xd).sum(0)  # x^T x's diagonal
    d = damped_diagonal(seen, damp) - seen  # D: what the damping adds to it
    a = torch.empty_like(xd)
    columns = _columns_kernel if x.device.type == "cpu" and cpu_kernel.available() else _columns_torch
    p = torch.eye(r, dtype=torch.float64, device=x.device)  # M^-1 past the current block
    for j1 in range(n, 0, -BLOCK):
        j0 = max(0, j1 - BLOCK)
        xj = xd[:, j0:j1]
        # p is symmetric (to rounding): px = p @ xj as (xj^T p)^T, whose operands MKL takes 1.5-2x
        # faster (a strided [r, 128] right-hand side ran at ~10 GMAC/s on two Zen 3 threads).
        px = (xj.t().contiguous() @ p).t().contiguous()
        u, aj = torch.empty_like(xj), torch.empty_like(xj)
        columns(px, xj, d[j0:j1], u, aj)
        p.addmm_(aj, u.t().contiguous(), alpha=-1)  # M_k^-1 = M_{k+1}^-1 - a_k u_k^T, the block's columns at once
        a[:, j0:j1] = aj
    return LowRankFeedback(a.float(), x.float())
