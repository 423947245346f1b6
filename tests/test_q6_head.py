"""The lm_head in Q6 (quant/q6.py): its layout, the kernel against the dequantized reference,
GPTQ's fit, and the calibrated quantize's sidecar that a bf16 CPU run maps (quant/head.py)."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llama4_local.checkpoint import HEAD_SIDECAR, HEAD_SIDECARS, open_checkpoint
from llama4_local.info import model_info
from llama4_local.loader import file_mappings, load_model
from quant import cpu_kernel, q6
from quant.gptq import HessianSum, error_feedback
from quant.head import Q6Linear, write_head_sidecar
from quant.kernels import Int8Linear
from quant.quantize import QuantizeOptions, quantize_checkpoint

from .test_gptq import correlated_inputs, output_error

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason="no AVX2 kernel here")


def test_layout_of_one_super_block():
    """128 inputs in 104 bytes: u = q + 32 in the kernel's order (vector v's 4-byte group l holds
    elements 8 v + 4 (l // 4) .. + 3 of block l % 4), low nibbles two vectors to a byte plane, the
    top bits four to a byte, then the four fp16 scales."""
    q = ((torch.arange(128) * 37) % 64 - 32).to(torch.int8)[None]
    d = torch.tensor([[-0.25, 0.5, 1.0, 2.0**-10]])
    b = q6.pack(q, d)[0]
    assert b.shape == (104,)
    u = q[0].to(torch.int16) + 32

    def at(v, byte):  # the element the kernel reads at vector v, byte `byte`
        g, j = divmod(byte, 4)
        return u[32 * (g % 4) + 8 * v + 4 * (g // 4) + j]

    for j in range(32):
        assert b[j] == (at(0, j) & 15) | ((at(1, j) & 15) << 4)
        assert b[32 + j] == (at(2, j) & 15) | ((at(3, j) & 15) << 4)
        assert b[64 + j] == sum(((at(v, j) >> 4) & 3) << (2 * v) for v in range(4))
    assert torch.equal(b[96:104].contiguous().view(torch.float16).float(), d[0])
    got_q, got_d = q6.unpack(b[None], 128)
    assert torch.equal(got_q, q) and torch.equal(got_d, d)


def test_a_partial_super_block_is_padded_with_zero_scales():
    q, d = q6.rtn(torch.randn(3, 160, generator=torch.Generator().manual_seed(4)))
    packed = q6.pack(q, d)
    assert packed.shape == (3, 2 * 104) and q6.row_bytes(160) == 208
    tail = packed.reshape(3, 2, 104)[:, 1]
    assert not tail[:, 98:104].any()  # blocks 6-8 of 8: scale 0
    assert torch.equal(q6.unpack(packed, 160)[0], q)


def pack_v1(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The first layout (quant/q6.py's unpack_v1), as sidecars written before 2026-12-06 hold it."""
    n, k = q.shape
    u = (q.contiguous().view(torch.uint8) + 32).reshape(n, k // 32, 32)
    low = (u[..., :16] & 0xF) | ((u[..., 16:] & 0xF) << 4)
    top = (u >> 4).reshape(n, k // 32, 4, 8)
    high = top[..., 0, :] | (top[..., 1, :] << 2) | (top[..., 2, :] << 4) | (top[..., 3, :] << 6)
    d = scales.to(torch.float16).contiguous().view(torch.uint8).reshape(n, k // 32, 2)
    return torch.cat([low, high, d], dim=-1).reshape(n, -1)


def test_the_first_layout_unpacks():
    q, d = q6.rtn(torch.randn(5, 96, generator=torch.Generator().manual_seed(5)))
    old = pack_v1(q, d)
    assert old.shape == (5, 3 * 26)
    got_q, got_d = q6.unpack_v1(old, 96)
    assert torch.equal(got_q, q) and torch.equal(got_d, d)


def test_rtn_round_trip_and_error():
    w = torch.randn(37, 160, generator=torch.Generator().manual_seed(0)) * 0.03
    w[3, 32:64] = 0  # an all-zero block: scale 1, integers 0
    q, d = q6.rtn(w)
    assert q.min() >= -32 and q.max() <= 31 and d.dtype == torch.float32
    assert torch.equal(d, d.half().float())  # scales as stored
    assert d[3, 1] == 1 and not q[3, 32:64].any()
    packed = q6.pack(q, d)
    assert packed.shape == (37, q6.row_bytes(160)) and packed.dtype == torch.uint8
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
        assert f.metadata()["format"] == q6.FORMAT and set(f.keys()) == {"q6"}
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
    kept = load_model(calibrated, "bfloat16", "cpu")[0]
    kept.lm_head = copy.deepcopy(f32.lm_head).to(torch.bfloat16)  # the same bf16 run with the kept head
    ids = torch.arange(3, 40)
    got, before, want = (m(ids, m.new_cache(40), last_only=False).float() for m in (model, q8, kept))

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    # each head's own error on the run's hidden states (measured 2.5% and 0.8%, with every CPU
    # path: the rest of a bf16 run's error, 2.6-7.6% by path, cancels out of it)
    assert rel(got, want) < 0.04 and rel(before, want) < 0.015 and rel(got, before) < 0.04


def test_a_sidecar_in_the_first_q6_layout_is_repacked_at_load(calibrated, tmp_path):
    """A checkpoint quantized before the super-block layout: the same integers and scales, so the
    same logits, from a copy made at load."""
    if not cpu_kernel.available():
        pytest.skip("no AVX2 kernel here")
    copy = tmp_path / "copy"
    shutil.copytree(calibrated, copy)
    side = copy / HEAD_SIDECAR
    with safe_open(str(side), "pt") as f:
        meta, w = f.metadata(), f.get_tensor("q6")
    k = open_checkpoint(copy).get("lm_head.weight").shape[1]
    save_file({"q6": pack_v1(*q6.unpack(w, k))}, str(side), metadata=meta | {"format": q6.FORMAT_V1})
    assert "first layout" in model_info(copy, [], 64)["quantization"]["lm_head_cpu"]
    assert model_info(calibrated, [], 64)["quantization"]["lm_head_cpu"].startswith("Q6 (6.5 bits")
    new, _ = load_model(calibrated, "bfloat16", "cpu")
    old, _ = load_model(copy, "bfloat16", "cpu")
    assert isinstance(old.lm_head, Q6Linear) and torch.equal(old.lm_head.q6, new.lm_head.q6)
    ids = torch.arange(3, 20)
    assert torch.equal(old(ids, old.new_cache(20)), new(ids, new.new_cache(20)))


def test_a_gpu_plan_beside_an_expert_cache_counts_the_q6_head(calibrated, tmp_path, monkeypatch):
    """`info`'s plan for a GPU too small for every expert reads the head's Q6 blocks (what a GPU
    run there loads: quant/triton_q6.py); a Q8_0 sidecar, or none, or no Triton to run the Q6
    kernel, leaves the head as stored."""
    from quant import triton_q6
    from quant.head import q6_sidecar_bytes

    if not triton_q6.available():
        pytest.skip("no Triton here: a GPU run here would not read the Q6 head")

    ckpt = open_checkpoint(calibrated)
    n, k = ckpt.get("lm_head.weight").shape
    assert q6_sidecar_bytes(calibrated, ckpt, n, k) == n * q6.row_bytes(k)
    assert q6_sidecar_bytes(calibrated, ckpt, n, k + 32) == 0  # another head's shape
    (full,) = model_info(calibrated, [2**40], 64)["plans"]
    p = full["plan"]
    saved = p["dense"]["embeddings"] + p["dense"]["lm_head"] - n * q6.row_bytes(k)
    budget = p["used"] - saved - (p["experts_total"] - 2) * p["expert_bytes"]  # two expert slots
    (small,) = model_info(calibrated, [budget], 64)["plans"]
    assert not p["head_q6"] and small["plan"]["head_q6"] and small["plan"]["slots"] == 2
    assert small["plan"]["dense"]["lm_head"] == n * q6.row_bytes(k)
    with monkeypatch.context() as m:  # as the loader plans (loader._q6_head_bytes): the kernel is Triton's
        m.setattr(triton_q6, "available", lambda: False)
        (none,) = model_info(calibrated, [budget + p["dense"]["lm_head"] - n * q6.row_bytes(k)], 64)["plans"]
        assert not none["plan"]["head_q6"] and none["plan"]["slots"] == 2  # the bf16 head's room
    copy = tmp_path / "copy"
    shutil.copytree(calibrated, copy)
    write_head_sidecar(copy / HEAD_SIDECAR, open_checkpoint(copy).get("lm_head.weight"))  # Q8_0
    assert q6_sidecar_bytes(copy, open_checkpoint(copy), n, k) == 0
    (small,) = model_info(copy, [budget + p["dense"]["lm_head"] - n * q6.row_bytes(k)], 64)["plans"]
    assert not small["plan"]["head_q6"] and small["plan"]["slots"] == 2  # the bf16 head's room


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


def test_all_finite_checks_every_chunk():
    from quant.head import all_finite

    w = torch.randn(10, 8).bfloat16()
    assert all_finite(w, rows=4)
    for r, v in ((9, float("inf")), (0, float("nan")), (5, float("-inf"))):
        bad = w.clone()
        bad[r, 3] = v
        assert not all_finite(bad, rows=4)
