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
r x r work, 8 r <= N where both walks update in bf16 (6 r <= N in float32, 4.5 r <= N in
int8: LowRankFeedback.pays). The a_k come from the last column backwards, 128 at a time, in float64:
M_{k+1}^-1 as the block's starting inverse P less the rank-one terms of the block's later
columns, so each column costs O(r * 128) and each block one r x r x 128
product.
"""

from __future__ import annotations

import torch

from . import cpu_kernel
from .int8_forward import activation_qmax, activations_narrow

BLOCK = 128
SPAN_BLOCKS = 4  # the int8 walk's blocks per span (LowRankFeedback)


class LowRankFeedback:
    """F = tril(A^T X, -1) for A, X [r, N] (float32), with the running sum v of GPTQ's left-looking
    walk: update() gives a block's share of every earlier column's error, record() adds a block's
    errors once walked. v belongs to one walk: quant.gptq.gptq_int4 starts from a copy (to()),
    so one feedback serves the linears that share an input (gate and up); the copies share the
    int8 operands, which depend on A and X alone.

    In int8 (the products of quant/int8_gemm_kernel.py, where the Hessian's walk would take its
    int8 updates) the walk goes by spans of SPAN_BLOCKS blocks, as gptq._Int8Updates: the first
    block of a span takes the whole span's share of v at once (A_S^T rounded per column of A,
    once per feedback; v rounded per output over its r entries and packed, once per span: r x O,
    as much memory traffic as the product's output), each later block adds its share of the
    span's earlier blocks' errors (F_JC = A_J^T X_C, [n, n], times E_C), and the span's end adds
    X_S E_S to v in one product (X rounded per row over each block, the errors per output over
    theirs, as the Hessian's int8 walk rounds them; each block a group with its own scales)."""

    def __init__(self, a: torch.Tensor, x: torch.Tensor, operands: dict | None = None):
        self.a, self.x = a, x
        self.v: torch.Tensor | None = None  # [r, O]
        self._operands = {} if operands is None else operands  # (which, c0, c1) -> int8_gemm's left operand
        self._span, self._ahead, self._walked = 0, None, []  # the int8 walk's current span

    @property
    def shape(self) -> tuple[int, int]:
        return (self.x.shape[1], self.x.shape[1])

    def to(self, device) -> LowRankFeedback:
        same = self.a.device == torch.device(device)
        return LowRankFeedback(self.a.to(device), self.x.to(device), self._operands if same else None)

    @staticmethod
    def pays(rows: int, inputs: int, updates: torch.dtype = torch.bfloat16) -> bool:
        """Whether the rows' form is the faster for r rows and N inputs, where the Hessian's walk
        would update in `updates` (and the rows' walk with it): the products alone pay from
        4 r < N, but the feedback's column loop and float64 r x r work (2 N r^2) take their
        share. At Scout's shapes, two threads (benchmarks/bench_gptq_lowrank.py, the Hessian from
        the int8 Gram where the updates are int8): Zen 4, bf16: 1.59x a routed expert at 512
        rows, at 1024 gate 0.66x, down 1.26x (8 r <= N); Zen 3, float32: gate 1.26x at 768
        rows, 0.79x at 1024, down 1.60x at 1024, 1.04x at 1536 (6 r <= N); Zen 3, int8 both
        ways: gate (and up) 1.65x at 768 rows, 1.0x at 1280, 0.75x at 1536, down 2.3x at 768,
        1.55x at 1280, 1.37x at 1536, 0.90x at 2048 (4.5 r <= N)."""
        per_row = {torch.float32: 6.0, torch.int8: 4.5}.get(updates, 8.0)
        return per_row * rows <= inputs

    def block(self, b0: int, b1: int) -> torch.Tensor:
        """The feedback among columns [b0, b1): [n, n] float32, strictly lower triangular."""
        return (self.a[:, b0:b1].t() @ self.x[:, b0:b1]).tril_(-1)

    def dense(self) -> torch.Tensor:
        """F itself, [N, N] (tests; the float32 right-looking walk)."""
        return (self.a.t() @ self.x).tril_(-1)

    def update(self, b0: int, b1: int, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
        """Columns [b0, b1)'s share of the errors recorded so far: A_J^T v [n, O] in `dtype`'s
        products (bf16: both sides rounded, float32 sums; int8: see the class), written to out
        (float32 for int8)."""
        if dtype == torch.int8:
            return self._update_int8(b0, b1, out)
        if self.v is None:
            return out.zero_()
        return torch.mm(self.a[:, b0:b1].t().to(dtype), self.v.to(dtype), out=out)

    def record(self, b0: int, b1: int, err: torch.Tensor, dtype: torch.dtype) -> None:
        """Add columns [b0, b1)'s errors (err [n, O], original minus quantized) to v (float32),
        the product in `dtype`'s arithmetic (bf16: both sides rounded, float32 sums; int8: see
        the class)."""
        if dtype == torch.int8:
            return self._record_int8(b0, b1, err)
        if dtype == torch.float32 and self.v is not None:  # in place: no [r, O] temporary per block
            self.v.addmm_(self.x[:, b0:b1], err)
            return
        term = (self.x[:, b0:b1].to(dtype) @ err.to(dtype)).float()
        self.v = term if self.v is None else self.v.add_(term)

    def _update_int8(self, b0: int, b1: int, out: torch.Tensor) -> torch.Tensor:
        if b0 == 0:  # a walk's first block: its blocks' width sets the spans
            self._span, self._walked = SPAN_BLOCKS * (b1 - b0), []
        s0 = b0 - b0 % self._span
        if b0 == s0:  # the span's share of every column before it, in one product
            self._ahead = None
            if self.v is not None:
                s1 = min(s0 + self._span, self.x.shape[1])
                packed, sums, vs = cpu_kernel.int8_packed_cols(self.v)
                aq, sa = self._rounded("a", s0, s1)
                self._ahead = torch.empty(s1 - s0, self.v.shape[1], device=out.device)
                cpu_kernel.int8_gemm(aq, packed, sums, sa, vs, self._ahead, narrow=activations_narrow())
        if self._ahead is None:
            out.zero_()
        else:
            out.copy_(self._ahead[b0 - s0 : b1 - s0])
        for c0, c1, packed, sums, es in self._walked:  # the span's earlier blocks: F_JC E_C
            fq, fs, _ = cpu_kernel.int8_rows(self.a[:, b0:b1].t() @ self.x[:, c0:c1], activation_qmax())
            cpu_kernel.int8_gemm(fq, packed, sums, fs, es, out, narrow=activations_narrow(), add=True)
        return out

    def _record_int8(self, b0: int, b1: int, err: torch.Tensor) -> None:
        self._walked.append((b0, b1, *cpu_kernel.int8_packed_cols(err)))
        if b1 % self._span and b1 < self.x.shape[1]:
            return
        # The span's end: v += X_S E_S, each block a group with its own scales.
        if self.v is None:  # [r, O], rows 64 bytes apart from a multiple of 4 KB
            self.v = torch.zeros(self.x.shape[0], err.shape[1] + 16, device=err.device)[:, : err.shape[1]]
        walked, self._walked = self._walked, []
        lefts = [self._rounded("x", c0, c1) for c0, c1, *_ in walked]
        cpu_kernel.int8_gemm_add_groups(lefts, [w[2:] for w in walked], self.v, activations_narrow())

    def _rounded(self, which: str, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """int8_gemm's left operand for columns [c0, c1), rounded once per feedback (the copies of
        to() share them): A_C^T by rows ("a": the span's update) or X_C by rows ("x": record)."""
        key = (which, c0, c1)
        if key not in self._operands:
            m = self.a[:, c0:c1].t() if which == "a" else self.x[:, c0:c1]
            self._operands[key] = cpu_kernel.int8_rows(m, activation_qmax())[:2]
        return self._operands[key]

    @staticmethod
    def int8_available(device) -> bool:
        """Whether the int8 products can run (the extension, on the CPU)."""
        return torch.device(device).type == "cpu" and cpu_kernel.available()


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
