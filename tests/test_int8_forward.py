"""The calibration forward's int8 products (quant/int8_forward.py, quant/int8_kernel.py)."""

from __future__ import annotations

import pytest
import torch

from llama4_local.loader import load_model
from llama4_local.tokenizer import Tokenizer
from quant import cpu_kernel, int8_forward
from quant.calibrate import LayerRunner, calibration_windows
from quant.int8_forward import Int8Weight, product

pytestmark = pytest.mark.skipif(not cpu_kernel.available(), reason="needs the AVX2 extension")


def _slack() -> float:
    """How much more error than 8-bit activations give: 1.5x where the activations are 7-bit
    (int8_forward.activation_qmax: our maddubs kernel pairs steps)."""
    return 1.5 if int8_forward.activation_qmax() < 127 else 1.0


def _rounded(x: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """int8_rows' rounding in torch: round(x * (qmax / max|row|)), nearest even; scale max / qmax."""
    xf = x.float()
    amax = xf.abs().amax(1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, float(qmax)) / amax, torch.zeros_like(amax))
    return torch.round(xf * inv).to(torch.int8), (amax / qmax).squeeze(1)


@pytest.mark.parametrize(
    ("rows", "cols", "dtype"),
    [(37, 1003, torch.bfloat16), (5, 8, torch.float32), (64, 256, torch.float16), (3, 5, torch.float32)],
)
def test_int8_rows_as_torch_rounds(rows, cols, dtype):
    x = torch.randn(rows, cols).to(dtype) * torch.logspace(-3, 3, rows)[:, None].to(dtype)
    for qmax in (127, 63):
        q, s, crest = cpu_kernel.int8_rows(x, qmax)
        want_q, want_s = _rounded(x, qmax)
        assert torch.equal(q, want_q) and torch.equal(s, want_s)
        assert q.abs().max() == qmax
    xf = x.double()
    torch.testing.assert_close(crest.double(), xf.abs().amax(1) / xf.pow(2).mean(1).sqrt(), rtol=1e-5, atol=0)
    with pytest.raises(RuntimeError, match="qmax"):
        cpu_kernel.int8_rows(x, 128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_rows_and_cols_of_a_slice_read_it_in_place(dtype):
    """A slice of a wider matrix (rows further apart than their width, as GPTQ's int8 updates
    hand over) rounds as its contiguous copy does."""
    big = torch.randn(40, 300).to(dtype)
    part = big[3:30, 7:140]
    for fn, qmax in ((cpu_kernel.int8_rows, 127), (cpu_kernel.int8_cols, 63)):
        for got, want in zip(fn(part, qmax), fn(part.contiguous(), qmax), strict=True):
            assert torch.equal(got, want)


def test_int8_rows_nonfinite_and_zero_rows():
    x = torch.randn(4, 40)
    x[0, 13] = float("nan")
    x[1, 39] = float("inf")  # in the scalar tail
    x[2] = 0
    q, s, crest = cpu_kernel.int8_rows(x)
    assert s[:2].isnan().all()
    assert s[2] == 0 and (q[2] == 0).all()
    assert (crest[:3] == 0).all() and crest[3] > 1
    assert torch.equal(q[3], _rounded(x[3:])[0][0]) and torch.isfinite(s[3])


@pytest.mark.parametrize(("k", "o"), [(515, 77), (33, 200), (8, 64), (3, 7)])
def test_int8_cols_is_rows_of_the_transpose(k, o):
    w = torch.randn(k, o).bfloat16()
    w[k // 2, o - 1] = float("nan")
    q, s, crest = cpu_kernel.int8_cols(w)
    qt, st, ct = cpu_kernel.int8_rows(w.t().contiguous())
    ok = ~st.isnan()
    assert torch.equal(q.t()[ok], qt[ok]) and torch.equal(s[ok], st[ok])
    q7, s7, _ = cpu_kernel.int8_cols(w, 63)
    qt7, st7, _ = cpu_kernel.int8_rows(w.t().contiguous(), 63)
    assert torch.equal(q7.t()[ok], qt7[ok]) and torch.equal(s7[ok], st7[ok]) and q7.abs().max() == 63
    torch.testing.assert_close(crest, ct, rtol=1e-5, atol=0)
    assert s[o - 1].isnan() and ok.sum() == o - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_rescale(dtype):
    acc = torch.randint(-(1 << 24), 1 << 24, (9, 21), dtype=torch.int32)
    sx, sw = torch.rand(9), torch.rand(21)
    sx[4] = float("nan")
    got = cpu_kernel.int8_rescale(acc, sx, sw, torch.empty(9, 21, dtype=dtype))
    want = (acc.float() * sw) * sx[:, None]
    torch.testing.assert_close(got, want.to(dtype), rtol=0, atol=0, equal_nan=True)
    with pytest.raises(RuntimeError):
        cpu_kernel.int8_rescale(acc, sx, sw, torch.empty(9, 21, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_product_is_the_rounded_operands_product(dtype, monkeypatch):
    monkeypatch.setattr(int8_forward, "CHUNK_ROWS", 48)  # three chunks, the last one short
    x, w = torch.randn(130, 272).to(dtype), (torch.randn(96, 272) * 0.02).to(dtype)
    xq, sx = _rounded(x, int8_forward.activation_qmax())  # 7 bits where our kernel pairs steps
    wq, sw = _rounded(w, int8_forward.weight_qmax())  # 7 bits where oneDNN's pair sums saturate
    exact = (xq.double() @ wq.double().t()) * sw.double() * sx.double()[:, None]
    got = product(x, Int8Weight.of_linear(w))
    assert got.dtype == dtype
    torch.testing.assert_close(
        got.double(), exact.to(dtype).double(), rtol=1e-6 if dtype == torch.float32 else 8e-3, atol=1e-7
    )
    # the fused experts' layout [in, out] rounds the same integers
    w_io = Int8Weight.of_in_out(w.t().contiguous())
    assert torch.equal(w_io.ints(), Int8Weight.of_linear(w).ints()) and torch.equal(w_io.s, sw)
    assert torch.equal(w_io.ints(), wq.t())
    # and int8 costs about 1% of the product (2% with 7-bit weights, 3% with 7-bit activations too)
    ref = x.double() @ w.double().t()
    bits7 = (int8_forward.weight_qmax() < 127) + (int8_forward.activation_qmax() < 127)
    assert (got.double() - ref).norm() / ref.norm() < (0.02, 0.03, 0.04)[bits7]


def _exact(xq: torch.Tensor, q: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    return (xq.long() @ q.long()).double() * sw.double() * sx.double()[:, None]


@pytest.mark.parametrize(
    ("t", "k", "o"), [(1, 4, 16), (5, 7, 17), (33, 130, 50), (9, 1024, 96), (4, 3, 1), (6, 300, 40)]
)
def test_int8_gemm_is_the_exact_integer_product(t, k, o):
    """quant/int8_gemm_kernel.py: every tail (rows past a tile of 4, inputs past a step of 4,
    outputs past a panel of 16), weights packed from either layout, both output dtypes."""
    torch.manual_seed(t * k + o)
    qmax = cpu_kernel.int8_gemm_exact_qmax()
    xq = torch.randint(-127, 128, (t, k), dtype=torch.int8)
    q = torch.randint(-qmax, qmax + 1, (k, o), dtype=torch.int8)
    sx, sw = torch.rand(t) + 0.5, torch.rand(o) + 0.5
    want = ((xq.long() @ q.long()).float() * sw) * sx[:, None]  # int8_rescale's float operations
    # narrow: 7-bit activations (paired steps on the maddubs build), values past 63 clamped
    xn = xq.clamp(-63, 63)
    want_narrow = ((xn.long() @ q.long()).float() * sw) * sx[:, None]
    for layout in (q, q.t().contiguous().t(), q[:, :].clone()[:, torch.arange(o)]):
        packed, sums = cpu_kernel.int8_pack(layout)
        assert torch.equal(sums, q.sum(0, dtype=torch.int32))
        for dtype in (torch.float32, torch.bfloat16):
            got = cpu_kernel.int8_gemm(xq, packed, sums, sx, sw, torch.empty(t, o, dtype=dtype))
            assert torch.equal(got, want.to(dtype))
            for x in (xn, xq if cpu_kernel.int8_gemm_pairs() else xn):
                got = cpu_kernel.int8_gemm(x, packed, sums, sx, sw, torch.empty(t, o, dtype=dtype), narrow=True)
                assert torch.equal(got, want_narrow.to(dtype))


@pytest.mark.parametrize(("t", "k", "o"), [(1, 4, 16), (5, 7, 17), (33, 130, 50), (9, 128, 96), (19, 132, 40)])
def test_int8_gemm_add_adds_the_same_sums(t, k, o):
    """int8_gemm_add (GPTQ's int8 updates): int8_gemm's scaled sums added to a float32 output
    whose rows lie further apart than its width (to the last bit, which a fused multiply-add may
    keep); the gaps between rows untouched."""
    torch.manual_seed(t + k + o)
    qmax = cpu_kernel.int8_gemm_exact_qmax()
    xq = torch.randint(-127, 128, (t, k), dtype=torch.int8)
    packed, sums = cpu_kernel.int8_pack(torch.randint(-qmax, qmax + 1, (k, o), dtype=torch.int8))
    sx, sw = torch.rand(t) + 0.5, torch.rand(o) + 0.5
    base = torch.randn(t, o + 16)
    out = base.clone()
    assert cpu_kernel.int8_gemm(xq, packed, sums, sx, sw, out[:, :o], add=True) is not None
    want = base[:, :o] + cpu_kernel.int8_gemm(xq, packed, sums, sx, sw, torch.empty(t, o))
    torch.testing.assert_close(out[:, :o], want, rtol=2e-7, atol=0)
    assert torch.equal(out[:, o:], base[:, o:])
    with pytest.raises(RuntimeError, match="out"):
        cpu_kernel.int8_gemm(xq, packed, sums, sx, sw, torch.empty(o, t + 1).t()[:t], add=True)
    with pytest.raises(RuntimeError, match="out"):
        cpu_kernel.int8_gemm(xq, packed, sums, sx, sw, out[:, :o].bfloat16(), add=True)


@pytest.mark.parametrize(("t", "o", "groups", "k"), [(7, 40, 3, 128), (33, 17, 4, 128), (20, 64, 2, 8)])
def test_int8_gemm_groups_add_as_the_groups_one_after_another(t, o, groups, k):
    """int8_gemm with sums [G, O] (GPTQ's updates of far columns, four blocks in one pass): the
    same float additions as one int8_gemm_add per group in order, to the last bit, in both the
    threads-take-rows form (short K) and the threads-take-panels one."""
    torch.manual_seed(t + o + groups)
    qmax = cpu_kernel.int8_gemm_exact_qmax()
    parts = []
    for _ in range(groups):
        xq = torch.randint(-63, 64, (t, k), dtype=torch.int8)
        packed, sums = cpu_kernel.int8_pack(torch.randint(-qmax, qmax + 1, (k, o), dtype=torch.int8))
        parts.append((xq, packed, sums, torch.rand(t) + 0.5, torch.rand(o) + 0.5))
    base = torch.randn(t, o + 8)
    want = base.clone()
    for xq, packed, sums, sx, sw in parts:
        cpu_kernel.int8_gemm(xq, packed, sums, sx, sw, want[:, :o], narrow=True, add=True)
    got = base.clone()
    cat = [torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)]
    stacked = [torch.stack([p[i] for p in parts]) for i in (2, 3, 4)]
    cpu_kernel.int8_gemm(cat[0], cat[1], stacked[0], stacked[1], stacked[2], got[:, :o], narrow=True, add=True)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="add=True"):
        cpu_kernel.int8_gemm(cat[0], cat[1], stacked[0], stacked[1], stacked[2], torch.empty(t, o))
    with pytest.raises(RuntimeError, match="sx"):
        cpu_kernel.int8_gemm(cat[0], cat[1], stacked[0], stacked[1][:1], stacked[2], got[:, :o], add=True)


def test_int8_gemm_nan_scales_and_bad_operands():
    xq, q = torch.randint(-127, 128, (6, 40), dtype=torch.int8), torch.randint(-63, 64, (40, 20), dtype=torch.int8)
    sx, sw = torch.rand(6), torch.rand(20)
    sx[2], sw[19] = float("nan"), float("nan")
    packed, sums = cpu_kernel.int8_pack(q)
    got = cpu_kernel.int8_gemm(xq, packed, sums, sx, sw, torch.empty(6, 20))
    assert got[2].isnan().all() and got[:, 19].isnan().all() and got[[0, 1, 3, 4, 5], :19].isfinite().all()
    with pytest.raises(RuntimeError, match="packed"):
        cpu_kernel.int8_gemm(xq[:, :36], packed, sums, sx, sw, torch.empty(6, 20))
    with pytest.raises(RuntimeError, match="out"):
        cpu_kernel.int8_gemm(xq, packed, sums, sx, sw, torch.empty(6, 20, dtype=torch.float16))


def test_the_int8_gemm_is_ours_where_torch_has_no_fast_one():
    """PyTorch's CPU _int_mm is oneDNN's only with AVX512-VNNI; elsewhere a scalar loop (30-70x
    slower than its float32 GEMM), so our kernel multiplies there."""
    assert int8_forward.int8_gemm_by_torch() == (cpu_kernel.isa() == "avx512-vnni")
    w = Int8Weight.of_linear(torch.randn(24, 64))
    assert (w.packed is None) == int8_forward.int8_gemm_by_torch() == (w.q is not None)  # one int8 copy


def test_weights_take_the_most_levels_whose_products_are_exact():
    """Uniform full-range operands, where large bytes meet in many pair sums: with the levels
    weight_qmax picks, the product is exactly the rounded operands' product; on our maddubs
    build, weights of 127 levels would not be (its int16 pair sums saturate: why 63 there)."""
    torch.manual_seed(0)
    x, w = torch.rand(64, 512) * 2 - 1, torch.rand(96, 512) * 2 - 1
    xq, sx = _rounded(x, int8_forward.activation_qmax())
    iw = Int8Weight.of_linear(w)
    assert iw.ints().abs().max() == int8_forward.weight_qmax()
    assert torch.allclose(product(x, iw).double(), _exact(xq, iw.ints(), sx, iw.s), rtol=1e-6, atol=1e-7)
    if not int8_forward.int8_gemm_by_torch():
        xq, sx = _rounded(x)
        assert int8_forward.weight_qmax() == cpu_kernel.int8_gemm_exact_qmax()
        full, sw = _rounded(w)
        packed, sums = cpu_kernel.int8_pack(full.t())
        got = cpu_kernel.int8_gemm(xq, packed, sums, sx, sw, torch.empty(64, 96)).double()
        assert torch.allclose(got, _exact(xq, full.t(), sx, sw), rtol=1e-6, atol=1e-7) == (
            cpu_kernel.int8_gemm_exact_qmax() == 127
        )


SATURATING = """
import torch
from quant import int8_forward
from quant.int8_forward import Int8Weight, product
torch.manual_seed(0)
x, w = torch.rand(64, 512) * 2 - 1, torch.rand(96, 512) * 2 - 1
xq = torch.round(x * (127 / x.abs().amax(1, keepdim=True))).to(torch.int8)
full = torch.round(w * (127 / w.abs().amax(1, keepdim=True))).to(torch.int8)
print(int8_forward.weight_qmax(), torch.equal(torch._int_mm(xq, full.t()), (xq.int() @ full.int().t())))
iw = Int8Weight.of_linear(w)
want = (xq.double() @ iw.q.double()) * iw.s.double() * (x.abs().amax(1) / 127).double()[:, None]
print(torch.allclose(product(x, iw).double(), want, rtol=1e-6, atol=1e-7))
"""


@pytest.mark.skipif(not int8_forward.int8_gemm_by_torch(), reason="torch._int_mm is not what multiplies here")
def test_onednn_held_to_avx2_is_probed_to_7_bits():
    """oneDNN held to AVX2 (vpmaddubsw: saturating 16-bit pair sums) inside torch._int_mm gets
    probed as such: the weights are rounded to 63 levels and the products stay exact."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = [sys.executable, "-c", SATURATING]
    out = subprocess.run(run, env=env, cwd=root, capture_output=True, text=True, check=True)
    qmax, exact_full, exact = out.stdout.split()
    assert (qmax, exact_full, exact) == ("63", "False", "True")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_and_outputs_with_a_high_crest_keep_the_dtype(dtype):
    """A token with a massive activation, or an output whose weights one value dominates, is
    computed in the model's dtype; the others in int8."""
    x, w = torch.randn(64, 1024), torch.randn(96, 1024) * 0.02
    x[5, 17] = 1000.0  # crest ~32 (a one-hot row's is sqrt(1024))
    w[40, 3] = 1.0  # crest ~27
    assert int8_forward.CREST < 26
    x, w = x.to(dtype), w.to(dtype)
    iw = Int8Weight.of_linear(w)
    assert iw.exact.tolist() == [40]
    got, exact = product(x, iw), x @ w.t()
    tol = 1e-5 if dtype == torch.float32 else 4e-3  # one product against another's summation order (the
    # massive activation's outputs lose ~1e-6 of the row's norm to float32 rounding: 1e-6 failed 1 run in ~10)
    for g, e in ((got[5], exact[5]), (got[:, 40], exact[:, 40])):
        assert (g - e).float().norm() <= tol * e.float().norm()
    rest = torch.ones_like(got, dtype=torch.bool)
    rest[5], rest[:, 40] = False, False
    assert not torch.equal(got[rest], exact[rest])
    assert (got[rest] - exact[rest]).float().norm() <= 0.02 * _slack() * exact[rest].float().norm()
    w_io = Int8Weight.of_in_out(w.t().contiguous())
    assert w_io.exact.tolist() == [40] and torch.allclose(product(x, w_io).float(), got.float(), rtol=1e-2, atol=1e-3)


def test_only_plain_weights_get_an_int8_forward():
    lin = torch.nn.Linear(64, 32, bias=False)
    assert int8_forward.int8_linear(lin) and "forward" in vars(lin)
    fp8 = torch.nn.Module()
    fp8.weight = torch.zeros(32, 64).to(torch.float8_e4m3fn)
    assert not int8_forward.int8_linear(fp8) and "forward" not in vars(fp8)
    few = torch.randn(int8_forward.MIN_ROWS - 1, 64)  # too few rows: the module's own forward
    assert torch.equal(lin(few), few @ lin.weight.t())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_runner_with_int8_products(scout_ckpt, dtype, monkeypatch):
    """With int8 products the layer-by-layer hidden states stay within a few percent of the
    model's forward (this random model's layers add 1-2% each, half as much again with 7-bit
    activations), each routed expert still
    records the rows routed to it and what its down saw, and every wrapper is gone afterwards."""
    monkeypatch.delenv("LLAMA4_LOCAL_NO_INT8_CALIBRATION", raising=False)
    calls, experts_rounded = [], []
    real = int8_forward.product
    monkeypatch.setattr(int8_forward, "product", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    monkeypatch.setattr(int8_forward, "EXPERT_MIN_ROWS", int8_forward.MIN_ROWS)  # this model's experts see ~40
    of_in_out = Int8Weight.of_in_out
    monkeypatch.setattr(Int8Weight, "of_in_out", lambda w: experts_rounded.append(w.shape) or of_in_out(w))
    model, cfg = load_model(scout_ckpt, dtype, "cpu")
    tok = Tokenizer(scout_ckpt)
    windows = calibration_windows(tok, None, 150, window=64)
    runner = LayerRunner(model, windows)
    routed = 0
    for i in range(cfg.num_layers):
        stats = runner.run_layer(i)
        ex = model.layers[i].feed_forward.experts
        for e in stats.expert_inputs:
            x, a = stats.expert_rows(e)
            want = ex.act(e, x).float()
            assert (a.float() - want).norm() <= 0.03 * _slack() * want.norm()
            routed += x.shape[0]
    assert routed == cfg.top_k * stats.tokens * cfg.num_layers
    assert calls and min(calls) >= int8_forward.MIN_ROWS
    assert experts_rounded  # some routed experts ran in int8 too
    for w, h in zip(windows, runner.hidden, strict=True):
        want = model(torch.tensor(w), model.new_cache(len(w)), last_only=False).float()
        got = model.lm_head(model.norm(h)).float()
        assert (got - want).norm() <= 0.1 * _slack() * want.norm()
    layer = model.layers[0]
    mlp = layer.feed_forward.shared_expert
    for lin in (layer.self_attn.q_proj, layer.self_attn.o_proj, mlp.gate_proj, mlp.down_proj):
        assert "forward" not in vars(lin)
    assert not {"act", "expert"} & set(vars(layer.feed_forward.experts))


def test_experts_with_few_rows_keep_the_model_path(scout_ckpt):
    model, _ = load_model(scout_ckpt, "float32", "cpu")
    experts = model.layers[0].feed_forward.experts
    act, expert = int8_forward.int8_experts(experts)
    few = torch.randn(int8_forward.EXPERT_MIN_ROWS - 1, experts.gate_up_proj.shape[1])
    assert torch.equal(act(0, few), experts.act(0, few))
    assert torch.equal(expert(0, few), experts.expert(0, few))
    many = torch.randn(int8_forward.EXPERT_MIN_ROWS, experts.gate_up_proj.shape[1])
    want = experts.expert(0, many)
    got = expert(0, many)
    assert not torch.equal(got, want) and (got - want).norm() <= 0.03 * _slack() * want.norm()
