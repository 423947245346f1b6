"""INT4 kernels against the dequantize-then-matmul reference."""

import pytest
import torch

from quant import q6
from quant.head import Q6Linear
from quant.int4 import quantize_int4
from quant.kernels import Int4Linear, kernel_for


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 33, 34])
@pytest.mark.parametrize("path", ["cpu", "avx2", "avx2_q8"])
def test_cpu_kernels_match_reference(group_size, symmetric, dtype, rows, path, gemm_rows):
    from quant import cpu_kernel

    # The kernels' own dot products at every row count: on AMX CPUs a run's products of 32 rows
    # and more go through bf16 GEMMs instead (tests/test_int4_gemm.py: that path, and when).
    gemm_rows("0")
    if path.startswith("avx2") and not cpu_kernel.available():
        pytest.skip("no AVX2/FMA CPU or no C++ compiler")
    g = torch.Generator().manual_seed(group_size + rows)
    qw = quantize_int4(torch.randn(96, 256, generator=g), group_size, symmetric, scale_dtype=torch.bfloat16)
    cpu = torch.device("cpu")
    # Ours where it builds (int8 activations for bf16 runs); else the stock kernel for bf16, the
    # reference for float32 activations.
    if cpu_kernel.available():
        expect = "avx2_q8" if dtype == torch.bfloat16 else "avx2"
    else:
        expect = "cpu" if dtype == torch.bfloat16 else "reference"
    assert kernel_for(qw, cpu, dtype) == expect
    x = torch.randn(rows, 256, generator=g).to(dtype)
    got = Int4Linear(qw, cpu, dtype, path=path)(x)
    ref = Int4Linear(qw, cpu, torch.float32, path="reference")
    want = ref(x.float())
    assert got.dtype == dtype and got.shape == (rows, 96)
    if path == "avx2_q8":  # the rounding of activations to int8 costs about 0.5% here
        assert rel_err(got, want) < 1.5e-2
        want = ref(cpu_kernel.round_activations_int8(x, cpu_kernel.int8_span(group_size)))
    assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("rows", [1, 2, 3, 8])
def test_int8_activation_kernel_is_exact_on_rounded_activations(group_size, rows):
    """In float32 out, the int8 kernel equals the reference fed the int8-rounded activations:
    the integer dot products add no error beyond that rounding."""
    from quant import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("no AVX2/FMA CPU or no C++ compiler")
    g = torch.Generator().manual_seed(rows)
    qw = quantize_int4(torch.randn(64, 512, generator=g), group_size, False, scale_dtype=torch.bfloat16)
    lin = Int4Linear(qw, "cpu", torch.bfloat16)
    x = torch.randn(rows, 512, generator=g) * torch.logspace(-3, 1, 512)  # blocks of very different scale
    x[0, :32] = 0  # an all-zero block
    got = cpu_kernel.int4_mv(x, lin.packed, lin.scales_and_zeros, group_size, True)
    xr = cpu_kernel.round_activations_int8(x, cpu_kernel.int8_span(group_size))
    assert torch.equal(xr[0, :32], torch.zeros(32))
    want = Int4Linear(qw, "cpu", torch.float32, path="reference")(xr)
    assert rel_err(got, want) < 1e-5
    plain = cpu_kernel.int4_mv(x, lin.packed, lin.scales_and_zeros, group_size, False)
    assert rel_err(plain, Int4Linear(qw, "cpu", torch.float32, path="reference")(x)) < 1e-5


@pytest.mark.parametrize("group_size", [128, 256])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_spans_of_128_across_passes_and_wide_groups(group_size, symmetric):
    """The int8 path with each row's own activation rounding (per 128 inputs, int8_span): one
    row (the decode stream), a few (one pass) and many (passes of 3-5 rows over blocks of weight
    rows), at groups of one and two spans, against the reference fed those rounded activations."""
    from quant import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("no AVX2/FMA CPU or no C++ compiler")
    g = torch.Generator().manual_seed(group_size)
    qw = quantize_int4(torch.randn(200, 1024, generator=g), group_size, symmetric, scale_dtype=torch.bfloat16)
    lin = Int4Linear(qw, "cpu", torch.bfloat16)
    ref = Int4Linear(qw, "cpu", torch.float32, path="reference")
    for rows in (1, 4, 7, 23):
        x = torch.randn(rows, 1024, generator=g) * torch.logspace(-2, 1, 1024)
        got = cpu_kernel.int4_mv(x, lin.packed, lin.scales_and_zeros, group_size, True)
        want = ref(cpu_kernel.round_activations_int8(x, cpu_kernel.int8_span(group_size)))
        assert rel_err(got, want) < 1e-5, rows


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outer_product_tiles_equal_the_reference_on_rounded_activations(symmetric, dtype):
    """The outer-product VNNI tiles (quant/int4_outer_kernel.py): every tile height left over
    (rows 1 to 8 past full tiles of 8), blocks of 32 weight rows, activation spans of very
    different scale and an all-zero one, against the reference fed the same per-128 rounding,
    and equal to int4_mv's integer path but for float summation order; NaN stays in its row."""
    from quant import cpu_kernel

    if not cpu_kernel.outer_available():
        pytest.skip("no AVX-512 VNNI build here")
    g = torch.Generator().manual_seed(11 + symmetric)
    qw = quantize_int4(torch.randn(96, 640, generator=g), 128, symmetric, scale_dtype=torch.bfloat16)
    lin = Int4Linear(qw, "cpu", torch.bfloat16)
    ref = Int4Linear(qw, "cpu", torch.float32, path="reference")
    for rows in (1, 3, 8, 9, 16, 23):
        x = (torch.randn(rows, 640, generator=g) * torch.logspace(-2, 1, 640)).to(dtype)
        x[0, 128:256] = 0
        got = cpu_kernel.int4_gemm_outer(x, lin.packed, lin.scales_and_zeros, 128)
        assert got.dtype == dtype and got.shape == (rows, 96)
        want = ref(cpu_kernel.round_activations_int8(x.float(), 128))
        assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 1e-2), rows
        mv = cpu_kernel.int4_mv(x, lin.packed, lin.scales_and_zeros, 128, True)
        assert rel_err(got, mv) < (1e-6 if dtype == torch.float32 else 1e-2), rows
    x = torch.randn(10, 640, generator=g)
    x[9, 300] = float("nan")
    got = cpu_kernel.int4_gemm_outer(x, lin.packed, lin.scales_and_zeros, 128)
    assert torch.isnan(got[9]).all() and torch.isfinite(got[:9]).all()
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpu_kernel.int4_gemm_outer(x, lin.packed[:40], lin.scales_and_zeros[:40], 128)


def test_the_kernel_reads_the_stored_words_as_they_are():
    """Byte j of a row holds input 2j (low nibble) and 2j + 1 (high): compressed-tensors' order,
    and the kernel's buffer is a view of the loaded tensor, not a copy."""
    from quant.cpu_kernel import stored_bytes
    from quant.int4 import pack_int4

    q = (torch.arange(64).remainder(16) - 8).reshape(1, 64).to(torch.int8)
    packed = pack_int4(q)
    p = stored_bytes(packed)
    assert p.shape == (1, 32) and p.dtype == torch.uint8 and p.data_ptr() == packed.data_ptr()
    lo, hi = p & 15, p >> 4
    assert torch.equal(torch.stack([lo, hi], -1).reshape(1, 64), (q + 8).to(torch.uint8))
    qw = quantize_int4(torch.randn(16, 256), 64)
    lin = Int4Linear(qw, "cpu", torch.bfloat16)
    if lin.path in ("avx2", "avx2_q8"):
        assert lin.packed.data_ptr() == qw.packed.data_ptr()


def test_unsupported_shape_falls_back_to_reference():
    qw = quantize_int4(torch.randn(8, 48), 16)  # K = 48 is not a multiple of 32
    lin = Int4Linear(qw, "cpu", torch.float32)
    assert lin.path == "reference"
    x = torch.randn(2, 48)
    assert lin(x).shape == (2, 8)


@pytest.mark.cuda
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("path", ["triton", "cuda"])
def test_cuda_kernel_matches_reference(symmetric, rows, path):
    from quant import triton_int4

    g = torch.Generator().manual_seed(rows)
    qw = quantize_int4(torch.randn(256, 512, generator=g), 128, symmetric, scale_dtype=torch.bfloat16)
    dev = torch.device("cuda")
    # Triton where it is installed, unless LLAMA4_LOCAL_CUDA_INT4=stock
    assert kernel_for(qw, dev, torch.bfloat16) == ("triton" if triton_int4.available() else "cuda")
    if path == "triton" and not triton_int4.available():
        pytest.skip("no Triton")
    lin = Int4Linear(qw, dev, torch.bfloat16, path=path)
    x = torch.randn(rows, 512, generator=g).to(dev, torch.bfloat16)
    want = Int4Linear(qw, dev, torch.float32, path="reference")(x.float())
    assert rel_err(lin(x), want) < 1e-2


@pytest.mark.cuda
def test_triton_int4_kernels_match_reference():
    """GEMV and dequantize (symmetric and not, bf16 and float32, NaN rows) on the GPU."""
    pytest.importorskip("triton")
    from tests.triton_check import check, check_experts, check_moe, check_q6

    assert check("cuda") == []
    assert check_moe("cuda") == []
    assert check_experts("cuda") == []
    assert check_q6("cuda") == []


def test_triton_int4_kernels_in_the_interpreter():
    """The same checks on the CPU through Triton's interpreter, where Triton is installed."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("no Triton (CPU wheels of torch come without it)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "tests.triton_check"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_int8_activation_kernel_does_not_hide_non_finite_inputs(bad):
    from quant import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("no AVX2/FMA CPU or no C++ compiler")
    qw = quantize_int4(torch.randn(16, 128), 64, True)
    lin = Int4Linear(qw, "cpu", torch.bfloat16)
    x = torch.randn(2, 128).bfloat16()
    x[1, 5] = bad
    y = lin(x)
    assert torch.isfinite(y[0]).all() and not torch.isfinite(y[1]).any()


def test_use_cpu_path_switches_a_loaded_model(scout_int4):
    from llama4_local.loader import load_model
    from quant import cpu_kernel
    from quant.kernels import use_cpu_path

    if not cpu_kernel.available():
        pytest.skip("no AVX2/FMA CPU or no C++ compiler")
    model, _ = load_model(scout_int4[0], "bfloat16", "cpu")
    ids = torch.arange(3, 15)
    q8 = model(ids, model.new_cache(12), last_only=False)
    n = use_cpu_path(model, "avx2")
    assert n > 0
    plain = model(ids, model.new_cache(12), last_only=False)
    m32, _ = load_model(scout_int4[0], "float32", "cpu")
    exact = m32(ids, m32.new_cache(12), last_only=False)
    # This random tiny model amplifies any rounding (bf16 alone: about 14% here); int8
    # activations add little to what bf16 costs.
    assert not torch.equal(q8, plain)
    assert rel_err(q8, exact) < 1.25 * rel_err(plain, exact)
    assert use_cpu_path(model, "avx2_q8") == n
    assert torch.equal(model(ids, model.new_cache(12), last_only=False), q8)
    with pytest.raises(ValueError):
        use_cpu_path(model, "cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 7, 130])
def test_half_matvec_matches_float32_product(dtype, rows, n):
    from quant import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("no AVX2 kernel on this machine")
    g = torch.Generator().manual_seed(rows * 1000 + n)
    w = torch.randn(n, 96, generator=g).to(dtype)
    x = torch.randn(rows, 96, generator=g)
    want = x @ w.float().t()
    got = cpu_kernel.half_mv(x, w)  # float32 in, float32 out: only the summation order differs
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    x[0, 5] = float("nan")
    assert cpu_kernel.half_mv(x, w)[0].isnan().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("k, n", [(1, 5), (37, 100), (96, 2051), (301, 4099)])
def test_half_vecmat_on_inputs_by_outputs_weights(dtype, rows, k, n):
    """half_vm: x @ w for w stored [K, N] (the fused experts' layout): odd K (the rows left after
    four a pass), N past a column chunk and not a multiple of 8, NaN kept to its row."""
    from quant import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("no AVX2 kernel on this machine")
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    w = torch.randn(k, n, generator=g).to(dtype)
    x = torch.randn(rows, k, generator=g)
    want = x @ w.float()
    got = cpu_kernel.half_vm(x, w)  # float32 in and out: only the summation order differs
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-5, atol=1e-4)
    xb = x.bfloat16()
    assert cpu_kernel.half_vm(xb, w).dtype == torch.bfloat16
    x[0, k // 2] = float("nan")
    got = cpu_kernel.half_vm(x, w)
    assert got[0].isnan().all() and not got[1:].isnan().any()


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_half_kernels_bf16_dot_products(rows, layout):
    """Where the CPU has AVX512-BF16, bf16 activations times bf16 weights go through vdpbf16ps
    (half_bf16_dot): each output within one bf16 rounding (plus float32 sums) of the exact
    product, and of the widening path's; shapes off every block (K odd for [K, N], columns past a
    32-column block and past one column range, K past a 64-input block for [N, K]); NaN kept to
    its row."""
    from quant import cpu_kernel

    if not (cpu_kernel.available() and cpu_kernel.half_bf16_dot_default()):
        pytest.skip("no AVX512-BF16 on this machine")
    g = torch.Generator().manual_seed(rows)
    shapes = [(1, 16), (7, 48), (130, 96), (33, 1040)] if layout == "out_in" else [(1, 5), (37, 100), (9, 16411)]
    fn = cpu_kernel.half_mv if layout == "out_in" else cpu_kernel.half_vm
    for shape in shapes:
        w = torch.randn(*shape, generator=g).bfloat16()
        k = shape[1] if layout == "out_in" else shape[0]
        x = torch.randn(rows, k, generator=g).bfloat16()
        exact = x.double() @ (w.double().t() if layout == "out_in" else w.double())
        try:
            cpu_kernel.set_half_bf16_dot(False)
            widened = fn(x, w)
            cpu_kernel.set_half_bf16_dot(True)
            got = fn(x, w)
        finally:
            cpu_kernel.set_half_bf16_dot(cpu_kernel.half_bf16_dot_default())
        assert got.dtype == torch.bfloat16 and got.shape == exact.shape
        tol = exact.abs() * 2**-8 + 1e-5 * k
        assert ((got.double() - exact).abs() <= tol).all(), shape
        assert ((got.double() - widened.double()).abs() <= 2 * tol).all(), shape
        x[0, k // 2] = float("nan")
        got = fn(x, w)
        assert got[0].isnan().all() and not got[1:].isnan().any()


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_low_precision_decode_products_use_the_half_kernels(monkeypatch, layout):
    """model.linear on a bf16 CPU weight [out, in] with a few rows goes through half_mv, and
    model.matmul on one stored [in, out] (the fused experts) through half_vm, rounded like
    torch.mv's."""
    from llama4_local import model
    from quant import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("no AVX2 kernel on this machine")
    name = "half_mv" if layout == "out_in" else "half_vm"
    calls = []
    real = getattr(cpu_kernel, name)
    monkeypatch.setattr(cpu_kernel, name, lambda x, w: calls.append(x.shape) or real(x, w))
    x = torch.randn(3, 128).bfloat16()
    if layout == "out_in":
        w = torch.randn(64, 128).bfloat16()
        got, want = model.linear(x, w), torch.stack([torch.mv(w, r) for r in x]).float()
    else:
        w = torch.randn(128, 64).bfloat16()
        got, want = model.matmul(x, w), x.float() @ w.float()
    assert calls == [(3, 128)] and got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 2 * want.abs().max() * 2**-8


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 9])
@pytest.mark.parametrize("n", [1, 6, 67])
def test_int8_weight_kernel_is_exact_on_rounded_inputs(rows, n):
    """Int8Linear: fed the int8-rounded activations, the integer kernel equals a float product with
    the dequantized INT8 weight; a NaN in x reaches its outputs."""
    from quant import cpu_kernel
    from quant.kernels import Int8Linear

    if not cpu_kernel.available():
        pytest.skip("no AVX2 kernel on this machine")
    g = torch.Generator().manual_seed(rows * 100 + n)
    w = (torch.randn(n, 160, generator=g) * torch.logspace(-3, 0, 160)).bfloat16()
    lin = Int8Linear(w)
    deq = (lin.qweight.float().view(n, -1, 32) * lin.scales.unsqueeze(-1)).view(n, 160)
    assert rel_err(deq, w.float()) < 0.01  # INT8 per block of 32: under 1% of the weight's norm
    x = torch.randn(rows, 160, generator=g)
    want = cpu_kernel.round_activations_int8(x) @ deq.t()
    assert rel_err(lin(x), want) < 1e-4  # the order of the float32 sums differs
    assert lin(x.reshape(1, rows, 160)).shape == (1, rows, n)  # leading dimensions are kept
    x[0, 7] = float("nan")
    assert lin(x)[0].isnan().all()


def test_int8_attention_replaces_the_projections_of_a_bf16_model(scout_ckpt):
    from llama4_local.loader import load_model
    from quant import cpu_kernel
    from quant.kernels import Int8Linear

    if not cpu_kernel.available():
        pytest.skip("no AVX2 kernel on this machine")
    plain, cfg = load_model(scout_ckpt, "bfloat16", "cpu")
    q8, _ = load_model(scout_ckpt, "bfloat16", "cpu", int8_attention=True)
    assert sum(isinstance(m, Int8Linear) for m in q8.modules()) == 4 * cfg.num_layers
    f32, _ = load_model(scout_ckpt, "float32", "cpu", int8_attention=True)
    assert not any(isinstance(m, Int8Linear) for m in f32.modules())  # the precise mode stays exact
    ids = torch.arange(3, 40)
    exact = f32(ids, f32.new_cache(40), last_only=False)
    bf16 = plain(ids, plain.new_cache(40), last_only=False).float()
    int8 = q8(ids, q8.new_cache(40), last_only=False).float()
    # Against the float32 run, INT8 attention in a bf16 run costs no more than bf16 itself does.
    assert rel_err(int8, exact) < rel_err(bf16, exact)


def test_a_quantized_checkpoints_bf16_run_reads_an_int8_lm_head(scout_int4, monkeypatch):
    from llama4_local.loader import load_model
    from quant import cpu_kernel, head, kernels
    from quant.kernels import Int8Linear

    if not cpu_kernel.available():
        pytest.skip("no AVX2 kernel on this machine")
    path, _ = scout_int4
    q8, _ = load_model(path, "bfloat16", "cpu")
    assert isinstance(q8.lm_head, Int8Linear)
    f32, _ = load_model(path, "float32", "cpu")
    assert not isinstance(f32.lm_head, Int8Linear)  # the precise mode stays exact
    monkeypatch.setattr(kernels, "int8_lm_head", lambda model: False)
    monkeypatch.setattr(head, "sidecar_lm_head", lambda *args: False)  # and no INT8 blocks from beside it
    plain, _ = load_model(path, "bfloat16", "cpu")
    assert not isinstance(plain.lm_head, Int8Linear)
    ids = torch.arange(3, 40)
    exact = f32(ids, f32.new_cache(40), last_only=False)
    bf16 = plain(ids, plain.new_cache(40), last_only=False).float()
    int8 = q8(ids, q8.new_cache(40), last_only=False).float()
    assert 0 < rel_err(int8, bf16) < 0.02  # not the same weights, close ones
    assert rel_err(int8, exact) < 1.05 * rel_err(bf16, exact)  # costs next to nothing over bf16's own error


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_symmetric_scales_alone_compute_the_same_bits(group_size, rows):
    """Symmetric weights keep [N, 1, G] scales (the constant -8 s is formed in the kernel): the
    same float32 results, bit for bit, as the [N, 2, G] scale-and-constant layout."""
    from quant import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("no AVX2/FMA CPU or no C++ compiler")
    g = torch.Generator().manual_seed(rows)
    qw = quantize_int4(torch.randn(40, 256, generator=g), group_size, True, scale_dtype=torch.bfloat16)
    lin = Int4Linear(qw, "cpu", torch.bfloat16)
    assert lin.scales_and_zeros.shape == (40, 1, 256 // group_size)
    both = cpu_kernel.pack_scales(qw.scale, torch.zeros_like(qw.scale, dtype=torch.float32))
    x = torch.randn(rows, 256, generator=g)
    for q8 in (True, False):
        alone = cpu_kernel.int4_mv(x, lin.packed, lin.scales_and_zeros, group_size, q8)
        assert torch.equal(alone, cpu_kernel.int4_mv(x, lin.packed, both, group_size, q8))


@pytest.mark.parametrize("q8", [True, False])
def test_many_rows_equal_one_row_at_a_time(q8):
    """Prefill-sized inputs go through in blocks of weight rows, three activation rows at a time:
    every row's result is that row's alone, to float32 rounding. Only the order of the sums
    differs: one int8 row streams through row_q8_stream, which alternates two accumulators
    between groups (FMA latency off the decode's critical path) where a tile keeps one, and an
    AVX-512 build's tiles sum four blocks per register; float rows split their sums into as many
    chains as the row count allows. (A Zen 3 host, AVX2: 40% of outputs differ, by 1.6e-7 of the
    output's norm.)"""
    from quant import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("no AVX2/FMA CPU or no C++ compiler")
    g = torch.Generator().manual_seed(7)
    qw = quantize_int4(torch.randn(200, 256, generator=g), 128, True, scale_dtype=torch.bfloat16)
    lin = Int4Linear(qw, "cpu", torch.bfloat16)
    x = torch.randn(41, 256, generator=g)

    def mv(x):
        return cpu_kernel.int4_mv(x, lin.packed, lin.scales_and_zeros, 128, q8)

    whole = mv(x)
    rows = torch.cat([mv(x[i : i + 1]) for i in range(41)])
    torch.testing.assert_close(whole, rows, rtol=1e-5, atol=1e-4)
    cpu_kernel.set_zmm_one_row(True)  # AVX-512 builds: a decode row through the prefill's tiles
    try:
        zmm = torch.cat([mv(x[i : i + 1]) for i in range(41)])
    finally:
        cpu_kernel.set_zmm_one_row(False)
    torch.testing.assert_close(zmm, rows, rtol=1e-5, atol=1e-4)
    if q8:
        torch.testing.assert_close(zmm, whole, rtol=1e-5, atol=1e-4)


def test_the_decode_streams_prefetch_settings_change_no_result():
    from quant import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("no AVX2/FMA CPU or no C++ compiler")
    g = torch.Generator().manual_seed(3)
    qw = quantize_int4(torch.randn(300, 512, generator=g), 128, True, scale_dtype=torch.bfloat16)
    lin = Int4Linear(qw, "cpu", torch.bfloat16)
    head = Q6Linear(q6.pack(*q6.rtn(torch.randn(300, 512, generator=g))), 512, torch.bfloat16)
    x = torch.randn(1, 512, generator=g).bfloat16()
    want, want_head = lin(x), head(x)
    try:
        for ahead, hint in ((0, "nta"), (64, "t0"), (8192, "t1"), (1 << 20, "t2"), (4096, "nta")):
            for stream in cpu_kernel.STREAMS:
                cpu_kernel.set_stream_prefetch(ahead, hint, stream)
            assert torch.equal(lin(x), want) and torch.equal(head(x), want_head)
        with pytest.raises(RuntimeError, match="multiple of 64"):
            cpu_kernel.set_stream_prefetch(100, "t0")
        with pytest.raises(ValueError, match="one of t0, t1, t2, nta"):
            cpu_kernel.set_stream_prefetch(64, "t3")
    finally:
        for stream in cpu_kernel.STREAMS:
            cpu_kernel.set_stream_prefetch(stream=stream)


def test_stream_prefetch_default_follows_the_vendor(monkeypatch):
    """T1 on Intel cores (NTA held a Xeon's decode stream to half of it), AMD's tuned NTA elsewhere."""
    from quant import cpu_kernel

    for vendor, int4, head in (
        ("GenuineIntel", (4096, "t1"), (4096, "t1")),
        ("AuthenticAMD", (2048, "nta"), (2048, "t0")),
        ("", (2048, "nta"), (2048, "t0")),
    ):
        monkeypatch.setattr(cpu_kernel, "_cpu_vendor", lambda v=vendor: v)
        assert cpu_kernel.stream_prefetch_default() == int4 and cpu_kernel.stream_prefetch_default("q6") == head


def kernel_outputs() -> dict[str, torch.Tensor]:
    """The int8-activation kernels on fixed inputs: INT4 at groups 32 and 64 for 1, 3 and 20
    rows and at 128 for one (the per-128 stream), and the INT8 weight kernel."""
    from quant import cpu_kernel

    g = torch.Generator().manual_seed(7)
    out = {}
    for group in (32, 64, 128):
        qw = quantize_int4(torch.randn(72, 512, generator=g), group, True, scale_dtype=torch.bfloat16)
        packed, scales = cpu_kernel.stored_bytes(qw.packed), cpu_kernel.pack_scales(qw.scale, None)
        for rows in (1,) if group == 128 else (1, 3, 20):
            x = torch.randn(rows, 512, generator=g)
            out[f"int4 g{group} x{rows}"] = cpu_kernel.int4_mv(x, packed, scales, group, True)
    q, s = cpu_kernel.q8_quantize(torch.randn(40, 256, generator=g))
    out["q8"] = cpu_kernel.q8_mv(torch.randn(3, 256, generator=g), q, s)
    return out


_CHILD = (
    "import sys, torch; from tests.test_quant_kernels import kernel_outputs; torch.save(kernel_outputs(), sys.argv[1])"
)


def test_vnni_dot_products_equal_the_avx2_ones(tmp_path):
    """Where the kernel is built with VNNI, its int8 dot products give the AVX2 build's integers
    (the plain build runs in a child process, as LLAMA4_LOCAL_NO_VNNI=1 makes it): the same bits
    at groups 32 and 64, for INT8 weights, and for one row at groups of 128 (both round per 128,
    cpu_kernel.int8_span: four vpdpbusd give the four maddubs' sums). More rows at 128 go through
    AVX-512 builds' 512-bit quads, which sum the same products in another order."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from quant import cpu_kernel

    if not cpu_kernel.available() or cpu_kernel.isa() == "avx2":
        pytest.skip("no VNNI build on this CPU")
    out = tmp_path / "avx2.pt"
    env = {**os.environ, "LLAMA4_LOCAL_NO_VNNI": "1"}
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", _CHILD, str(out)], check=True, env=env, cwd=root)
    plain, ours = torch.load(out), kernel_outputs()
    assert plain.keys() == ours.keys()
    for key, want in plain.items():
        assert torch.equal(ours[key], want), key


def test_a_built_kernel_loads_without_ninja_and_a_changed_source_is_a_new_build(tmp_path):
    """The extension is named by a digest of its source, flags and torch's version, and a process
    finds a build that is there without running ninja: a CLI started with another PATH (a
    system ninja of another version, whose build log hashes commands its own way, or none at
    all) loaded the same kernel after a minute's rebuild, or fell back to torch's kernels."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from quant import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("no AVX2/FMA CPU or no C++ compiler")
    flags = ["-O3"]
    name = cpu_kernel.extension_name("avx2", "int x;", flags)
    assert name == cpu_kernel.extension_name("avx2", "int x;", flags)
    assert name != cpu_kernel.extension_name("avx2", "int y;", flags)
    assert name != cpu_kernel.extension_name("avx2", "int x;", ["-O2"])
    assert name != cpu_kernel.extension_name("avx512-vnni", "int x;", flags)
    child = "from quant import cpu_kernel; import sys; sys.exit(0 if cpu_kernel.available() else 3)"
    env = {k: v for k, v in os.environ.items() if k != "PATH"} | {"PATH": str(tmp_path)}  # no ninja, no compiler
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", child], env=env, cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "building" not in r.stderr


def test_a_killed_builds_lock_is_cleared_and_a_live_one_kept(tmp_path):
    """torch's build lock outlives a build killed with SIGKILL, and every later process waited on
    it for ever; one older than any build is removed, a fresh one (a build under way) kept."""
    import os
    import time

    from quant import cpu_kernel

    lock = tmp_path / "lock"
    lock.write_text("")
    assert not cpu_kernel.clear_stale_lock(tmp_path) and lock.exists()
    old = time.time() - cpu_kernel.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    assert cpu_kernel.clear_stale_lock(tmp_path) and not lock.exists()
    assert not cpu_kernel.clear_stale_lock(tmp_path)  # none there


def test_a_build_under_way_is_told_by_its_lock(tmp_path):
    """torch before 2.15 holds its build lock as a file that exists while it builds (FileBaton),
    2.15 on as an advisory lock on a file that stays after every build (filelock): a finished
    build is loaded directly under either, and a build under way waited for (under 2.15 every run
    had said it was building the kernel again and gone through load_inline)."""
    import fcntl
    import os

    from quant import cpu_kernel

    assert not cpu_kernel.build_under_way(tmp_path, flock=False)
    assert not cpu_kernel.build_under_way(tmp_path, flock=True)
    lock = tmp_path / "lock"
    lock.write_text("")
    assert cpu_kernel.build_under_way(tmp_path, flock=False)
    assert not cpu_kernel.build_under_way(tmp_path, flock=True)  # what a finished build leaves
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as filelock holds it while building
    try:
        assert cpu_kernel.build_under_way(tmp_path, flock=True)
    finally:
        os.close(fd)
    assert not cpu_kernel.build_under_way(tmp_path, flock=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations_in_and_out_as_torch_rounds(dtype):
    """The kernels take bf16/fp16 activations and return that dtype: the same bits as widening
    the input to float32 first and rounding the float32 result with torch (NaN stays NaN)."""
    from quant import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("no AVX2/FMA CPU or no C++ compiler")
    g = torch.Generator().manual_seed(7)
    qw = quantize_int4(torch.randn(70, 256, generator=g), 128, True, scale_dtype=torch.bfloat16)
    lin = Int4Linear(qw, torch.device("cpu"), dtype, path="avx2_q8")
    packed, scales = lin.packed, lin.scales_and_zeros
    w = torch.randn(70, 256, generator=g).to(dtype)
    q, s = cpu_kernel.q8_quantize(w)
    x = (torch.randn(3, 256, generator=g) * 40).to(dtype)
    x[2, 5] = float("nan")
    m = cpu_kernel._module()
    pairs = [
        (cpu_kernel.int4_mv(x, packed, scales, 128, True), m.int4_mv(x.float(), packed, scales, 128, True)),
        (cpu_kernel.int4_mv(x, packed, scales, 128, False), m.int4_mv(x.float(), packed, scales, 128, False)),
        (cpu_kernel.half_mv(x, w), m.half_mv(x.float(), w)),
        (cpu_kernel.q8_mv(x, q, s), m.q8_mv(x.float(), q, s)),
    ]
    for got, wide in pairs:
        assert got.dtype == dtype
        assert torch.equal(got.isnan(), wide.isnan()) and got[2].isnan().all()
        want = wide.to(dtype)
        assert torch.equal(got[:2].view(torch.int16), want[:2].view(torch.int16))


def test_bf16_silu_equals_torch_for_every_bf16_input():
    """The glue kernel's silu(gate) * up in bf16 (a vectorized exp) against torch's, for all
    65536 bf16 gates: the same bits, infinities and NaN included."""
    from quant import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("the CPU kernel is not built here")
    gate = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    up = torch.full_like(gate, 1.5)
    got = cpu_kernel._module().silu_mul(gate, up)
    want = torch.nn.functional.silu(gate) * up
    assert torch.equal(got.isnan(), want.isnan())
    ok = ~want.isnan()
    assert torch.equal(got[ok], want[ok])


def test_kernels_let_other_python_threads_run():
    """A kernel call lets the GIL go while it computes: another Python thread (a server's event
    loop) keeps running through a long prefill product instead of freezing until it ends."""
    import threading
    import time

    from quant import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("no AVX2/FMA CPU or no C++ compiler")
    lin = Int4Linear(quantize_int4(torch.randn(4096, 4096), 128), torch.device("cpu"), torch.bfloat16, "avx2_q8")
    x = torch.randn(128, 4096).bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lin(x)
        t0 = time.perf_counter()
        lin(x)
        call = time.perf_counter() - t0  # one product, ~30 ms on one thread
        started, done = threading.Event(), threading.Event()

        def work():
            started.set()
            for _ in range(6):
                lin(x)
            done.set()

        t = threading.Thread(target=work)
        t.start()
        started.wait()
        gap, last = 0.0, time.perf_counter()
        while not done.is_set():
            now = time.perf_counter()
            gap, last = max(gap, now - last), now
        t.join()
    finally:
        torch.set_num_threads(threads)
    # Holding the GIL, each product would stop this loop for its whole length.
    assert gap < call / 2, (gap, call)


@pytest.mark.parametrize("in_out", [False, True])
def test_widened_products_in_chunks(monkeypatch, in_out):
    """bf16 CPU products of many rows widen a chunk of the weight at a time (model.WIDEN_CHUNK_BYTES):
    the same float32 products as widening it whole, chunks of 16 outputs and a remainder."""
    from llama4_local import model

    monkeypatch.setattr(model, "WIDEN_CHUNK_BYTES", 16 * 4 * 96)  # 16 outputs a chunk
    g = torch.Generator().manual_seed(7)
    w = torch.randn(96, 71, generator=g).bfloat16() if in_out else torch.randn(71, 96, generator=g).bfloat16()
    x = torch.randn(9, 96, generator=g).bfloat16()
    got = model._widened_linear(x, w, in_out)
    want = (x.float() @ (w.float() if in_out else w.float().t())).bfloat16()
    assert got.dtype == torch.bfloat16 and got.shape == (9, 71)
    assert (got.float() - want.float()).abs().max() <= want.float().abs().max() * 2**-7
    if not model.native_low_precision(torch.bfloat16):  # (CPUs with bf16 dot products run bf16 GEMMs)
        assert torch.equal(model.matmul(x, w) if in_out else model.linear(x, w), got)
