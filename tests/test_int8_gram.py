"""The calibration's Gram products through the int8 GEMM (quant/int8_gram_kernel.py, add_gram's
`int8`): the exact Gram of x rounded per column and group of sorted rows, in add_gram's blocks."""

from __future__ import annotations

import pytest
import torch

from quant import cpu_kernel, gptq, int8_forward
from quant.gptq import HessianSum, error_feedback

needs_kernel = pytest.mark.skipif(
    not (cpu_kernel.available() and cpu_kernel.int8_gemm_pairs()), reason="needs the built kernel's maddubs build"
)


def rounded_gram(x: torch.Tensor) -> torch.Tensor:
    """The reference: x's rows sorted by their largest magnitude (ties by position), cut into
    groups of at most 256 rows whose largest magnitudes lie within 2x of the group's first, each
    column rounded per group to 63 levels (half to even, in float32 as the kernel does), Gram in
    float64."""
    x = x.float()
    mag = x.abs().amax(1)
    order = torch.argsort(mag, stable=True).tolist()
    h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    i = 0
    while i < len(order):
        e = i + 1
        while e < len(order) and e - i < 256 and mag[order[e]] <= 2 * mag[order[i]]:
            e += 1
        xs = x[order[i:e]]
        amax = xs.abs().amax(0)
        # (63 / t would be 63 * (1 / t): another rounding)
        inv = torch.where(amax > 0, torch.full_like(amax, 63.0) / amax, torch.zeros_like(amax))
        y = torch.round(xs * inv).clamp(-63, 63).double() * (amax / 63.0).double()
        h += y.t() @ y
        i = e
    return h


@needs_kernel
@pytest.mark.parametrize("n", [16, 48, 320])
@pytest.mark.parametrize("rows", [1, 3, 255, 257, 1100])
def test_int8_gram_is_the_rounded_inputs_gram(rows, n):
    """Sums in the blocks add_gram fills (block 128 here) equal the rounded inputs' Gram within
    float32 scaling; the rest of h is not touched; accumulate adds; the rounding's error against
    the float Gram stays small where one column and a few rows are far larger than the rest."""
    g = torch.Generator().manual_seed(rows + n)
    x = torch.randn(rows, n, generator=g) * torch.linspace(0.1, 4.0, n)
    x[:, 3] *= 300  # a dominant column
    x[::97] *= 40  # BOS-like rows
    x = x.bfloat16()
    want = rounded_gram(x)
    h = torch.full((n, n), float("nan"))
    cpu_kernel.int8_gram(x, h, 128, accumulate=False)
    edges = list(range(0, n, 128)) + [n]
    for i0, i1 in zip(edges, edges[1:], strict=False):
        assert h[i0:i1, i1:].isnan().all()  # right of the block row's diagonal block: not touched
        h[i0:i1, i1:] = 0
    scale = want.diagonal().sqrt()
    norm = scale[:, None] * scale[None, :] + 1e-30
    lower = torch.ones(n, n, dtype=torch.bool)
    for i0, i1 in zip(edges, edges[1:], strict=False):
        lower[i0:i1, i1:] = False
    err = ((h.double() - want) / norm)[lower]
    assert err.abs().max() < 1e-5
    cpu_kernel.int8_gram(x, h, 128)  # accumulate: twice the sums
    err2 = ((h.double() - 2 * want) / norm)[lower]
    assert err2.abs().max() < 2e-5
    exact = x.double().t() @ x.double()
    d = exact.diagonal().sqrt()
    rel = ((want - exact) / (d[:, None] * d[None, :]))[lower]
    assert rel.abs().max() < 0.05


@needs_kernel
def test_int8_gram_nonfinite_inputs_give_a_nan_diagonal():
    """A column whose group holds NaN or infinity gets a NaN diagonal (gptq.hessian_finite rejects
    it, as it would a float Gram), and only its row and column of the sums are NaN."""
    x = torch.randn(300, 64)
    x[7, 5] = float("nan")
    x[200, 9] = float("inf")
    h = torch.zeros(64, 64)
    cpu_kernel.int8_gram(x, h, 64, accumulate=False)
    assert h[5, 5].isnan() and h[9, 9].isnan()
    assert not gptq.hessian_finite(h)
    rest = [c for c in range(64) if c not in (5, 9)]
    assert torch.isfinite(h[rest][:, rest].tril()).all()


@needs_kernel
def test_hessian_sum_int8_feeds_gptq_as_the_float_gram(monkeypatch):
    """HessianSum(int8=True) over several calls takes the int8 products, and GPTQ's feedback from
    it is the float Gram's within the rounding's small share."""
    monkeypatch.setattr(gptq, "GRAM_BLOCK", 64)
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(40, 160, generator=g)
    x = (torch.randn(900, 40, generator=g) @ basis + 0.1 * torch.randn(900, 160, generator=g)).bfloat16()
    calls = []
    real = cpu_kernel.int8_gram
    monkeypatch.setattr(cpu_kernel, "int8_gram", lambda *a, **k: calls.append(1) or real(*a, **k))
    acc, ref = HessianSum(int8=True), HessianSum()
    for part in x.split(300):
        acc.add(part)
        ref.add(part)
    assert len(calls) == 3
    hi, hf = acc.mean(), ref.mean()
    d = hf.diagonal().sqrt()
    assert ((hi - hf) / (d[:, None] * d[None, :])).abs().max() < 0.01
    fi, ff = error_feedback(hi), error_feedback(hf)
    assert (fi - ff).norm() / ff.norm() < 0.05


def test_gram_int8_policy(monkeypatch):
    """The calibration's Hessians take int8 products with the int8 forward, not with
    LLAMA4_LOCAL_NO_INT8_GRAM=1 or LLAMA4_LOCAL_NO_INT8_CALIBRATION=1."""
    monkeypatch.delenv("LLAMA4_LOCAL_NO_INT8_GRAM", raising=False)
    monkeypatch.delenv("LLAMA4_LOCAL_NO_INT8_CALIBRATION", raising=False)
    assert int8_forward.gram_int8() == cpu_kernel.available()
    monkeypatch.setenv("LLAMA4_LOCAL_NO_INT8_GRAM", "1")
    assert not int8_forward.gram_int8()
    monkeypatch.delenv("LLAMA4_LOCAL_NO_INT8_GRAM")
    monkeypatch.setenv("LLAMA4_LOCAL_NO_INT8_CALIBRATION", "1")
    assert not int8_forward.gram_int8()
