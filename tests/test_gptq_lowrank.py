"""GPTQ's feedback from the calibration rows (quant/gptq_lowrank.py) against the Hessian's factor."""

from __future__ import annotations

import pytest
import torch

from quant.gptq import error_feedback, gptq_int4
from quant.gptq_lowrank import LowRankFeedback, lowrank_feedback
from quant.int4 import dequantize_int4, unpack_int4
from tests.test_gptq import correlated_inputs


def rows(r: int, n: int, seed: int = 0) -> torch.Tensor:
    """Calibration rows with correlated features and uneven scales, one input never seen."""
    x = correlated_inputs(r, n, seed)
    x[:, 7] = 0
    return x


@pytest.mark.parametrize(("r", "n"), [(40, 300), (100, 520), (300, 256), (1, 130)])
def test_the_feedback_equals_the_hessians(r, n):
    """tril(A^T X, -1) is error_feedback(X^T X), damping and unseen inputs alike (blocks of 128
    and a partial one; more rows than inputs too)."""
    x = rows(r, n)
    want = error_feedback(x.t().double() @ x.double())
    got = lowrank_feedback(x, 0.01)
    assert got.shape == (n, n)
    torch.testing.assert_close(got.dense(), want, rtol=0, atol=2e-4 * want.abs().max().item())
    torch.testing.assert_close(got.block(128, 256), want[128:256, 128:256], rtol=0, atol=2e-4 * want.abs().max().item())


@pytest.mark.parametrize(("r", "n"), [(40, 300), (300, 131), (2, 9), (700, 600)])
def test_the_column_kernel_is_the_torch_loop(r, n, monkeypatch):
    """The block's column loop in C++ (quant/gptq_kernel.py) against the torch loop it replaces:
    float64, only the order of the sums differs (blocks of 128, a partial one, odd widths); on any
    number of threads the same bits (700 rows: the threaded loop)."""
    from quant import cpu_kernel, gptq_lowrank

    if not cpu_kernel.available():
        pytest.skip("no AVX2/FMA CPU or no C++ compiler")
    x = rows(r, n)
    got = lowrank_feedback(x, 0.01)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernel's threads split each sum's terms never: the same bits
    try:
        assert torch.equal(lowrank_feedback(x, 0.01).a, got.a)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(gptq_lowrank, "_columns_kernel", gptq_lowrank._columns_torch)
    want = lowrank_feedback(x, 0.01)
    torch.testing.assert_close(got.a, want.a, rtol=1e-6, atol=1e-6 * want.a.abs().max().item())


@pytest.mark.parametrize("updates", [torch.float32, torch.bfloat16, torch.int8])
def test_gptq_through_the_rows_quantizes_as_through_the_hessian(updates):
    """The same walk through either feedback: nearly the same integers and the same output error
    on held-out rows (bf16 and int8 updates scatter it by a few percent either way, so over four
    draws), and one feedback serves two linears in turn (its running sum starts afresh)."""
    if updates == torch.int8 and not LowRankFeedback.int8_available("cpu"):
        pytest.skip("the int8 products run in the CPU kernel")
    ratios = []
    for seed in range(4):
        x, held_out = rows(200, 1024, seed).bfloat16().float(), rows(400, 1024, seed + 10)
        w = torch.randn(2, 256, 1024, generator=torch.Generator().manual_seed(seed))
        f_dense, f_rows = error_feedback(x.t() @ x), lowrank_feedback(x, 0.01)
        for wi in w:  # gate, then up, through the same feedback objects
            a = gptq_int4(wi, f_dense, 128, updates=updates)
            b = gptq_int4(wi, f_rows, 128, updates=updates)
            same = (unpack_int4(a.packed) == unpack_int4(b.packed)).float().mean().item()
            assert same > {torch.float32: 0.99, torch.bfloat16: 0.9, torch.int8: 0.85}[updates]
            err = [((wi - dequantize_int4(q, torch.float32)) @ held_out.t()).pow(2).mean().item() for q in (a, b)]
            ratios.append(err[1] / err[0])
    if updates == torch.float32:
        assert max(ratios) < 1.01, ratios
    else:
        assert max(ratios) < 1.04 and sum(ratios) / len(ratios) < 1.015, ratios


@pytest.mark.parametrize(("n", "block"), [(1056, 128), (1280, 256), (300, 128)])
def test_the_int8_walk_follows_the_running_sum(n, block):
    """The int8 products by spans (a span's share of v at once, its earlier blocks' errors through
    their [n, n] feedback, v updated at the span's end) give every block the feedback of every
    earlier column's error, to int8's rounding (2-4% of it here: the product cancels to a few
    hundredths of |A_J| |v|, where the Hessian's int8 walk stays near 2%): spans of 4 blocks, a
    last span cut short with a shorter last block (1056 = 8 x 128 + 32), blocks of 256, fewer
    columns than a span."""
    if not LowRankFeedback.int8_available("cpu"):
        pytest.skip("the int8 products run in the CPU kernel")
    x = rows(150, n)
    f = lowrank_feedback(x, 0.01)
    dense = f.dense()
    errs = torch.randn(n, 72, generator=torch.Generator().manual_seed(1))
    walk = f.to("cpu")  # as gptq_walk takes it
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        got = walk.update(b0, b1, torch.int8, torch.empty(b1 - b0, 72))
        want = dense[b0:b1, :b0] @ errs[:b0]
        assert (got - want).norm() <= 0.05 * want.norm() + (1e-6 if b0 == 0 else 0), b0
        walk.record(b0, b1, errs[b0:b1], torch.int8)


def test_rows_with_nan_give_no_feedback():
    x = rows(20, 200)
    x[3, 5] = float("nan")
    assert lowrank_feedback(x, 0.01) is None


def test_the_rows_pay_only_when_few():
    assert LowRankFeedback.pays(512, 5120) and LowRankFeedback.pays(1024, 8192)
    assert not LowRankFeedback.pays(1024, 5120) and not LowRankFeedback.pays(2048, 8192)
    # float32 dense updates (no bf16 dot products) cost twice as much: the rows pay longer
    f32, i8 = torch.float32, torch.int8
    assert LowRankFeedback.pays(800, 5120, f32) and LowRankFeedback.pays(1300, 8192, f32)
    assert not LowRankFeedback.pays(900, 5120, f32)
    # int8 both ways (Zen 3): the rows' products in int8 too
    assert LowRankFeedback.pays(1100, 5120, i8) and LowRankFeedback.pays(1800, 8192, i8)
    assert not LowRankFeedback.pays(1200, 5120, i8) and not LowRankFeedback.pays(2048, 8192, i8)


def test_a_calibrated_quantize_through_the_rows(scout_ckpt, tmp_path, monkeypatch):
    """Routed experts quantized through their rows (forced here: the test model's experts see
    more rows than a quarter of their inputs) land near the Hessian path's integers."""
    import json

    from safetensors import safe_open

    from quant import calibrated
    from quant.quantize import QuantizeOptions, quantize_checkpoint

    opts = QuantizeOptions(group_size=32, calibration_tokens=512)
    monkeypatch.setenv("LLAMA4_LOCAL_NO_INT8_GRAM", "1")  # the float Gram: both forms exact
    used = []
    real = calibrated.lowrank_feedback
    monkeypatch.setattr(calibrated, "lowrank_feedback", lambda x, damp: used.append(x.shape) or real(x, damp))
    dense = quantize_checkpoint(scout_ckpt, tmp_path / "dense", opts)
    assert not used
    monkeypatch.setattr(LowRankFeedback, "pays", staticmethod(lambda r, n, updates=None: True))
    rows_ = quantize_checkpoint(scout_ckpt, tmp_path / "rows", opts)
    assert used and rows_.quantized_linears == dense.quantized_linears
    index = json.loads((tmp_path / "rows" / "model.safetensors.index.json").read_text())["weight_map"]
    experts = [n for n in index if ".experts." in n and n.endswith("weight_packed")]
    assert experts
    same = []
    for name in experts:
        a, b = (safe_open(str(tmp_path / d / index[name]), "pt").get_tensor(name) for d in ("dense", "rows"))
        same.append((unpack_int4(a) == unpack_int4(b)).float().mean().item())
    assert min(same) > 0.8 and sum(same) / len(same) > 0.9, same
