"""`quantize`: the streaming quantizer, its output format, and its failure modes."""

import errno
import json

import pytest
import torch
from safetensors import safe_open

import quant.quantize as qmod
from llama4_local.errors import UserError
from llama4_local.loader import load_model
from quant.format import QuantScheme
from quant.int4 import dequantize_int4, quantize_int4
from quant.quantize import QuantizeOptions, quantize_checkpoint
from tests.cli_util import error_lines, run_cli


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def quantized(scout_int4):
    return scout_int4


def test_layout_and_config(quantized, scout_ckpt):
    out, summary = quantized
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["type"], w["strategy"], w["group_size"], w["symmetric"]) == (4, "int", "group", 64, True)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert summary.shards > 1 and len(set(index.values())) == summary.shards
    names = set(index)
    assert "model.layers.0.feed_forward.experts.3.down_proj.weight_packed" in names
    assert "model.layers.0.feed_forward.shared_expert.gate_proj.weight_scale" in names
    assert "model.layers.0.self_attn.q_proj.weight" in names  # the plain fit leaves attention bf16
    assert "model.layers.0.feed_forward.router.weight" in names
    assert not any(n.endswith("gate_up_proj") for n in names)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (scout_ckpt / f).read_bytes()
    assert summary.output_bytes < summary.source_bytes


def test_saved_experts_decompress_with_compressed_tensors(quantized, scout_ckpt):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    out, _ = quantized
    with safe_open(str(scout_ckpt / "model.safetensors"), "pt") as f:
        gate_up = f.get_tensor("model.layers.1.feed_forward.experts.gate_up_proj")  # [E, D, 2I]
    inter = gate_up.shape[2] // 2
    want = dequantize_int4(quantize_int4(gate_up[2, :, inter:].t(), 64))  # expert 2's up_proj
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    prefix = "model.layers.1.feed_forward.experts.2.up_proj"
    state = {}
    for suffix in ("weight_packed", "weight_scale", "weight_shape"):
        with safe_open(str(out / index[f"{prefix}.{suffix}"]), "pt") as f:
            state[suffix] = f.get_tensor(f"{prefix}.{suffix}")
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64)
    got = PackedQuantizationCompressor.decompress(state, QuantizationScheme(targets=["Linear"], weights=args))
    assert torch.equal(got["weight"].float(), want.float())


def fake_quantized(path, group_size):
    """The original model with every quantized weight replaced by its dequantized value."""
    model, _ = load_model(path, "float32", "cpu")
    rt = lambda w: dequantize_int4(quantize_int4(w, group_size))  # noqa: E731  [out, in] round trip
    for layer in model.layers:
        ff = layer.feed_forward
        if not layer.is_moe:  # a dense MLP (Maverick's layers between MoE layers)
            for lin in (ff.gate_proj, ff.up_proj, ff.down_proj):
                lin.weight = torch.nn.Parameter(rt(lin.weight), requires_grad=False)
            continue
        gu, down = ff.experts.gate_up_proj.clone(), ff.experts.down_proj.clone()  # [E, D, 2I], [E, I, D]
        inter = gu.shape[2] // 2
        for e in range(gu.shape[0]):
            gu[e, :, :inter] = rt(gu[e, :, :inter].t()).t()
            gu[e, :, inter:] = rt(gu[e, :, inter:].t()).t()
            down[e] = rt(down[e].t()).t()
        ff.experts.gate_up_proj = torch.nn.Parameter(gu, requires_grad=False)
        ff.experts.down_proj = torch.nn.Parameter(down, requires_grad=False)
        for lin in (ff.shared_expert.gate_proj, ff.shared_expert.up_proj, ff.shared_expert.down_proj):
            lin.weight = torch.nn.Parameter(rt(lin.weight), requires_grad=False)
    return model


def test_quantized_model_computes_the_dequantized_weights(quantized, scout_ckpt):
    out, _ = quantized
    ids = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(0))
    q, _ = load_model(out, "float32", "cpu")
    want = fake_quantized(scout_ckpt, 64)
    got = q(ids, q.new_cache(24), last_only=False)
    assert rel_err(got, want(ids, want.new_cache(24), last_only=False)) < 1e-5
    orig, _ = load_model(scout_ckpt, "float32", "cpu")
    assert rel_err(got, orig(ids, orig.new_cache(24), last_only=False)) > 1e-3  # it did quantize


def test_maverick_dense_mlps_quantized_by_default(tmp_path, maverick_ckpt):
    out = tmp_path / "mav-int4"
    quantize_checkpoint(maverick_ckpt, out, QuantizeOptions(group_size=64, calibrate=False))  # the plain fit
    names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.layers.0.feed_forward.gate_proj.weight_packed" in names  # layer 0 is dense
    assert "model.layers.1.feed_forward.experts.7.down_proj.weight_packed" in names
    assert "model.layers.0.feed_forward.gate_proj.weight" not in names
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert not any("feed_forward" in i and "shared" not in i for i in ignore)
    ids = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(2))
    q, _ = load_model(out, "float32", "cpu")
    assert type(q.layers[0].feed_forward.gate_proj).__name__ == "Int4Linear"
    want = fake_quantized(maverick_ckpt, 64)
    got = q(ids, q.new_cache(20), last_only=False)
    assert rel_err(got, want(ids, want.new_cache(20), last_only=False)) < 1e-5
    from llama4_local.checkpoint import open_checkpoint
    from llama4_local.config import load_config
    from llama4_local.loader import quantized_parts

    parts = quantized_parts(open_checkpoint(out), load_config(out), QuantScheme(group_size=64))
    assert (parts.experts, parts.shared, parts.mlp, parts.attention) == (True, True, True, False)
    kept = tmp_path / "mav-int4-bf16-mlp"
    quantize_checkpoint(maverick_ckpt, kept, QuantizeOptions(group_size=64, parts=("experts", "shared")))
    names = set(json.loads((kept / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.layers.0.feed_forward.gate_proj.weight" in names


def test_bf16_kernel_path_matches_reference_path(quantized):
    out, _ = quantized
    ids = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(1))
    q16, _ = load_model(out, "bfloat16", "cpu")
    q32, _ = load_model(out, "float32", "cpu")
    assert q16.layers[0].feed_forward.experts.experts[0].gate_proj.path in ("avx2_q8", "cpu")
    assert q32.layers[0].feed_forward.experts.experts[0].gate_proj.path in ("avx2", "reference")
    a = q16(ids, q16.new_cache(12), last_only=False)
    b = q32(ids, q32.new_cache(12), last_only=False)
    assert rel_err(a, b) < 3e-2


def test_cli_quantize_then_prompt(tmp_path, maverick_ckpt):
    out = tmp_path / "mav-int4"
    r = run_cli("quantize", maverick_ckpt, out, "--group-size", "32", "--asymmetric", "--attention")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stderr and "INT4 linears" in r.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["symmetric"] is False
    r = run_cli("prompt", "hello", "-m", out, "--json", "-n", "5", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["token_ids"]) == 5


def test_interrupted_before_any_shard_leaves_nothing(tmp_path, scout_ckpt, monkeypatch):
    out = tmp_path / "out"
    real = qmod.gptq_int4

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(qmod, "gptq_int4", interrupt)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(scout_ckpt, out, QuantizeOptions(group_size=64))
    assert list(tmp_path.iterdir()) == []  # no partial directory either
    monkeypatch.setattr(qmod, "gptq_int4", real)
    quantize_checkpoint(scout_ckpt, out, QuantizeOptions(group_size=64))  # re-running works
    assert (out / "config.json").is_file()


def test_disk_full(tmp_path, scout_ckpt, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(qmod, "write_shard", full)
    with pytest.raises(UserError, match="disk full"):
        quantize_checkpoint(scout_ckpt, tmp_path / "out", QuantizeOptions())
    assert list(tmp_path.iterdir()) == []


def assert_one_line_error(r, *words):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = error_lines(r)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0]


def test_bad_inputs(tmp_path, scout_ckpt, quantized):
    assert_one_line_error(run_cli("quantize", tmp_path / "nope", tmp_path / "o"), "does not exist")
    (tmp_path / "notllama").mkdir()
    (tmp_path / "notllama" / "config.json").write_text('{"model_type": "gpt2"}')
    assert_one_line_error(run_cli("quantize", tmp_path / "notllama", tmp_path / "o"), "not Llama 4")
    assert_one_line_error(run_cli("quantize", quantized[0], tmp_path / "o"), "already quantized")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert_one_line_error(run_cli("quantize", scout_ckpt, busy), "not empty")
    assert_one_line_error(run_cli("quantize", scout_ckpt, tmp_path / "o", "--group-size", "48"), "--group-size")
    assert not (tmp_path / "o").exists()


def test_expert_slices_made_contiguous():
    """The plain path's contiguous copy of a fused expert slice (two plain transposes for gate and
    up) holds the same values as the view."""
    from quant.quantize import _contiguous, expert_linears

    t = torch.randn(3, 64, 2 * 96).bfloat16()
    for name in ("experts.gate_up_proj", "experts.down_proj"):
        src = t if name.endswith("gate_up_proj") else t[:, :, :96].transpose(1, 2).contiguous()
        for w in expert_linears(name, src[1]).values():
            c = _contiguous(w)
            assert c.is_contiguous() and torch.equal(c, w)
