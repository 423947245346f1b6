"""quantize --int8-lm-head stores the lm_head in INT8 (Q8_0 blocks of 32, compressed-tensors
int-quantized), and the loader takes it as stored: mapped, no rounding at load, the same logits
as a kept head rounded at load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from llama4_local.checkpoint import HEAD_SIDECAR
from llama4_local.errors import UserError
from llama4_local.loader import file_mappings, load_model
from quant import cpu_kernel
from quant.format import LM_HEAD_GROUP, LM_HEAD_TARGET, QuantScheme
from quant.head import write_head_sidecar
from quant.kernels import Int8Linear, q8_blocks, q8_dequantize
from quant.quantize import QuantizeOptions, quantize_checkpoint


def _head(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for suffix in ("weight", "weight_scale"):
        name = f"lm_head.{suffix}"
        if name in index:
            with safe_open(str(path / index[name]), "pt") as f:
                out[suffix] = f.get_tensor(name)
    return out


def _source_head(scout_ckpt):
    with safe_open(str(scout_ckpt / "model.safetensors"), "pt") as f:
        return f.get_tensor("lm_head.weight")


@pytest.fixture(scope="module")
def stored(tmp_path_factory, scout_ckpt):
    """The scout_int4 fixture's quantize with --int8-lm-head (scout_int4 keeps its head)."""
    out = tmp_path_factory.mktemp("int8head") / "scout-int4-int8-head"
    quantize_checkpoint(scout_ckpt, out, QuantizeOptions(group_size=64, calibrate=False, int8_lm_head=True))
    return out


def test_stored_int8_with_its_config_group(stored, scout_ckpt):
    path = stored
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision" and qc["config_groups"]["group_1"] == LM_HEAD_GROUP
    assert not any("lm_head" in i for i in qc["ignore"])
    head = _head(path)
    assert head["weight"].dtype == torch.int8 and head["weight_scale"].dtype == torch.float32
    q, s = q8_blocks(_source_head(scout_ckpt))
    assert torch.equal(head["weight"], q) and torch.equal(head["weight_scale"], s)
    scheme = QuantScheme.from_config(qc, "config.json")  # the INT4 group read as before
    assert (scheme.kind, scheme.group_size, scheme.num_bits) == ("int4", 64, 4)


def test_compressed_tensors_reads_the_head(stored, scout_ckpt):
    """Its dequantizer gives our weights back, and its scheme matching gives the lm_head the INT8
    group (an exact regex outranks group_0's class target "Linear") and other linears INT4."""
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config

    path = stored
    head = _head(path)
    scheme = QuantizationScheme(**LM_HEAD_GROUP)
    got = IntQuantizationCompressor.decompress(dict(head), scheme)["weight"]
    want = q8_dequantize(head["weight"], head["weight_scale"], torch.float32)
    assert torch.equal(got.float(), want)
    src = _source_head(scout_ckpt).float()
    assert ((want - src).norm() / src.norm()).item() < 0.01

    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    toy = torch.nn.Module()
    toy.proj, toy.lm_head = torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 64, bias=False)
    apply_quantization_config(toy, QuantizationConfig.model_validate(qc))
    assert toy.lm_head.quantization_scheme.weights.num_bits == 8
    assert toy.proj.quantization_scheme.weights.num_bits == 4


def test_bf16_cpu_run_maps_the_head_and_computes_as_before(stored, scout_int4, scout_ckpt):
    """As a run of the kept checkpoint, whose bf16 head is rounded to INT8 at load (here from the
    float32 source's values, as quantize rounds them: from a bf16 source the two are the same)."""
    path, (kept, _) = stored, scout_int4
    if not cpu_kernel.available():
        pytest.skip("our CPU kernel is not available here")
    model, _ = load_model(path, "bfloat16", "cpu")
    before, _ = load_model(kept, "bfloat16", "cpu")
    assert isinstance(model.lm_head, Int8Linear) and isinstance(before.lm_head, Int8Linear)
    before.lm_head = Int8Linear(_source_head(scout_ckpt))
    maps = [(lo, hi) for lo, hi, p in file_mappings() if str(path) in p]
    for t in (model.lm_head.qweight, model.lm_head.scales):
        assert any(lo <= t.data_ptr() < hi for lo, hi in maps), "the stored head was copied"
    ids = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(1))
    a = model(ids, model.new_cache(9), last_only=False)
    b = before(ids, before.new_cache(9), last_only=False)
    assert torch.equal(a, b)


def test_float32_and_other_runs_dequantize(stored, monkeypatch):
    from quant import kernels

    path = stored
    monkeypatch.setattr(kernels, "DEQUANTIZE_ROWS", 100)  # 384 rows in four blocks
    model, _ = load_model(path, "float32", "cpu")
    head = _head(path)
    assert torch.equal(model.lm_head.weight, q8_dequantize(head["weight"], head["weight_scale"], torch.float32))


def test_kept_by_default_with_int8_blocks_beside_it(scout_int4, scout_ckpt):
    """The default keeps the head (the config and index vLLM reads as before) and writes its
    INT8 blocks in HEAD_SIDECAR, which no index names; a bf16 CPU run maps those."""
    kept, _ = scout_int4
    qc = json.loads((kept / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and "re:.*lm_head" in qc["ignore"] and "group_1" not in qc["config_groups"]
    head = _head(kept)
    src = _source_head(scout_ckpt)
    assert set(head) == {"weight"} and torch.equal(head["weight"], src)
    side = kept / HEAD_SIDECAR
    assert side.is_file() and not side.name.endswith(".safetensors")
    assert HEAD_SIDECAR not in (kept / "model.safetensors.index.json").read_text()
    if not cpu_kernel.available():
        pytest.skip("our CPU kernel is not available here")
    model, _ = load_model(kept, "bfloat16", "cpu")
    maps = [(lo, hi) for lo, hi, p in file_mappings() if str(side) in p]
    assert isinstance(model.lm_head, Int8Linear)
    assert all(any(lo <= t.data_ptr() < hi for lo, hi in maps) for t in (model.lm_head.qweight, model.lm_head.scales))
    q, s = q8_blocks(src)
    assert torch.equal(model.lm_head.qweight, q) and torch.equal(model.lm_head.scales, s)
    f32, _ = load_model(kept, "float32", "cpu")  # other runs read the head as stored
    assert torch.equal(f32.lm_head.weight, src)


def test_a_sidecar_for_another_head_is_not_used(tmp_path, scout_int4, scout_ckpt):
    import shutil

    if not cpu_kernel.available():
        pytest.skip("our CPU kernel is not available here")
    kept, _ = scout_int4
    copy = tmp_path / "copy"
    shutil.copytree(kept, copy)
    src = _source_head(scout_ckpt)
    write_head_sidecar(copy / HEAD_SIDECAR, src * 2)  # a fine-tuned head's blocks, say
    model, _ = load_model(copy, "bfloat16", "cpu")
    assert isinstance(model.lm_head, Int8Linear)  # rounded at load from the head as stored
    assert torch.equal(model.lm_head.qweight, q8_blocks(src.bfloat16())[0])


def test_q8_blocks_torch_matches_the_kernel():
    if not cpu_kernel.available():
        pytest.skip("our CPU kernel is not available here")
    w = torch.randn(37, 96, generator=torch.Generator().manual_seed(2)).bfloat16()
    w[3, 32:64] = 0  # a zero block: scale 0, integers 0
    q, s = cpu_kernel.q8_quantize(w)
    tq, ts = q8_blocks(w.double())  # float64: the torch path (the extension takes float32, bf16, fp16)
    assert torch.equal(tq, q) and torch.equal(ts, s)
    w[7, 40] = float("nan")
    assert torch.isnan(q8_blocks(w.double())[1][7, 1]) and torch.isnan(cpu_kernel.q8_quantize(w)[1][7, 1])


def test_unknown_mixtures_are_refused():
    qc = QuantScheme().config([], int8_lm_head=True)
    qc["config_groups"]["group_1"] = {**LM_HEAD_GROUP, "targets": ["re:.*q_proj$"]}
    with pytest.raises(UserError, match="mixed-precision"):
        QuantScheme.from_config(qc, "config.json")
    qc["config_groups"]["group_1"] = {**LM_HEAD_GROUP, "targets": [LM_HEAD_TARGET]}
    assert QuantScheme.from_config(qc, "config.json").num_bits == 4
