"""`quantize --scheme nf4`: bitsandbytes NF4, its on-disk form, and the runner on it."""

from __future__ import annotations

import json

import pytest
import torch

from llama4_local.loader import load_model
from quant.nf4 import dequantize_nf4, from_tensors, quantize_nf4, to_tensors
from quant.quantize import QuantizeOptions, quantize_checkpoint
from tests.cli_util import run_cli
from tests.test_quantize import assert_one_line_error, rel_err

bnbf = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("blocksize", [64, 128])
def test_dequantize_and_serialization_agree_with_bitsandbytes(blocksize):
    w = (torch.randn(96, 256, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    nw = quantize_nf4(w, blocksize)
    q, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    assert torch.equal(nw.packed, q) and torch.equal(nw.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(nw), bnbf.dequantize_4bit(q, state))
    # What we write is what bitsandbytes' own serialization reads back.
    tensors = to_tensors("m", nw)
    qs_dict = {k.removeprefix("m.weight."): v for k, v in tensors.items() if k != "m.weight"}
    back = bnbf.QuantState.from_dict(qs_dict, device=torch.device("cpu"))
    assert back.blocksize == blocksize and tuple(back.shape) == (96, 256) and back.dtype == torch.bfloat16
    assert torch.equal(bnbf.dequantize_4bit(tensors["m.weight"], back), dequantize_nf4(nw))
    again = from_tensors(tensors.__getitem__, "m")
    assert torch.equal(dequantize_nf4(again), dequantize_nf4(nw))


@pytest.fixture(scope="module")
def nf4_ckpt(tmp_path_factory, scout_ckpt):
    out = tmp_path_factory.mktemp("nf4") / "scout-nf4"
    quantize_checkpoint(scout_ckpt, out, QuantizeOptions(group_size=64, scheme="nf4", shard_bytes=300_000))
    return out


def _fake_nf4(path, blocksize):
    """The original model with each expert and shared-expert weight replaced by its NF4 round trip."""
    model, _ = load_model(path, "float32", "cpu")
    rt = lambda w: dequantize_nf4(quantize_nf4(w, blocksize), torch.float32)  # noqa: E731
    for layer in model.layers:
        ff = layer.feed_forward
        gu, down = ff.experts.gate_up_proj.clone(), ff.experts.down_proj.clone()
        inter = gu.shape[2] // 2
        for e in range(gu.shape[0]):
            gu[e, :, :inter] = rt(gu[e, :, :inter].t().contiguous()).t()
            gu[e, :, inter:] = rt(gu[e, :, inter:].t().contiguous()).t()
            down[e] = rt(down[e].t().contiguous()).t()
        ff.experts.gate_up_proj = torch.nn.Parameter(gu, requires_grad=False)
        ff.experts.down_proj = torch.nn.Parameter(down, requires_grad=False)
        for lin in (ff.shared_expert.gate_proj, ff.shared_expert.up_proj, ff.shared_expert.down_proj):
            lin.weight = torch.nn.Parameter(rt(lin.weight), requires_grad=False)
    return model


def test_layout_and_config(nf4_ckpt):
    qc = json.loads((nf4_ckpt / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_quant_type"] == "nf4" and qc["load_in_4bit"]
    assert "self_attn" in qc["llm_int8_skip_modules"] and "vision_model" in qc["llm_int8_skip_modules"]
    index = json.loads((nf4_ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    base = "model.layers.0.feed_forward.experts.1.up_proj.weight"
    assert {base, f"{base}.absmax", f"{base}.quant_map", f"{base}.quant_state.bitsandbytes__nf4"} <= set(index)
    assert "model.layers.0.self_attn.q_proj.weight" in index  # attention left as it was


def test_nf4_model_computes_the_dequantized_weights(nf4_ckpt, scout_ckpt):
    ids = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(0))
    q, _ = load_model(nf4_ckpt, "float32", "cpu")
    assert q.layers[0].feed_forward.experts.experts[0].gate_proj.path == "nf4"
    want = _fake_nf4(scout_ckpt, 64)
    got = q(ids, q.new_cache(24), last_only=False)
    assert rel_err(got, want(ids, want.new_cache(24), last_only=False)) < 1e-5
    orig, _ = load_model(scout_ckpt, "float32", "cpu")
    assert rel_err(got, orig(ids, orig.new_cache(24), last_only=False)) > 1e-3  # it did quantize
    q16, _ = load_model(nf4_ckpt, "bfloat16", "cpu")
    assert rel_err(q16(ids, q16.new_cache(24), last_only=False), got) < 3e-2


@pytest.mark.parametrize("slots,miss", [(1, "swap"), (3, "cpu")])
def test_offloaded_nf4_experts_give_the_same_tokens(nf4_ckpt, slots, miss):
    from llama4_local.runner import PromptRequest, run_prompt
    from offload.setup import OffloadOptions

    common = dict(
        model=nf4_ckpt, text="hello", max_tokens=10, sampling={"temperature": 0.0}, ignore_eos=True, dtype="float32"
    )
    want = run_prompt(PromptRequest(**common, device="cpu")).token_ids
    got = run_prompt(PromptRequest(**common, device="cpu", offload=OffloadOptions(slots=slots, miss_policy=miss)))
    assert got.token_ids == want and got.stats.cache["misses"] > 0


def test_cli_quantize_nf4_then_prompt_and_info(tmp_path, maverick_ckpt):
    out = tmp_path / "mav-nf4"
    r = run_cli("quantize", maverick_ckpt, out, "--scheme", "nf4", "--group-size", "128", "--attention")
    assert r.returncode == 0, r.stderr
    assert "NF4 linears" in r.stderr
    r = run_cli("prompt", "hello", "-m", out, "--json", "-n", "5", "--temperature", "0", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["token_ids"]) == 5
    r = run_cli("info", out, "--json", "--gpu-memory", "1GiB")
    assert r.returncode == 0, r.stderr
    q = json.loads(r.stdout)["quantization"]
    assert q["scheme"] == "NF4 block 128 (bitsandbytes)" and q["parts"] == ["experts", "shared", "mlp", "attention"]


def test_nf4_bad_options(tmp_path, scout_ckpt):
    r = run_cli("quantize", scout_ckpt, tmp_path / "o", "--scheme", "nf4", "--asymmetric")
    assert_one_line_error(r, "asymmetric")
    assert_one_line_error(run_cli("quantize", scout_ckpt, tmp_path / "o", "--scheme", "fp8"), "--scheme")
    assert not (tmp_path / "o").exists()
