"""Weights joined for fewer, larger products in the static decode step (graph_decode.py)."""

from __future__ import annotations

import torch
from torch import nn

from . import cpu_decode


def fuse_qkv(attn):
    """One linear whose output rows are q_proj's, k_proj's and v_proj's, made once per model: the
    three projections' buffers become row ranges of its (no second copy). For bf16/fp16/float32
    linears and INT4 ones whose layout keeps a weight row's data in one row (the Triton and CPU
    kernels'); None for the others. k and v are small (1024 of Scout's rows each): alone, their
    products leave most of a GPU idle."""
    if attn.__dict__.get("_qkv") is not None:
        return attn.__dict__["_qkv"]
    from quant.kernels import AVX2_PATHS, Int4Linear

    from .model import Linear

    mods = [attn.q_proj, attn.k_proj, attn.v_proj]
    if all(type(m) is Linear for m in mods):
        names = ("weight",)
        fused_mod = Linear.__new__(Linear)
    elif all(type(m) is Int4Linear and (m.path == "triton" or m.path in AVX2_PATHS) for m in mods):
        a = mods[0]
        if any(
            (m.path, m.group_size, m.dtype, m.shape[1]) != (a.path, a.group_size, a.dtype, a.shape[1]) for m in mods
        ):
            return None
        names = ("packed", "scales_and_zeros")
        fused_mod = Int4Linear.__new__(Int4Linear)
    else:
        return None
    tensors = [{n: getattr(m, n) for n in names} for m in mods]
    if any(
        t[n].dtype != tensors[0][n].dtype or t[n].shape[1:] != tensors[0][n].shape[1:] for t in tensors for n in names
    ):
        return None
    nn.Module.__init__(fused_mod)
    for n in names:
        whole = torch.cat([t[n] for t in tensors])
        if n == "weight":
            fused_mod.weight = nn.Parameter(whole, requires_grad=False)
        else:
            fused_mod.register_buffer(n, whole)
        start = 0
        for m, t in zip(mods, tensors, strict=True):  # each projection now reads its rows of the whole
            rows = t[n].shape[0]
            view = whole[start : start + rows]
            if n == "weight":
                m.weight = nn.Parameter(view, requires_grad=False)
            else:
                m._buffers[n] = view
            start += rows
    if isinstance(fused_mod, Int4Linear):
        a = mods[0]
        fused_mod.shape = (sum(m.shape[0] for m in mods), a.shape[1])
        fused_mod.group_size, fused_mod.dtype, fused_mod.path = a.group_size, a.dtype, a.path
    cpu_decode.invalidate()  # the projections' tensors are now views of the whole
    object.__setattr__(attn, "_qkv", fused_mod)  # not a submodule: its weights are the projections'
    return fused_mod
