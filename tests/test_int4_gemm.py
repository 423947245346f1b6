"""INT4 products through bf16 GEMMs (quant/gemm_kernel.py): the dequantized rows, the chunked
product, and when a bf16 run takes it."""

import pytest
import torch

from llama4_local.errors import UserError
from quant import cpu_kernel
from quant.int4 import dequantize_int4, quantize_int4
from quant.kernels import Int4Linear

pytestmark = pytest.mark.skipif(not cpu_kernel.available(), reason="no AVX2/FMA CPU or no C++ compiler")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def weights(n, k, group, symmetric, scale_dtype, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    qw = quantize_int4(w, group, symmetric, 4, scale_dtype)
    offset = None if qw.zero is None else -qw.scale.float() * qw.zero.float()
    return qw, cpu_kernel.stored_bytes(qw.packed), cpu_kernel.pack_scales(qw.scale, offset)


@pytest.mark.parametrize(
    "group,symmetric,scale_dtype", [(32, True, torch.bfloat16), (64, True, torch.float32), (128, False, torch.float32)]
)
def test_dequantized_rows_are_the_reference_rounded_to_bf16(group, symmetric, scale_dtype):
    qw, packed, scales = weights(37, 384, group, symmetric, scale_dtype)
    want = dequantize_int4(qw).float().bfloat16()
    got = cpu_kernel.int4_dequant_bf16(packed, scales, group)
    assert got.dtype == torch.bfloat16 and got.shape == (37, 384)
    # s u + c in one float32 FMA here, s (q - z) in the reference: a float32 rounding apart at
    # most (c = o - 8 s is stored rounded), so the bf16 results are equal or one bf16 step apart
    # where the rounding tips, or a float32 rounding off an exact zero.
    step = want.float().abs() * 2**-7 + 1e-6 * want.float().abs().max()
    assert ((got.float() - want.float()).abs() <= step).all()
    assert (got == want).float().mean() >= (1.0 if symmetric else 0.9)  # zeros: 1 in 16
    assert torch.equal(cpu_kernel.int4_dequant_bf16(packed, scales, group, 5, 22), got[5:22])


def test_a_nan_scale_makes_its_group_nan():
    _, packed, scales = weights(8, 256, 64, True, torch.float32)
    scales = scales.clone()
    scales[3, 0, 1] = float("nan")
    got = cpu_kernel.int4_dequant_bf16(packed, scales, 64).float()
    assert got[3, 64:128].isnan().all()
    assert not got[3, :64].isnan().any() and not got[:3].isnan().any()


@pytest.mark.parametrize("rows", [1, 17, 40])
@pytest.mark.parametrize("chunk_rows", [16, 48, 10_000])  # many chunks with a remainder, a few, one
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_equals_the_product_of_the_dequantized_weights(rows, chunk_rows, dtype):
    qw, packed, scales = weights(100, 256, 32, False, torch.float32, seed=rows)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(7)).to(dtype)
    got = cpu_kernel.int4_gemm_bf16(x, packed, scales, 32, chunk_bytes=chunk_rows * 2 * 256)
    assert got.dtype == dtype and got.shape == (rows, 100)
    w16 = cpu_kernel.int4_dequant_bf16(packed, scales, 32).float()
    exact = x.bfloat16().float() @ w16.t()  # what the bf16 GEMM sums, before its one rounding
    assert rel_err(got, exact) < 4e-3
    assert rel_err(got, x.float() @ dequantize_int4(qw).float().t()) < 1e-2


def test_bf16_runs_take_the_gemm_from_the_row_count_set(gemm_rows):
    qw, *_ = weights(64, 256, 64, True, torch.bfloat16)
    lin = Int4Linear(qw, "cpu", torch.bfloat16)
    assert lin.path == "avx2_q8"
    x = torch.randn(9, 256).bfloat16()
    gemm = cpu_kernel.int4_gemm_bf16(x, lin.packed, lin.scales_and_zeros, 64)
    dots = cpu_kernel.int4_mv(x, lin.packed, lin.scales_and_zeros, 64, True)
    assert not torch.equal(gemm, dots)
    gemm_rows("8")
    assert torch.equal(lin(x), gemm) and torch.equal(lin(x[:8]), gemm[:8])
    assert torch.equal(lin(x[:7]), dots[:7])
    f32 = Int4Linear(qw, "cpu", torch.float32)  # float32 runs keep float dot products
    assert torch.equal(f32(x.float()), cpu_kernel.int4_mv(x.float(), f32.packed, f32.scales_and_zeros, 64, False))
    gemm_rows("0")
    assert torch.equal(lin(x), dots)


def test_many_rows_take_the_outer_product_tiles_from_the_row_count_set(gemm_rows, monkeypatch):
    """On AVX-512 VNNI builds without AMX a bf16 run's INT4 products of OUTER_ROWS rows or more
    (groups of 128, weight rows a multiple of 32) go through int4_gemm_outer; fewer rows, other
    groups and LLAMA4_LOCAL_INT4_OUTER=0 keep int4_mv, and an asked-for bf16 GEMM goes first."""
    if not cpu_kernel.outer_available():
        pytest.skip("no AVX-512 VNNI build here")

    def outer(value):
        monkeypatch.setenv("LLAMA4_LOCAL_INT4_OUTER", value)
        cpu_kernel.outer_rows.cache_clear()

    gemm_rows("0")
    outer("16")
    qw, *_ = weights(64, 256, 128, True, torch.bfloat16)
    lin = Int4Linear(qw, "cpu", torch.bfloat16)
    x = torch.randn(20, 256, generator=torch.Generator().manual_seed(3)).bfloat16()
    tiles = cpu_kernel.int4_gemm_outer(x, lin.packed, lin.scales_and_zeros, 128)
    dots = cpu_kernel.int4_mv(x, lin.packed, lin.scales_and_zeros, 128, True)
    assert torch.equal(lin(x), tiles) and torch.equal(lin(x[:15]), dots[:15])
    gemm_rows("8")
    assert torch.equal(lin(x), cpu_kernel.int4_gemm_bf16(x, lin.packed, lin.scales_and_zeros, 128))
    gemm_rows("0")
    odd = Int4Linear(weights(40, 256, 128, True, torch.bfloat16)[0], "cpu", torch.bfloat16)  # 40 rows
    assert torch.equal(odd(x), cpu_kernel.int4_mv(x, odd.packed, odd.scales_and_zeros, 128, True))
    outer("0")
    assert torch.equal(lin(x), dots)
    outer("auto")
    assert cpu_kernel.outer_rows() == (cpu_kernel.AMX_OUTER_ROWS if cpu_kernel.has_amx() else cpu_kernel.OUTER_ROWS)
    outer("many")
    with pytest.raises(UserError, match="LLAMA4_LOCAL_INT4_OUTER"):
        cpu_kernel.outer_rows()
    monkeypatch.delenv("LLAMA4_LOCAL_INT4_OUTER")
    cpu_kernel.outer_rows.cache_clear()


def test_the_gemm_is_the_default_only_where_the_cpu_multiplies_bf16(gemm_rows, monkeypatch):
    gemm_rows("auto")
    for flags, native, want in [
        (set(), False, 0),  # AVX2 only: bf16 GEMMs emulated
        ({"avx512_bf16"}, True, cpu_kernel.AVX512_BF16_GEMM_ROWS),  # Zen 4
        ({"avx512_bf16", "amx_tile", "amx_bf16"}, True, cpu_kernel.AMX_GEMM_ROWS),
        ({"avx512_bf16", "amx_tile", "amx_bf16"}, False, 0),  # LLAMA4_LOCAL_NO_BF16_GEMM
    ]:
        monkeypatch.setattr(cpu_kernel, "_cpu_flags", lambda flags=flags: frozenset(flags))
        monkeypatch.setattr(cpu_kernel, "native_bf16", lambda native=native: native)
        cpu_kernel.bf16_gemm_rows.cache_clear()
        assert cpu_kernel.bf16_gemm_rows() == want, flags
    gemm_rows("many")
    with pytest.raises(UserError, match="LLAMA4_LOCAL_INT4_BF16_GEMM"):
        cpu_kernel.bf16_gemm_rows()


def test_a_bf16_prefill_through_the_gemm_is_as_close_to_float32_as_the_int8_path(scout_int4, gemm_rows):
    from llama4_local.loader import load_model

    ids = torch.arange(3, 19)
    m32, _ = load_model(scout_int4[0], "float32", "cpu")
    exact = m32(ids, m32.new_cache(16), last_only=False)
    model, _ = load_model(scout_int4[0], "bfloat16", "cpu")
    q8 = model(ids, model.new_cache(16), last_only=False)
    gemm_rows("2")  # every product of two rows or more: the routed experts' too
    gemm = model(ids, model.new_cache(16), last_only=False)
    assert not torch.equal(gemm, q8)
    # This random tiny model amplifies any rounding (bf16 alone: about 14%); int8 activations
    # add a little to it, the GEMM's bf16 activations nothing.
    assert rel_err(gemm, exact) < 1.1 * rel_err(q8, exact)


def test_a_bad_row_count_is_a_one_line_error_before_loading(scout_int4, gemm_rows):
    from tests.cli_util import run_cli
    from tests.test_bad_input import assert_user_error

    gemm_rows("lots")  # the child process inherits it
    r = run_cli("prompt", "hi", "--model", scout_int4[0], "--device", "cpu", "-n", "2")
    assert_user_error(r, "LLAMA4_LOCAL_INT4_BF16_GEMM", "row count")
