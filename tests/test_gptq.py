"""GPTQ (quant/gptq.py) and the calibrated default of `quantize` (quant/calibrate.py, calibrated.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from llama4_local.errors import UserError
from llama4_local.loader import load_model
from llama4_local.tokenizer import Tokenizer
from quant import cpu_kernel
from quant.calibrate import DEFAULT_TEXT, LayerRunner, calibration_windows
from quant.gptq import HessianSum, error_feedback, gptq_int4
from quant.int4 import dequantize_int4, quantize_int4
from quant.quantize import QuantizeOptions, quantize_checkpoint


def correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Rows with strongly correlated features and uneven scales, like a layer's activations."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(k // 4, k, generator=g)
    x = torch.randn(n, k // 4, generator=g) @ basis + 0.1 * torch.randn(n, k, generator=g)
    return x * torch.linspace(0.2, 3.0, k)


def output_error(w, w_hat, x):
    return ((x @ (w - w_hat).t()).norm() / (x @ w.t()).norm()).item()


@pytest.mark.parametrize("symmetric", [True, False])
def test_identity_hessian_is_the_plain_fit(symmetric):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(1))
    got = gptq_int4(w, error_feedback(torch.eye(256)), 64, symmetric)
    want = quantize_int4(w, 64, symmetric)
    assert torch.equal(got.packed, want.packed) and torch.equal(got.scale, want.scale)
    assert (got.zero is None) == symmetric and (symmetric or torch.equal(got.zero, want.zero))


@pytest.mark.parametrize("group_size,symmetric", [(128, True), (32, True), (64, False)])
def test_lower_output_error_than_the_plain_fit(group_size, symmetric):
    w = torch.randn(96, 512, generator=torch.Generator().manual_seed(2))
    x = correlated_inputs(2048, 512)
    h = HessianSum()
    h.add(x[:1024])  # fitted on half the rows, measured on the other half
    q = gptq_int4(w, error_feedback(h.mean()), group_size, symmetric, scale_dtype=torch.bfloat16)
    plain = quantize_int4(w, group_size, symmetric, scale_dtype=torch.bfloat16)
    held = x[1024:]
    ours = output_error(w, dequantize_int4(q, torch.float32), held)
    base = output_error(w, dequantize_int4(plain, torch.float32), held)
    assert ours < 0.7 * base, (ours, base)
    assert q.scale.dtype == torch.bfloat16 and q.packed.shape == plain.packed.shape


def test_unseen_inputs_and_no_rows():
    w = torch.randn(16, 128)
    x = correlated_inputs(300, 128)
    x[:, 5] = 0  # an input never active
    h = HessianSum()
    assert h.mean() is None
    h.add(x)
    q = gptq_int4(w, error_feedback(h.mean()), 32)
    assert torch.isfinite(dequantize_int4(q, torch.float32)).all()
    with pytest.raises(ValueError, match="H is"):
        gptq_int4(w, error_feedback(torch.eye(64)), 32)


def _paper_gptq(w: torch.Tensor, h: torch.Tensor, group: int) -> torch.Tensor:
    """GPTQ as the paper writes it (the inverse Hessian's upper Cholesky factor, errors scaled by
    its diagonal, one column at a time), symmetric grid: the integers [O, N]."""
    from quant.gptq import DAMP
    from quant.int4 import fit_scales

    m = h.double().clone()
    m.diagonal().add_(DAMP * m.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(m)), upper=True).float()
    wt, q = w.float().t().clone(), torch.empty(w.shape[1], w.shape[0])
    for i in range(w.shape[1]):
        if i % group == 0:
            s = fit_scales(wt[i : i + group].t().contiguous().unsqueeze(1), True, torch.float32, 4)[0].reshape(-1)
        q[i] = torch.clamp(torch.round(wt[i] / s), -8, 7)
        wt[i + 1 :] -= torch.outer(u[i, i + 1 :], (wt[i] - s * q[i]) / u[i, i])
    return q.t()


@pytest.mark.parametrize("kernel", [True, False])
def test_feedback_form_is_the_papers_gptq(kernel, monkeypatch):
    """The feedback (LDL) form with the group scales fitted to GPTQ's state chooses the paper's
    integers, through the C++ walk and through the torch one."""
    from quant import cpu_kernel, gptq
    from quant.int4 import unpack_int4

    if kernel and not cpu_kernel.available():
        pytest.skip("no AVX2 kernel here")
    if not kernel:
        monkeypatch.setattr(gptq, "_walk_kernel", gptq._walk_torch)
    same = []
    for seed in (3, 4, 5, 6):
        w = torch.randn(64, 384, generator=torch.Generator().manual_seed(seed))
        h = HessianSum()
        h.add(correlated_inputs(1024, 384, seed=seed))
        q = gptq_int4(w, error_feedback(h.mean()), 64, scale_dtype=torch.float32, updates=torch.float32)
        want = _paper_gptq(w, h.mean(), 64)
        same.append((unpack_int4(q.packed).float() == want).float().mean().item())
    # float32 rounding may flip a few ties (and what follows them in their rows): 98.9-100% a draw
    assert min(same) > 0.985 and sum(same) / len(same) > 0.993, same


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,cols,cut", [(37, 29, None), (64, 300, (40, 168)), (13, 100, (3, 11)), (8, 8, None)])
def test_transposed_copy_kernel(dtype, rows, cols, cut):
    """GPTQ's transposed float32 copies of a weight (whole, or a block of its columns) through the
    extension equal torch's, bit for bit (NaN included), into padded rows and a second copy."""
    from quant import gptq

    if not cpu_kernel.available():
        pytest.skip("no AVX2 kernel here")
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)).to(dtype)
    w[rows // 2, cols // 3] = float("nan")
    src = w if cut is None else w[:, cut[0] : cut[1]]
    want = src.float().t()
    out, out2 = gptq._rows(src.shape[1], rows, torch.float32, "cpu"), torch.empty(src.shape[1], rows)
    assert gptq._transposed(src, out, out2) is out
    for got in (out, out2):
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    one = torch.empty(src.shape[1], rows)
    cpu_kernel.transpose_widen(src, one)
    assert torch.equal(one.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize(
    "outputs,i0,i1,zero,grid",
    [
        (264, 0, 128, False, (-8, 7)),
        (67, 32, 96, True, (-8, 7)),
        (136, 8, 13, False, (-8, 7)),
        (72, 0, 32, False, (-32, 31)),
    ],
)
def test_column_walk_kernel_equals_the_torch_walk(outputs, i0, i1, zero, grid):
    """The C++ walk (8 outputs per instruction where the width allows, the rest scalar; whole
    sub-blocks of 8 columns or not) against the torch loop: the same integers, errors and fed
    columns to float32 rounding (the kernel fuses multiply-adds), a NaN in the same places; on
    INT4's grid and on Q6's (quant/q6.py: scales of either sign)."""
    from quant import gptq

    if not cpu_kernel.available():
        pytest.skip("no AVX2 kernel here")
    g = torch.Generator().manual_seed(outputs)
    blk = 128
    w0 = torch.randn(blk, outputs, generator=g)
    w0[i0, 3] = float("nan")  # one output's column: its error and every later column there
    f = torch.randn(blk, blk, generator=g).tril_(-1) * 0.05
    s = torch.rand(outputs, generator=g) * 0.2 + 0.1
    if grid[0] == -32:
        s = (s * torch.randint(0, 2, (outputs,), generator=g) * 2 - s) / 4  # both signs, finer steps
    z = torch.randint(-2, 3, (outputs,), generator=g).float() if zero else torch.zeros(outputs)
    runs = []
    for walk in (gptq._walk_kernel, gptq._walk_torch):
        wb = gptq._rows(blk, outputs, torch.float32, "cpu").copy_(w0)
        err = gptq._rows(blk, outputs, torch.float32, "cpu").copy_(w0 + 0.01)
        q = torch.zeros(blk, outputs, dtype=torch.int8)
        walk(wb, err, f, s, z, q, i0, i1, *grid)
        runs.append((wb.clone(), err.clone(), q))
    (wk, ek, qk), (wt, et, qt) = runs
    nan = torch.zeros(outputs, dtype=torch.bool)
    nan[3] = True
    assert ek[i0:i1, 3].isnan().all() and et[i0:i1, 3].isnan().all() and wk[i0 + 1 :, 3].isnan().all()
    same = (qk[i0:i1] == qt[i0:i1]).all(0) & ~nan  # a tie flipped by fused rounding changes its output
    assert same.float().sum() >= outputs - 2
    for a, b in ((wk, wt), (ek, et)):
        torch.testing.assert_close(a[:, same], b[:, same], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpu_kernel.available(), reason="the fused fit is the CPU kernel's")
@pytest.mark.parametrize("outputs,group", [(264, 128), (520, 32), (16, 64), (8, 128)])
def test_fused_group_fit_is_the_fit_of_what_gptq_sees(outputs, group):
    """The kernel's fit straight from the walk's state (gptq._fused_fit: tiles of 256 outputs, 16
    or the last 8 at a time) against _as_gptq_sees then the fit: the same scales to float32
    rounding (the sums go in another order), where a near tie between two candidate scales may go
    the other way (and the refits after it: a few outputs' errors move by some %, their sum does
    not); a NaN in one output's column stays there."""
    from quant import gptq

    g = torch.Generator().manual_seed(outputs + group)
    state = gptq._rows(group, outputs, torch.float32, "cpu").copy_(torch.randn(group, outputs, generator=g))
    orig = gptq._rows(group, outputs, torch.float32, "cpu").copy_(
        state + 0.1 * torch.randn(group, outputs, generator=g)
    )
    orig[5, 2] = float("nan")
    f = torch.randn(group, group, generator=g).tril_(-1) * 0.05
    ahead = gptq._as_gptq_sees(state, orig, f, gptq._rows(group, outputs, torch.float32, "cpu"))
    want = gptq._fit_group(ahead.t(), True, torch.bfloat16, 4)[0]
    fused = gptq._fused_fit(torch.empty(outputs, 1), group, True, torch.bfloat16, 4)
    got, zeros = fused(state, orig, f)
    assert zeros is None and torch.isfinite(got).all()  # a NaN stays in its own output's column
    ok = torch.ones(outputs, dtype=torch.bool)
    ok[2] = False
    assert torch.isclose(got, want, rtol=1e-2)[ok].float().mean() > 0.98  # 0.990-1.0 on these draws

    def err(s):  # each output's squared error on its group at scale s
        q = torch.clamp(torch.round(ahead / s), -8, 7)
        return (ahead - s * q).pow(2).sum(0)

    assert abs(err(got)[ok].sum() / err(want)[ok].sum() - 1) < 1e-3  # 0.9999-1.0000 on these draws


@pytest.mark.parametrize("updates", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("group_size,symmetric", [(128, True), (64, False), (32, True)])
def test_low_precision_updates_cost_nothing_measurable(group_size, symmetric, updates):
    """The left-looking bf16 updates (the default on CPUs with bf16 dot products) land on the
    float32 form's output error (within its +-1% scatter from which ties flip; on average within
    0.5%), choosing nearly the same integers; the int8 ones (other CPUs: errors at 7 bits on the
    maddubs build) scatter it a little more (+-2%; on average within 1%) and keep 85%+ of them.
    Eight draws: over four the int8 form's mean moved 1.002-1.011 with the draws alone (VNNI
    and maddubs builds alike; 1.001-1.006 over eight)."""
    from quant.int4 import unpack_int4

    if updates == torch.int8 and not cpu_kernel.available():
        pytest.skip("int8 updates need the built kernel")
    ratios = []
    for seed in range(8):
        w = torch.randn(96, 640, generator=torch.Generator().manual_seed(seed)).bfloat16()
        x = correlated_inputs(2048, 640, seed=seed + 10)
        h = HessianSum()
        h.add(x[:1024])
        f = error_feedback(h.mean())
        got, want = (gptq_int4(w, f, group_size, symmetric, updates=u) for u in (updates, torch.float32))
        errs = [output_error(w.float(), dequantize_int4(q, torch.float32), x[1024:]) for q in (got, want)]
        ratios.append(errs[0] / errs[1])
        same = (unpack_int4(got.packed) == unpack_int4(want.packed)).float().mean()
        assert same > (0.9 if updates == torch.bfloat16 else 0.85)
        assert (got.zero is None) == symmetric
    mean = 1.005 if updates == torch.bfloat16 else 1.01
    assert max(ratios) < 1.025 and sum(ratios) / len(ratios) < mean, ratios


@pytest.mark.skipif(not cpu_kernel.available(), reason="the int8 updates run in the CPU kernel")
def test_int8_updates_by_spans_are_the_blocks_updates(monkeypatch):
    """Columns past a span of blocks get the span's errors in one pass (gptq._Int8Updates): the
    same integers and scales as every block's update on its own (1280 inputs: spans of 4, 4 and
    2 blocks of 128; groups of 32 and 128)."""
    from quant import gptq

    torch.manual_seed(5)
    x = (torch.randn(1500, 1280) * torch.linspace(0.2, 3.0, 1280)).bfloat16()
    w = torch.randn(72, 1280).bfloat16()
    f = gptq.error_feedback(gptq.gram_lower(x), consume=True)
    for group_size in (32, 128):
        got = gptq_int4(w, f, group_size, updates=torch.int8)
        monkeypatch.setattr(gptq, "SPAN_BLOCKS", 1)
        want = gptq_int4(w, f, group_size, updates=torch.int8)
        monkeypatch.undo()
        assert torch.equal(got.packed, want.packed) and torch.equal(got.scale, want.scale)


def test_default_updates(monkeypatch):
    from quant.gptq import default_updates

    monkeypatch.delenv("LLAMA4_LOCAL_NO_INT8_UPDATES", raising=False)
    if cpu_kernel.native_bf16():
        want = torch.bfloat16
    else:
        want = torch.int8 if cpu_kernel.available() else torch.float32
    assert default_updates(torch.device("cpu")) == want
    assert default_updates(torch.device("meta")) == torch.float32  # any device but the CPU
    monkeypatch.setenv("LLAMA4_LOCAL_NO_INT8_UPDATES", "1")
    assert default_updates(torch.device("cpu")) in (torch.bfloat16, torch.float32)


def test_gram_in_blocks(monkeypatch):
    from quant import gptq

    monkeypatch.setattr(gptq, "GRAM_BLOCK", 96)  # 250 columns: blocks of 96, 96 and 58
    x = torch.randn(40, 250)
    torch.testing.assert_close(gptq.mirror(gptq.gram_lower(x)), x.t() @ x)
    h = HessianSum()
    h.add(x[:15])
    h.add(x[15:])
    torch.testing.assert_close(h.mean(), x.t() @ x / 40)
    assert h.rows == 40


@pytest.mark.parametrize("n", [1, 3, 1500])  # 1500: the flat data swapped in two chunks of 2^20
def test_reverse_in_place(n):
    from quant.gptq import _reverse_

    a = torch.randn(n, n)
    b = a.clone()
    assert _reverse_(b) is b and torch.equal(b, a.flip(0, 1))


@pytest.mark.parametrize("n,block", [(5, 256), (300, 256), (700, 64), (256, 256)])
def test_blocked_cholesky(n, block):
    """cholesky_upper_ is LAPACK's upper factor, reading only the upper triangle."""
    from quant.gptq import cholesky_upper_

    x = correlated_inputs(2 * n, n)
    h = x.t() @ x / (2 * n) + 0.01 * torch.eye(n)
    m = h.triu() + torch.full_like(h, float("nan")).tril(-1)  # the strict lower triangle: garbage
    assert cholesky_upper_(m, block) is m
    exact = torch.linalg.cholesky(h.double(), upper=True)
    lapack = (torch.linalg.cholesky(h, upper=True).double() - exact).abs().max()
    # float32's rounding, as LAPACK's. One short row block after one product (300 = 256 + 44):
    # MKL's LAPACK on AVX-512 CPUs factors a matrix that small ~2x closer than any blocked float32
    # form (ours 1.7-3.5x over six draws; the same blocks through MKL's own GEMM 2.9x); from a few
    # blocks on ours is 0.5-1.2x LAPACK's.
    bound = 4 if block < n < 2 * block else 2
    assert (m.double() - exact).abs().max() <= bound * lapack + 1e-6


@pytest.mark.skipif(not cpu_kernel.available(), reason="the Cholesky products' tiles are the CPU kernel's")
@pytest.mark.parametrize("k,m,n", [(1, 1, 1), (5, 7, 17), (130, 256, 700), (300, 250, 33), (257, 12, 16)])
def test_factor_products_kernel(k, m, n):
    """gemm_tn_sub: c -= a^T b for views with row strides (the factor's parts), edges of both
    tiles, inner dimensions across its chunks; c's other entries and a and b untouched."""
    g = torch.Generator().manual_seed(k + m + n)
    big = torch.randn(k + m + 3, max(m, n) + 40, generator=g)
    a, b = big[:k, 3 : 3 + m], big[:k, 5 : 5 + n]
    c_all = torch.randn(m + 2, n + 9, generator=g)
    c = c_all[1 : 1 + m, 4 : 4 + n]
    want_c = c.double() - a.double().t() @ b.double()
    before_big, before_all = big.clone(), c_all.clone()
    assert cpu_kernel.gemm_tn_sub(a, b, c) is c
    tol = 1e-5 * (a.double().abs().t() @ b.double().abs()).max().item() + 1e-6
    assert (c.double() - want_c).abs().max().item() <= tol
    assert torch.equal(big, before_big)
    outside = torch.ones_like(c_all, dtype=torch.bool)
    outside[1 : 1 + m, 4 : 4 + n] = False
    assert torch.equal(c_all[outside], before_all[outside])


def test_blocked_cholesky_without_the_kernel(monkeypatch):
    """Where the extension is not built the products are torch's: the same factor to rounding."""
    from quant import gptq

    x = correlated_inputs(1200, 600)
    h = x.t() @ x / 1200 + 0.01 * torch.eye(600)
    ours = gptq.cholesky_upper_(h.clone(), 128)
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    stock = gptq.cholesky_upper_(h.clone(), 128)
    exact = torch.linalg.cholesky(h.double(), upper=True)
    lapack = (torch.linalg.cholesky(h, upper=True).double() - exact).abs().max()
    assert (ours.double() - exact).abs().max() <= 2 * lapack + 1e-6
    assert (stock.double() - exact).abs().max() <= 4 * lapack + 1e-6  # MKL's sums: a longer chain


def test_blocked_cholesky_finishes_in_float64(monkeypatch):
    """A diagonal block float32 cannot factor: the rows above it stay, the rest is float64's."""
    from quant.gptq import cholesky_upper_

    x = correlated_inputs(600, 300)
    h = x.t() @ x / 600 + 0.01 * torch.eye(300)
    real, calls = torch.linalg.cholesky, []

    def failing_third_block(a, upper=False):
        calls.append(a.dtype)
        if a.dtype == torch.float32 and len(calls) == 3:
            raise torch.linalg.LinAlgError("not positive definite")
        return real(a, upper=upper)

    monkeypatch.setattr(torch.linalg, "cholesky", failing_third_block)
    m = cholesky_upper_(h.clone(), 64)
    assert calls == [torch.float32] * 3 + [torch.float64]
    exact = real(h.double(), upper=True)
    assert (m.double() - exact).abs().max() <= 2 * (real(h, upper=True).double() - exact).abs().max()


def test_error_feedback_may_consume_its_hessian():
    x = correlated_inputs(300, 96)
    h = x.t() @ x / 300
    kept = h.clone()
    want = error_feedback(h)
    assert torch.equal(h, kept)  # not consumed unless asked
    assert torch.equal(error_feedback(h, consume=True), want)


def test_error_feedback_reads_the_lower_triangle_of_any_multiple():
    """Only H's lower triangle is read (the Gram blocks need no mirror) and a sum gives what its
    mean gives (the damping is relative): the same feedback."""
    x = correlated_inputs(300, 96)
    h = x.t() @ x
    want = error_feedback(h / 300)
    lower = torch.tril(h) + torch.full_like(h, float("nan")).triu(1)  # the strict upper triangle: garbage
    # h and h / 300 round apart (300 is no power of two): entries up to ~1.6 here, apart by up
    # to 2e-5 where the CPU's LAPACK is held to AVX2 (an Intel CPU's MKL), 1e-5 otherwise.
    torch.testing.assert_close(error_feedback(lower, consume=True), want, rtol=1e-4, atol=1e-4)
    acc = HessianSum()
    acc.add(x[:100])
    acc.add(x[100:])
    torch.testing.assert_close(error_feedback(acc.take_lower()), want, rtol=1e-3, atol=1e-4)  # other sums
    assert acc.sum is None and acc.mean() is None


@pytest.mark.parametrize("kernel,dtype", [("bf16", torch.bfloat16), ("f32", torch.bfloat16), ("f32", torch.float32)])
@pytest.mark.parametrize("rows", [1, 2, 127, 300, 1100])
def test_gram_kernels(monkeypatch, rows, kernel, dtype):
    """quant/gram_kernel.py's Gram products (AVX512-BF16's; AVX2 FMA's, for bf16 or float32 inputs,
    past its chunk of 512 rows) equal float64 arithmetic on the same inputs within float32
    sums, in the blocks add_gram fills; inputs through HessianSum take the kernel this CPU runs,
    and a dominant direction costs no more error than float32 GEMM's."""
    from quant import gptq

    if not (cpu_kernel.gram_bf16_available() if kernel == "bf16" else cpu_kernel.available()):
        pytest.skip("needs AVX512-BF16 and the built kernel" if kernel == "bf16" else "needs the built kernel")
    gram = cpu_kernel.gram_bf16 if kernel == "bf16" else cpu_kernel.gram_f32
    monkeypatch.setattr(gptq, "GRAM_BLOCK", 128)  # 320 columns: blocks of 128, 128 and 64
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 320, generator=g)
    x[:, 3] *= 300  # a dominant column
    x = x.to(dtype)
    want = x.double().t() @ x.double()
    h = torch.full((320, 320), float("nan"))  # not read: overwritten where computed
    gram(x, h, 128, accumulate=False)
    h = torch.where(h.isnan(), 0.0, h)  # (a NaN input gives NaN sums; none here)
    edges = [0, 128, 256, 320]
    for i0, i1 in zip(edges, edges[1:], strict=False):
        assert not h[i0:i1, i1:].any()  # right of the block row's diagonal block: not touched
    got = gptq.mirror(h).double()
    scale = want.diagonal().sqrt()
    err = (got - want).abs() / (scale[:, None] * scale[None, :] + 1e-30)
    assert err.max() < 1e-6
    acc = HessianSum()
    acc.add(x[: rows // 2])
    acc.add(x[rows // 2 :])
    torch.testing.assert_close(acc.mean().double(), want / rows, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    nan = x.clone()
    nan[0, 5] = float("nan")
    h.zero_()
    gram(nan, h, 128)
    assert h[5, 5].isnan()


def test_calibration_reads_each_layer_ahead(scout_ckpt, tmp_path, monkeypatch):
    """The calibrated pass asks for each text layer's source bytes before the layer before it runs
    (exactly that layer's tensors, every byte of them), layer 0 before anything runs."""
    from llama4_local import pages
    from llama4_local.checkpoint import list_tensors, tensor_offsets
    from quant import calibrate, calibrated

    asked, events = [], []
    monkeypatch.setattr(pages, "read_ahead", lambda path, off, n: asked.append((path, off, n)))
    tensors = list_tensors(scout_ckpt)
    calibrated.read_ahead(tensors, 1)
    want = set()
    for name, path in tensors.items():
        if ".layers.1." in f".{name}":
            start, end = tensor_offsets(path)[name]
            want.add((path, start, end - start))
    assert want and set(asked) == want and len(asked) == len(want)

    real_ahead, real_run = calibrated.read_ahead, calibrate.LayerRunner.run_layer
    monkeypatch.setattr(calibrated, "read_ahead", lambda t, i: events.append(("ahead", i)) or real_ahead(t, i))
    monkeypatch.setattr(
        calibrate.LayerRunner, "run_layer", lambda self, i, **k: events.append(("run", i)) or real_run(self, i, **k)
    )
    quantize_checkpoint(scout_ckpt, tmp_path / "q", QuantizeOptions(calibration_tokens=64))
    n = load_model(scout_ckpt, "float32", "cpu")[1].num_layers
    want_events = [("ahead", 0)]
    for i in range(n):
        want_events += ([("ahead", i + 1)] if i + 1 < n else []) + [("run", i)]
    assert events == want_events


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_runner_reproduces_the_forward(scout_ckpt, dtype, monkeypatch):
    """Run layer by layer with the products in the model's dtype, the hidden states end where
    the whole model's forward ends (in bf16 too, where attention's weights are widened once per
    layer), and each routed expert sees exactly the rows routed to it (the int8 products:
    tests/test_int8_forward.py)."""
    monkeypatch.setenv("LLAMA4_LOCAL_NO_INT8_CALIBRATION", "1")
    model, cfg = load_model(scout_ckpt, dtype, "cpu")
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == "float32" else {"rtol": 2e-2, "atol": 2e-2}
    tok = Tokenizer(scout_ckpt)
    windows = calibration_windows(tok, None, 150, window=64)
    assert len(windows) == 3 and all(w[0] == tok.bos_id for w in windows)
    runner = LayerRunner(model, windows)
    routed = 0
    for i in range(cfg.num_layers):
        stats = runner.run_layer(i)
        assert stats.tokens == sum(len(w) for w in windows)
        assert stats.hessian("qkv").shape == (cfg.hidden_size, cfg.hidden_size)
        if model.layers[i].is_moe:
            ex = model.layers[i].feed_forward.experts
            for e in stats.expert_inputs:
                x, a = stats.expert_rows(e)
                torch.testing.assert_close(a.float(), ex.act(e, x).float(), **tol)  # down saw the original gate/up
                routed += x.shape[0]
    assert routed == cfg.top_k * stats.tokens * sum(layer.is_moe for layer in model.layers)
    for w, h in zip(windows, runner.hidden, strict=True):
        want = model(torch.tensor(w), model.new_cache(len(w)), last_only=False)
        got = model.lm_head(model.norm(h)).float()
        if dtype == "bfloat16":  # the same products, widened once instead of per call: bit for bit
            assert torch.equal(got, want.float())
        torch.testing.assert_close(got, want, **tol)
    moe = next(layer for layer in model.layers if layer.is_moe)
    assert "act" not in vars(moe.feed_forward.experts)  # the recording wrappers are gone
    assert "forward" not in vars(moe.self_attn.q_proj)


@pytest.fixture(scope="module")
def calibrated(scout_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq") / "int4"
    opts = QuantizeOptions(group_size=32, calibration_tokens=512)
    return out, quantize_checkpoint(scout_ckpt, out, opts)


def test_calibrated_default_layout(calibrated, scout_ckpt):
    out, summary = calibrated
    names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.layers.0.self_attn.q_proj.weight_packed" in names  # attention too, by default
    assert "model.layers.1.feed_forward.experts.3.down_proj.weight_packed" in names
    assert "model.layers.0.feed_forward.router.weight" in names
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert not any("self_attn" in i for i in ignore)
    # Still compressed-tensors' format: its decompressor reads what our dequantizer reads.
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from quant.format import QuantScheme, from_tensors

    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]

    def get(n):
        with safe_open(str(out / index[n]), "pt") as f:
            return f.get_tensor(n)

    prefix = "model.layers.1.self_attn.o_proj"
    state = {s: get(f"{prefix}.{s}") for s in ("weight_packed", "weight_scale", "weight_shape")}
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    theirs = PackedQuantizationCompressor.decompress(state, QuantizationScheme(targets=["Linear"], weights=args))
    ours = dequantize_int4(from_tensors(get, prefix, QuantScheme(32)))
    assert torch.equal(theirs["weight"].float(), ours.float())


def test_calibrated_is_closer_to_the_original(calibrated, scout_ckpt, tmp_path):
    """On text like the calibration's (another stretch of the same file), the calibrated model's
    logits are closer to the original's than those of the plain fit of the same tensors."""
    out, _ = calibrated
    plain = tmp_path / "plain"
    parts = ("experts", "shared", "mlp", "attention")
    quantize_checkpoint(scout_ckpt, plain, QuantizeOptions(group_size=32, calibrate=False, parts=parts))
    tok = Tokenizer(scout_ckpt)
    ids = torch.tensor(tok.encode(DEFAULT_TEXT.read_text()[-3000:], add_special_tokens=False)[:200])
    logits = {}
    for name, path in (("orig", scout_ckpt), ("gptq", out), ("plain", plain)):
        m, _ = load_model(path, "float32", "cpu")
        logits[name] = m(ids, m.new_cache(len(ids)), last_only=False)
    err = {k: ((logits[k] - logits["orig"]).norm() / logits["orig"].norm()).item() for k in ("gptq", "plain")}
    assert err["gptq"] < 0.9 * err["plain"], err


def test_calibration_inputs_checked(scout_ckpt, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not utf-8 \xff")
    with pytest.raises(UserError, match="cannot read calibration text"):
        quantize_checkpoint(scout_ckpt, tmp_path / "a", QuantizeOptions(group_size=64, calibration_text=bad))
    with pytest.raises(UserError, match="calibration-tokens"):
        quantize_checkpoint(scout_ckpt, tmp_path / "b", QuantizeOptions(group_size=64, calibration_tokens=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt"]  # nothing half-written


def test_non_finite_calibration_falls_back_to_the_plain_fit():
    """A checkpoint whose activations overflow on the calibration text: its linears get the plain
    fit (no factor) instead of a failed Cholesky."""
    from quant.calibrate import factor_or_none

    x = correlated_inputs(64, 128)
    h = HessianSum()
    h.add(x)
    assert factor_or_none(h.mean()) is not None and factor_or_none(None) is None
    x[3, 7] = float("inf")
    h.add(x)
    assert factor_or_none(h.mean()) is None
    with pytest.raises(ValueError, match="NaN or infinity"):
        error_feedback(h.mean())


def test_layer_runner_last_layer_without_output(scout_ckpt):
    """A layer run with output=False records the same statistics (its down projections' inputs
    included) without computing what they output, and leaves no hidden states behind."""
    model, cfg = load_model(scout_ckpt, "float32", "cpu")
    windows = calibration_windows(Tokenizer(scout_ckpt), None, 150, window=64)
    full, short = LayerRunner(model, windows), LayerRunner(model, windows)
    i = next(j for j, layer in enumerate(model.layers) if layer.is_moe)
    for j in range(i):
        full.run_layer(j)
        short.run_layer(j)
    want, got = full.run_layer(i), short.run_layer(i, output=False)
    assert short.hidden is None
    for role in ("qkv", "o", "shared_gu", "shared_down"):
        assert torch.equal(got.hessian(role), want.hessian(role))
    assert set(got.expert_inputs) == set(want.expert_inputs)
    for e in want.expert_inputs:
        assert all(torch.equal(a, b) for a, b in zip(got.expert_rows(e), want.expert_rows(e), strict=True))
    ff = model.layers[i].feed_forward
    assert "forward" not in vars(ff.shared_expert.down_proj) and "expert" not in vars(ff.experts)
