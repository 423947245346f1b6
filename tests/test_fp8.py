"""FP8 checkpoints as Meta publishes Maverick's (compressed-tensors float-quantized): run, plan, quantize."""

import json

import pytest
import torch
from safetensors import safe_open

from llama4_local.checkpoint import list_tensors
from llama4_local.loader import load_model
from quant.quantize import QuantizeOptions, quantize_checkpoint
from tests.cli_util import run_cli
from tests.fp8_util import write_fp8


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def maverick_fp8(tmp_path_factory, maverick_ckpt):
    """(FP8 checkpoint, the same weights dequantized as a bf16 checkpoint), per-channel scales."""
    d = tmp_path_factory.mktemp("fp8")
    write_fp8(maverick_ckpt, d / "fp8", d / "deq")
    return d / "fp8", d / "deq"


def test_layout_is_the_published_one(maverick_fp8):
    fp8, _ = maverick_fp8
    names = list_tensors(fp8)
    with safe_open(str(names["model.layers.1.feed_forward.experts.3.gate_proj.weight"]), "pt") as f:
        assert f.get_tensor("model.layers.1.feed_forward.experts.3.gate_proj.weight").dtype == torch.float8_e4m3fn
    assert "model.layers.1.feed_forward.experts.3.gate_proj.weight_scale" in names
    assert "model.layers.0.feed_forward.gate_proj.weight_scale" in names  # the dense MLP layer
    assert "model.layers.0.self_attn.q_proj.weight_scale" not in names  # attention stays bf16


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-6), ("bfloat16", 2e-2)])
def test_fp8_model_computes_the_dequantized_weights(maverick_fp8, maverick_ckpt, dtype, tol):
    fp8, deq = maverick_fp8
    ids = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(0))
    a, _ = load_model(fp8, dtype, "cpu")
    b, _ = load_model(deq, dtype, "cpu")
    lin = a.layers[1].feed_forward.experts.experts[0].gate_proj
    assert type(lin).__name__ == "Fp8Linear"
    from quant import cpu_kernel

    assert lin.path == ("fp8_avx2" if dtype == "bfloat16" and cpu_kernel.available() else "fp8")
    assert a.layers[1].feed_forward.experts.experts[0].gate_proj.weight.dtype == torch.float8_e4m3fn
    got = a(ids, a.new_cache(20), last_only=False).float()
    want = b(ids, b.new_cache(20), last_only=False).float()
    assert rel_err(got, want) < tol
    c, _ = load_model(maverick_ckpt, dtype, "cpu")
    assert rel_err(got, c(ids, c.new_cache(20), last_only=False).float()) > 1e-3  # FP8 did round


@pytest.mark.parametrize("strategy, block", [("tensor", None), ("block", [32, 64])])
def test_other_scale_strategies(tmp_path, scout_ckpt, strategy, block):
    write_fp8(scout_ckpt, tmp_path / "fp8", tmp_path / "deq", strategy, block)
    ids = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(1))
    a, _ = load_model(tmp_path / "fp8", "float32", "cpu")
    b, _ = load_model(tmp_path / "deq", "float32", "cpu")
    assert rel_err(a(ids, a.new_cache(12), last_only=False), b(ids, b.new_cache(12), last_only=False)) < 1e-6


def test_banded_dequantization_is_the_whole(monkeypatch):
    """Forward dequantizes a band of rows at a time; bands of any height give the same product."""
    import quant.fp8 as fp8

    w = torch.randn(96, 64)
    for block in (None, (32, 32)):
        if block:
            s = w.reshape(3, 32, 2, 32).abs().amax((1, 3)) / 448
            q = (w / s.repeat_interleave(32, 0).repeat_interleave(32, 1)).to(fp8.FP8)
        else:
            s = (w.abs().amax(1, keepdim=True) / 448).bfloat16()
            q = (w / s.float()).to(fp8.FP8)
        x = torch.randn(5, 64)
        whole = torch.nn.functional.linear(x, fp8.dequantize_fp8(q, s, block).float())
        monkeypatch.setattr(fp8, "BAND_BYTES", 40 * 64)  # 40 rows: 32 with blocks
        got = fp8.fp8_matmul(x, {"weight": q, "weight_scale": s}, block)
        assert torch.allclose(got, whole, rtol=1e-6, atol=1e-6)


def test_avx2_kernel_against_the_dequantized_weights():
    """Every finite e4m3 code (subnormals, +-448, +-0), rows of several scales and blocks of
    columns, 1 to 4 activation rows: the kernel's product is the dequantized weights' product."""
    from quant import cpu_kernel
    from quant.fp8 import FP8, Fp8Weight, dequantize_fp8, fp8_avx2_matmul, row_scales

    if not cpu_kernel.available():
        pytest.skip("no AVX2 kernel here")
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # the two NaN codes
    vals = codes.view(FP8).float()
    assert vals.abs().max() == 448 and vals[vals > 0].min() == 2.0**-9  # the smallest subnormal
    w = codes[torch.randperm(len(codes), generator=torch.Generator().manual_seed(0))].repeat(16)[: 40 * 96]
    w = w.reshape(40, 96).view(FP8)
    cases = ((torch.rand(40, 1) + 0.5, None), (torch.rand(2, 3) + 0.5, (32, 32)), (torch.tensor([0.7]), None))
    for scale, block in cases:
        fw = Fp8Weight(w, scale.bfloat16(), block)
        tensors = {"weight": w, "row_scales": row_scales(fw)}
        for t in (1, 2, 3, 4, 9):
            x = torch.randn(t, 96, generator=torch.Generator().manual_seed(t))
            got = fp8_avx2_matmul(x, tensors)
            # float32 weights fp8 * scale, unrounded: what the kernel multiplies by
            exact = x @ dequantize_fp8(w, fw.scale.float(), block).t()
            assert ((got - exact).norm() / exact.norm()) < 1e-6, (scale.shape, t)
            # the checkpoint's bf16 dequantized weights differ from those by bf16 rounding only
            rounded = x @ dequantize_fp8(w, fw.scale, block).float().t()
            assert ((got - rounded).norm() / rounded.norm()) < 4e-3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_offloaded_fp8_experts(maverick_fp8, dtype):
    from offload.setup import OffloadOptions

    fp8, _ = maverick_fp8
    ids = torch.randint(0, 300, (16,), generator=torch.Generator().manual_seed(2))
    full, _ = load_model(fp8, dtype, "cpu")
    off, _ = load_model(fp8, dtype, "cpu", offload=OffloadOptions(slots=3, host_memory=0))
    assert off.offload.cache.store.held_keys == []  # every expert rebuilt from the mapped files
    a = full(ids, full.new_cache(16), last_only=False)
    b = off(ids, off.new_cache(16), last_only=False)
    assert torch.equal(b, a)  # the same kernel on the same bytes, from a cache slot


def test_quantize_from_fp8_equals_from_dequantized(tmp_path, maverick_fp8):
    fp8, deq = maverick_fp8
    opts = QuantizeOptions(group_size=64, shard_bytes=300_000, calibrate=False)  # plain fit: same INT4
    quantize_checkpoint(fp8, tmp_path / "a", opts)
    quantize_checkpoint(deq, tmp_path / "b", opts)
    a, b = list_tensors(tmp_path / "a"), list_tensors(tmp_path / "b")
    assert set(a) == set(b)
    assert "model.layers.1.feed_forward.experts.5.down_proj.weight_packed" in a
    assert not any(n.endswith("weight_scale") and "experts" in n and "packed" in n for n in a)
    for name in sorted(a):
        with safe_open(str(a[name]), "pt") as f, safe_open(str(b[name]), "pt") as g:
            x, y = f.get_tensor(name), g.get_tensor(name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    qa = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qa["format"] == "pack-quantized"


def test_cli_prompt_info_and_quantize(tmp_path, maverick_fp8):
    fp8, _ = maverick_fp8
    r = run_cli("prompt", "hello", "-m", fp8, "--json", "-n", "4", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["token_ids"]) == 4
    r = run_cli("info", fp8, "--json", "--gpu-memory", "1GiB")
    assert r.returncode == 0, r.stderr
    q = json.loads(r.stdout)["quantization"]
    assert q["scheme"].startswith("FP8 e4m3") and q["parts"] == ["experts", "shared", "mlp"]
    r = run_cli("quantize", fp8, tmp_path / "q")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "q" / "config.json").is_file()


def test_unsupported_fp8_inputs(tmp_path, maverick_fp8):
    import shutil

    from tests.test_bad_input import assert_user_error

    fp8, _ = maverick_fp8
    bad = tmp_path / "bad"
    shutil.copytree(fp8, bad)
    raw = json.loads((bad / "config.json").read_text())
    raw["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "group"
    (bad / "config.json").write_text(json.dumps(raw))
    assert_user_error(run_cli("prompt", "hi", "-m", bad, "-n", "2"), "FP8 strategy 'group' is not supported")
    raw["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 4
    (bad / "config.json").write_text(json.dumps(raw))
    assert_user_error(run_cli("quantize", bad, tmp_path / "out"), "8-bit float")
    assert not (tmp_path / "out").exists()
