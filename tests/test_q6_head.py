"""The lm_head in Q6 (quant/q6.py): its layout, the kernel against the dequantized reference,
GPTQ's fit, and the calibrated quantize's sidecar that a bf16 CPU run maps (quant/head.py)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open

from llama4_local.checkpoint import HEAD_SIDECAR, HEAD_SIDECARS, open_checkpoint
from llama4_local.loader import file_mappings, load_model
from quant import cpu_kernel, q6
from quant.gptq import HessianSum, error_feedback
from quant.head import Q6Linear, write_head_sidecar
from quant.kernels import Int8Linear
from quant.quantize import QuantizeOptions, quantize_checkpoint

from .test_gptq import correlated_inputs, output_error

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason="no AVX2 kernel here")


def test_layout_of_one_block():
    """Low nibbles as Q4_0 (byte j: element j, element j + 16 on top), top bits four to a byte
    (byte i: elements i, i + 8, i + 16, i + 24), then the fp16 scale."""
    q = (torch.arange(32) - 32 + torch.arange(32) * 2 % 64).clamp(-32, 31).to(torch.int8)[None]
    d = torch.tensor([[-0.25]])
    b = q6.pack(q, d)[0]
    u = q[0].to(torch.int16) + 32
    assert b.shape == (26,)
    for j in range(16):
        assert b[j] == (u[j] & 15) | ((u[j + 16] & 15) << 4)
    for i in range(8):
        assert b[16 + i] == sum(((u[i + 8 * m] >> 4) & 3) << (2 * m) for m in range(4))
    assert b[24:26].contiguous().view(torch.float16).item() == -0.25
    got_q, got_d = q6.unpack(b[None], 32)
    assert torch.equal(got_q, q) and torch.equal(got_d, d)


def test_rtn_round_trip_and_error():
    w = torch.randn(37, 160, generator=torch.Generator().manual_seed(0)) * 0.03
    w[3, 32:64] = 0  # an all-zero block: scale 1, integers 0
    q, d = q6.rtn(w)
    assert q.min() >= -32 and q.max() <= 31 and d.dtype == torch.float32
    assert torch.equal(d, d.half().float())  # scales as stored
    assert d[3, 1] == 1 and not q[3, 32:64].any()
    packed = q6.pack(q, d)
    assert packed.shape == (37, 160 // 32 * 26) and packed.dtype == torch.uint8
    assert torch.equal(q6.unpack(packed, 160)[0], q)
    err = (q6.dequantize(packed, 160) - w).norm() / w.norm()
    assert err < 0.025  # 6 bits: about a quarter of INT4's error at these blocks
    bad = w.clone()
    bad[5, 70] = float("nan")
    assert q6.rtn(bad)[1][5, 2].isnan() and not q6.rtn(bad)[1][5, 1].isnan()


@needs_kernel
@pytest.mark.parametrize("rows,n,k", [(1, 37, 160), (2, 64, 96), (3, 19, 32), (4, 40, 256), (7, 33, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_the_dequantized_reference(rows, n, k, dtype):
    """q6_mv (through Q6Linear: more than 4 rows go 4 at a time) against int8-rounded activations
    times the dequantized weight: the same integer sums, to float32 rounding."""
    g = torch.Generator().manual_seed(rows * n + k)
    w = torch.randn(n, k, generator=g) * 0.05
    packed = q6.pack(*q6.rtn(w))
    x = (torch.randn(rows, k, generator=g) * 3).to(dtype)
    want = cpu_kernel.round_activations_int8(x) @ q6.dequantize(packed, k).t()
    got = Q6Linear(packed, k, dtype)(x)
    assert got.dtype == dtype and got.shape == (rows, n)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    assert ((got.float() - want).abs().max() / want.abs().max()) < tol


@needs_kernel
def test_kernel_propagates_nan():
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(1))
    q, d = q6.rtn(w)
    d[7, 1] = float("nan")  # one row's block scale
    packed = q6.pack(q, d)
    y = cpu_kernel.q6_mv(torch.randn(2, 96), packed)
    assert y[:, 7].isnan().all() and not y[:, :7].isnan().any() and not y[:, 8:].isnan().any()
    x = torch.randn(2, 96)
    x[1, 50] = float("nan")  # an activation: every output of its row
    y = cpu_kernel.q6_mv(x, packed)
    assert y[1].isnan().all() and not y[0, :7].isnan().any()


def test_gptq_identity_hessian_is_rtn_and_rows_are_independent(monkeypatch):
    w = torch.randn(40, 128, generator=torch.Generator().manual_seed(2)) * 0.1
    want = q6.pack(*q6.rtn(w))
    assert torch.equal(q6.gptq(w, error_feedback(torch.eye(128))), want)
    h = HessianSum()
    h.add(correlated_inputs(512, 128))
    f = error_feedback(h.mean())
    whole = q6.gptq(w, f)
    monkeypatch.setattr(q6, "ROWS", 16)  # 40 rows as 16 + 16 + 8: the same bytes
    assert torch.equal(q6.gptq(w, f), whole)


def test_gptq_lower_output_error_than_rtn():
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(3))
    x = correlated_inputs(2048, 256)
    h = HessianSum()
    h.add(x[:1024])  # fitted on half the rows, measured on the other half
    ours = output_error(w, q6.dequantize(q6.gptq(w.bfloat16(), error_feedback(h.mean())), 256), x[1024:])
    base = output_error(w, q6.dequantize(q6.pack(*q6.rtn(w.bfloat16())), 256), x[1024:])
    assert ours < 0.7 * base, (ours, base)


@pytest.fixture(scope="module")
def calibrated(scout_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("q6head") / "int4"
    quantize_checkpoint(scout_ckpt, out, QuantizeOptions(group_size=32, calibration_tokens=256))
    return out


def test_calibrated_quantize_writes_q6_a_bf16_run_maps(calibrated, scout_ckpt):
    side = calibrated / HEAD_SIDECAR
    with safe_open(str(side), "pt") as f:
        assert f.metadata()["format"] == "q6" and set(f.keys()) == {"q6"}
    shard = next(calibrated.glob("*.safetensors"))
    assert side.stat().st_mode & 0o777 == shard.stat().st_mode & 0o777  # readable where the shards are
    if not cpu_kernel.available():
        pytest.skip("no AVX2 kernel here")
    model, _ = load_model(calibrated, "bfloat16", "cpu")
    assert isinstance(model.lm_head, Q6Linear)
    maps = [(lo, hi) for lo, hi, p in file_mappings() if str(side) in p]
    assert any(lo <= model.lm_head.q6.data_ptr() < hi for lo, hi in maps)  # the file's bytes, no copy
    f32, _ = load_model(calibrated, "float32", "cpu")  # other runs read the kept bf16 head
    assert not isinstance(f32.lm_head, Q6Linear)
    q8 = load_model(calibrated, "bfloat16", "cpu")[0]
    q8.lm_head = Int8Linear(f32.lm_head.weight.bfloat16())  # what the run made of a kept head before
    ids = torch.arange(3, 40)
    exact, got, before = (m(ids, m.new_cache(40), last_only=False).float() for m in (f32, model, q8))

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(got, before) < 0.04 and rel(got, exact) < 1.1 * rel(before, exact)


def test_q8_sidecar_under_its_old_name_is_read(calibrated, tmp_path):
    """A checkpoint quantized before the Q6 head: its Q8_0 blocks under the name they had."""
    if not cpu_kernel.available():
        pytest.skip("no AVX2 kernel here")
    copy = tmp_path / "copy"
    shutil.copytree(calibrated, copy)
    (copy / HEAD_SIDECAR).unlink()
    write_head_sidecar(copy / HEAD_SIDECARS[1], open_checkpoint(copy).get("lm_head.weight"))
    model, _ = load_model(copy, "bfloat16", "cpu")
    assert isinstance(model.lm_head, Int8Linear)
    assert any(HEAD_SIDECARS[1] in p for _, _, p in file_mappings())


def test_progress_names_the_head_while_its_copy_is_made(scout_ckpt, tmp_path):
    """The sidecar comes after every shard (a minute of GPTQ for Scout's head): the progress says so."""
    names = []
    quantize_checkpoint(
        scout_ckpt,
        tmp_path / "q",
        QuantizeOptions(group_size=64, calibrate=False),
        on_progress=lambda d, t, n: names.append(n),
    )
    assert names[-1].endswith("lm_head.weight") and (tmp_path / "q" / HEAD_SIDECAR).is_file()


def test_the_sidecars_mode_follows_the_umask_read_not_set():
    import os

    from quant import head

    old = os.umask(0o027)
    try:
        assert head._umask() == 0o027
        assert os.umask(0o027) == 0o027  # still what it was: reading it changed nothing
    finally:
        os.umask(old)
