"""Small checkpoints in the layout of Meta's FP8 Maverick release, written with compressed-tensors.

`write_fp8(src, out, deq)` turns a bf16/float32 checkpoint written by tests.factory into:
- `out`: routed experts one linear per expert (`...experts.{e}.{gate,up,down}_proj`), they and
  the shared experts and dense MLPs as FP8 `weight` + `weight_scale` made by compressed-tensors'
  own FloatQuantizationCompressor (scales from its calculate_qparams, min-max), everything else
  in bf16, a `float-quantized` quantization_config; the scales in a second shard;
- `deq`: the same model as a plain bf16 checkpoint in the Hugging Face layout (fused experts),
  each FP8 weight replaced by compressed-tensors' decompression of it: the oracle's weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llama4_local.checkpoint import list_tensors
from quant.quantize import expert_linears
from tests.oracle_images import import_torchvision

IGNORE = ["re:.*self_attn.*", "re:.*router.*", "re:.*lm_head", "re:.*vision_model.*", "re:.*multi_modal_projector.*"]
SHARED = ("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight", "shared_expert.down_proj.weight")
_DENSE = ("feed_forward.gate_proj.weight", "feed_forward.up_proj.weight", "feed_forward.down_proj.weight")


def fp8_scheme(strategy: str, block: list[int] | None):
    import_torchvision()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, block_structure=block)
    acts = QuantizationArgs(num_bits=8, type="float", strategy="token", dynamic=True, symmetric=True)
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)


def compress_fp8(w: torch.Tensor, scheme) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(compressed tensors of one linear, its decompressed weight) for w [N, K] in bf16."""
    from compressed_tensors.compressors import FloatQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    args = scheme.weights
    if args.strategy == "channel":
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    elif args.strategy == "tensor":
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    else:  # block
        bn, bk = args.block_structure
        b = w.reshape(w.shape[0] // bn, bn, w.shape[1] // bk, bk)
        lo, hi = b.amin((1, 3)), b.amax((1, 3))
    scale, zero = calculate_qparams(lo, hi, args)
    state = {"weight": w, "weight_scale": scale, "weight_zero_point": zero}
    c = FloatQuantizationCompressor.compress(state, scheme)
    d = FloatQuantizationCompressor.decompress(c, scheme)
    return c, d["weight"].to(torch.bfloat16)


def quantization_config(scheme) -> dict:
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": scheme.model_dump()},
        "ignore": IGNORE,
        "kv_cache_scheme": None,
    }


def write_fp8(src: Path, out: Path, deq: Path, strategy: str = "channel", block: list[int] | None = None) -> None:
    scheme = fp8_scheme(strategy, block)
    weights, scales, dense = {}, {}, {}
    for name, path in sorted(list_tensors(src).items()):
        with safe_open(str(path), framework="pt") as f:
            t = f.get_tensor(name).to(torch.bfloat16)
        fused = name.endswith((".experts.gate_up_proj", ".experts.down_proj"))
        if fused:  # [E, D, 2I] or [E, I, D]: one FP8 linear [out, in] per expert
            base = name.rsplit(".", 1)[0]
            back = torch.empty_like(t)
            for e in range(t.shape[0]):
                for proj, w in expert_linears(name, t[e]).items():
                    c, d = compress_fp8(w.contiguous(), scheme)
                    weights[f"{base}.{e}.{proj}.weight"] = c["weight"]
                    scales[f"{base}.{e}.{proj}.weight_scale"] = c["weight_scale"]
                    expert_linears(name, back[e])[proj].copy_(d)  # the same view of the fused tensor
            dense[name] = back
        elif name.endswith(SHARED) or name.endswith(_DENSE):
            c, d = compress_fp8(t, scheme)
            weights[name] = c["weight"]
            scales[name.removesuffix(".weight") + ".weight_scale"] = c["weight_scale"]
            dense[name] = d
        else:
            weights[name] = t
            dense[name] = t
    out.mkdir(parents=True)
    deq.mkdir(parents=True)
    files = {"model-00001-of-00002.safetensors": weights, "model-00002-of-00002.safetensors": scales}
    for fname, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / fname), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, ts in files.items() for k in ts}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({k: v.contiguous() for k, v in dense.items()}, str(deq / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((src / "config.json").read_text())
    raw["torch_dtype"] = "bfloat16"
    (deq / "config.json").write_text(json.dumps(raw))
    raw["quantization_config"] = quantization_config(scheme)
    (out / "config.json").write_text(json.dumps(raw))
    for p in src.iterdir():
        if (
            p.is_file()
            and p.suffix in (".json", ".jinja")
            and p.name not in ("config.json", "model.safetensors.index.json")
        ):
            shutil.copy2(p, out / p.name)
            shutil.copy2(p, deq / p.name)
