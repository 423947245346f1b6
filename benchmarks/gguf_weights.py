"""llama.cpp's own quantized weights, dequantized into our model: the peer's real bytes, scored by
our KL measurement.

`dequantized_model(gguf, model_dir)` loads the original checkpoint as a float32 model and replaces
every tensor that llama-quantize stored in a quantized type (Q4_K, Q6_K, Q4_0, ...) by its
dequantized value, read with the gguf-py package that llama.cpp's source vendors (its
`gguf.quants.dequantize`). Tensors llama.cpp keeps in F32 or F16 (norms, the router) stay the
original's. The GGUF layout is the one llama.cpp's converter writes for Llama 4 (no q/k
permutation, experts split into gate, up and down stacks [E, out, in]).
"""

from __future__ import annotations

from pathlib import Path

import torch
from llamacpp import gguf_py

from llama4_local.loader import load_model

KEPT = {"F32", "F16", "BF16"}


def dequantized_model(gguf: Path, model_dir: Path, llama_src: Path):
    """Our float32 model of model_dir with llama.cpp's quantized tensors from `gguf`; returns
    (model, {gguf tensor type: count}) so a caller can show what the file held."""
    gg = gguf_py(llama_src)
    reader, dequantize = gg.GGUFReader(str(gguf)), gg.quants.dequantize
    model, _ = load_model(model_dir, "float32", "cpu")
    types: dict[str, int] = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        types[kind] = types.get(kind, 0) + 1
        if kind in KEPT:
            continue
        value = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        _put(model, t.name, value)
    return model, types


def _put(model, name: str, value: torch.Tensor) -> None:
    if name == "token_embd.weight":
        return _copy(model.embed_tokens.weight, value)
    if name == "output.weight":
        return _copy(model.lm_head.weight, value)
    _, i, kind, _ = name.split(".")
    layer = model.layers[int(i)]
    a, ff = layer.self_attn, layer.feed_forward
    linears = {"attn_q": a.q_proj, "attn_k": a.k_proj, "attn_v": a.v_proj, "attn_output": a.o_proj}
    if layer.is_moe:
        sh = ff.shared_expert
        linears |= {"ffn_gate_shexp": sh.gate_proj, "ffn_up_shexp": sh.up_proj, "ffn_down_shexp": sh.down_proj}
        ex = ff.experts
        inter = ex.down_proj.shape[1]
        if kind == "ffn_gate_exps":  # [E, I, D] -> the first half of gate_up_proj [E, D, 2I]
            return _copy(ex.gate_up_proj.data[:, :, :inter], value.transpose(1, 2))
        if kind == "ffn_up_exps":
            return _copy(ex.gate_up_proj.data[:, :, inter:], value.transpose(1, 2))
        if kind == "ffn_down_exps":  # [E, D, I] -> down_proj [E, I, D]
            return _copy(ex.down_proj.data, value.transpose(1, 2))
    else:
        linears |= {"ffn_gate": ff.gate_proj, "ffn_up": ff.up_proj, "ffn_down": ff.down_proj}
    if kind not in linears:
        raise KeyError(f"no place for GGUF tensor {name}")
    _copy(linears[kind].weight, value)


def _copy(dst: torch.Tensor, value: torch.Tensor) -> None:
    if dst.shape != value.shape:
        raise ValueError(f"GGUF tensor of shape {tuple(value.shape)} for a weight of {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(value)
