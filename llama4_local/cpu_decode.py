"""A decoder layer's decode step (one token, on the CPU, in bf16) as one call to C++.

model.DecoderLayer.forward hands a one-token step here: where every linear of the layer is one
our CPU kernels serve at one row (INT4 through int4_mv, INT8 through q8_mv, bf16 through
half_mv, and bf16 experts in the checkpoint's fused [in, out] layout through half_vm), the
routed experts are in memory (not offloaded) and nobody observes the routing, the whole layer
runs as quant/layer_kernel.py's DecodeLayer.run: the same kernels and ATen operations the
Python layer calls, in the same order, without the ~0.7 ms of Python and dispatch a layer spent
between them (docs/benchmarks-history.md, session 25). Anything else (prefill, float32, CUDA, offloaded
experts, a routing recorder, NF4/FP8 weights) keeps the Python path.

A layer's plan holds its weights' tensors, so it is built once and reused; `invalidate()` drops
every plan where modules are swapped, re-pointed or switch kernel paths (kernels.use_cpu_path and
int8_attention, QuantizedExperts.stacks, joined.fuse_qkv), and each plan remembers the generation
it was built in.

LLAMA4_LOCAL_PY_DECODE=1 keeps the Python layer (for comparison).
"""

from __future__ import annotations

import os

import torch

_generation = 0
_NONE = object()  # a layer found not to qualify, in this generation


def invalidate() -> None:
    """Drop every layer's plan (modules or kernel paths changed)."""
    global _generation
    _generation += 1


def _kernel():
    from quant import cpu_kernel

    return cpu_kernel._module() if cpu_kernel.available() else None


def _linear(kernel, mod):
    """The DecodeLinear for one module, or None where the C++ layer cannot serve it."""
    from quant import cpu_kernel
    from quant.kernels import AVX2_PATHS, Int4Linear, Int8Linear

    from . import model

    if isinstance(mod, Int4Linear):
        if mod.path not in AVX2_PATHS or (mod.path == "avx2_q8" and 0 < cpu_kernel.bf16_gemm_rows() <= 1):
            return None
        b = mod._buffers
        return kernel.DecodeLinear("int4", b["packed"], b["scales_and_zeros"], mod.group_size, mod.path == "avx2_q8")
    if type(mod) is Int8Linear:
        return kernel.DecodeLinear("int8", mod.qweight, mod.scales, 0, True)
    if type(mod) is model.Linear:
        w = mod.weight
        if w.dtype != torch.bfloat16 or w.device.type != "cpu" or w.shape[1] % 16 or not w.is_contiguous():
            return None
        return kernel.DecodeLinear("half", w, None, 0, False)
    return None


def _mlp(kernel, mlp) -> list | None:
    parts = [_linear(kernel, getattr(mlp, p, None)) for p in ("gate_proj", "up_proj", "down_proj")]
    return None if any(p is None for p in parts) else parts


def _build(layer):
    """The DecodeLayer for a model.DecoderLayer, or None."""
    from quant.modules import QuantizedExperts

    from . import model

    kernel = _kernel()
    if kernel is None:
        return None
    attn, ff = layer.self_attn, layer.feed_forward
    norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
    if any(w.dtype != torch.bfloat16 or w.device.type != "cpu" for w in norms) or attn.head_dim % 16:
        return None
    d = kernel.DecodeLayer()
    d.in_norm, d.post_norm = (w.contiguous() for w in norms)
    d.eps = float(attn.eps)
    lin = [_linear(kernel, getattr(attn, p)) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if any(x is None for x in lin):
        return None
    d.q, d.k, d.v, d.o = lin
    d.H, d.KV, d.hd = attn.n_heads, attn.n_kv, attn.head_dim
    d.rope, d.qk_norm, d.temperature = attn.use_rope, attn.qk_norm, attn.temperature_tuning
    d.floor_scale, d.attn_scale = float(attn.floor_scale), float(attn.attn_scale)
    if isinstance(ff, model.MoE):
        experts = ff.experts
        shared, router = _mlp(kernel, ff.shared_expert), _linear(kernel, ff.router)
        if shared is None or router is None:
            return None
        if isinstance(experts, QuantizedExperts):
            routed = [_mlp(kernel, e) for e in experts.experts]
            if any(r is None for r in routed):
                return None
            d.gate, d.up, d.down = ([r[i] for r in routed] for i in range(3))
        elif type(experts) is model.Experts:  # bf16, the checkpoint's fused [E, D, 2I] and [E, I, D]
            gu, dn = experts.gate_up_proj, experts.down_proj
            if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous() for t in (gu, dn)):
                return None
            d.fused = True
            d.gate = [kernel.DecodeLinear("half_t", gu[e], None, 0, False) for e in range(gu.shape[0])]
            d.down = [kernel.DecodeLinear("half_t", dn[e], None, 0, False) for e in range(dn.shape[0])]
        else:
            return None
        d.mlp, d.router, d.top_k = shared, router, ff.top_k
    elif isinstance(ff, model.MLP):
        mlp = _mlp(kernel, ff)
        if mlp is None:
            return None
        d.mlp = mlp
    else:
        return None
    return d


def plan(layer):
    """The layer's DecodeLayer where it can serve this layer now, else None."""
    got = layer.__dict__.get("_cpu_decode")
    if got is None or got[0] != _generation:
        built = None if os.environ.get("LLAMA4_LOCAL_PY_DECODE") else _build(layer)
        got = (_generation, _NONE if built is None else built)
        layer.__dict__["_cpu_decode"] = got
    d = got[1]
    if d is _NONE or getattr(layer.feed_forward, "observer", None) is not None:
        return None
    return d


def run(d, x: torch.Tensor, pos0: int, freqs: torch.Tensor, kv) -> torch.Tensor:
    """One token x [1, D] at position pos0 through the layer, its keys and values into kv."""
    slot = kv.append_slot(pos0)
    out = d.run(x, kv.buf.k, kv.buf.v, slot, pos0, freqs)
    kv.appended(pos0)
    return out
