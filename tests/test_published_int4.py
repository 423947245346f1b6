"""An INT4 checkpoint as others publish it (llm-compressor / compressed-tensors W4A16) loads and runs.

The weights are packed by compressed-tensors' own compressor (not by our quantizer), the names
carry the multimodal `language_model.` prefix with a vision tower beside them, and config.json
holds the quantization_config fields llm-compressor writes: symmetric, group 128, experts and
shared experts quantized, attention, router, vision and lm_head left in bf16.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llama4_local.loader import load_model

GROUP = 128

PUBLISHED_QC = {
    "config_groups": {
        "group_0": {
            "format": "pack-quantized",
            "input_activations": None,
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {
                "actorder": None,
                "block_structure": None,
                "dynamic": False,
                "group_size": GROUP,
                "num_bits": 4,
                "observer": "minmax",
                "observer_kwargs": {},
                "strategy": "group",
                "symmetric": True,
                "type": "int",
            },
        }
    },
    "format": "pack-quantized",
    "global_compression_ratio": None,
    "ignore": [
        "re:.*vision_model.*",
        "re:.*multi_modal_projector.*",
        "re:.*self_attn.*",
        "re:.*router.*",
        "language_model.lm_head",
    ],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
    "sparsity_config": {},
    "transform_config": {},
    "version": "0.10.2",
}


def compress(w: torch.Tensor):
    """compressed-tensors' W4A16 group-128 symmetric packing of one [out, in] weight (minmax scales)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    groups = w.float().reshape(w.shape[0], -1, GROUP)
    scale = (groups.abs().amax(-1) / 7.5).clamp_min(1e-8).to(torch.bfloat16)
    state = PackedQuantizationCompressor.compress({"weight": w.to(torch.bfloat16), "weight_scale": scale}, scheme)
    # Decompressed with a float32 scale: the exact values, not rounded again to bf16.
    deq = PackedQuantizationCompressor.decompress({**state, "weight_scale": scale.float()}, scheme)["weight"]
    assert deq.dtype == torch.float32
    return state, deq


@pytest.fixture(scope="module")
def published(multimodal_ckpt, tmp_path_factory):
    """(published INT4 directory, dict of module name -> dequantized weight for the oracle)."""
    src, out = multimodal_ckpt, tmp_path_factory.mktemp("published-w4a16")
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            tensors.update({k: h.get_tensor(k) for k in h.keys()})
    new, deq = {}, {}
    for name, t in tensors.items():
        if name.endswith("feed_forward.experts.gate_up_proj"):  # [E, D, 2I] -> per-expert linears
            base, inter = name.rsplit(".", 1)[0], t.shape[2] // 2
            down = tensors[base + ".down_proj"]
            for e in range(t.shape[0]):
                for proj, w in (("gate", t[e, :, :inter].t()), ("up", t[e, :, inter:].t()), ("down", down[e].t())):
                    state, d = compress(w.contiguous())
                    for k, v in state.items():
                        new[f"{base}.{e}.{proj}_proj.{k}"] = v
                    deq[f"{base}.{e}.{proj}_proj"] = d
        elif name.endswith("feed_forward.experts.down_proj"):
            continue
        elif ".shared_expert." in name and name.endswith(".weight"):
            state, d = compress(t)
            stem = name[: -len(".weight")]
            new.update({f"{stem}.{k}": v for k, v in state.items()})
            deq[stem] = d
        else:
            new[name] = t
    save_file(new, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = PUBLISHED_QC
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((src / f).read_bytes())
    return out, deq


def oracle(src, deq):
    """The original model with compressed-tensors' dequantized weights put in place."""
    model, _ = load_model(src, "float32", "cpu")
    for i, layer in enumerate(model.layers):
        if not layer.is_moe:
            continue
        ff = layer.feed_forward
        base = f"language_model.model.layers.{i}.feed_forward"
        gu, down = ff.experts.gate_up_proj.clone(), ff.experts.down_proj.clone()
        inter = gu.shape[2] // 2
        for e in range(gu.shape[0]):
            gu[e, :, :inter] = deq[f"{base}.experts.{e}.gate_proj"].t()
            gu[e, :, inter:] = deq[f"{base}.experts.{e}.up_proj"].t()
            down[e] = deq[f"{base}.experts.{e}.down_proj"].t()
        ff.experts.gate_up_proj = torch.nn.Parameter(gu, requires_grad=False)
        ff.experts.down_proj = torch.nn.Parameter(down, requires_grad=False)
        for p in ("gate", "up", "down"):
            lin = getattr(ff.shared_expert, f"{p}_proj")
            lin.weight = torch.nn.Parameter(deq[f"{base}.shared_expert.{p}_proj"], requires_grad=False)
    return model


def test_published_layout_loads_and_computes_its_weights(published, multimodal_ckpt):
    out, deq = published
    ids = torch.randint(0, 300, (30,), generator=torch.Generator().manual_seed(5))
    q, cfg = load_model(out, "float32", "cpu")
    assert cfg.quantization["version"] == "0.10.2"
    got = q(ids, q.new_cache(30), last_only=False)
    want_model = oracle(multimodal_ckpt, deq)
    want = want_model(ids, want_model.new_cache(30), last_only=False)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    # bf16 with the CPU INT4 kernel, and offloaded experts, run the same checkpoint.
    from offload.setup import OffloadOptions

    b16, _ = load_model(out, "bfloat16", "cpu")
    off, _ = load_model(out, "bfloat16", "cpu", offload=OffloadOptions(slots=2, miss_policy="swap"))
    a = b16(ids, b16.new_cache(30), last_only=False)
    b = off(ids, off.new_cache(30), last_only=False)
    assert torch.equal(a, b)
    # Row by row: bf16 activations (rounded to int8 by the CPU kernel) can turn a near tie of
    # the top-2 random router into another expert for a token or two (0.10-0.14 on those rows);
    # the others stay near 2e-2 (at most 0.04).
    errs = ((a - want).norm(dim=-1) / want.norm(dim=-1)).tolist()
    assert sorted(errs)[len(errs) // 2] < 3e-2 and sum(e > 5e-2 for e in errs) <= 3, errs


def test_activation_order_by_group_is_refused(published, tmp_path):
    """actorder "group" stores columns in activation order with a weight_g_idx map our kernels
    do not read: one line saying what to use instead, not silently wrong output."""
    from tests.cli_util import error_lines, run_cli

    out, _ = published
    for f in out.iterdir():
        (tmp_path / f.name).symlink_to(f)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = run_cli("prompt", "hi", "-m", tmp_path, "--device", "cpu", "-n", "2")
    lines = error_lines(r)
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "actorder" in lines[0], r.stderr
