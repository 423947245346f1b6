"""The static decode step's elementwise work in a few fused kernels (torch.compile) on CUDA.

A Scout decode step replayed as a CUDA graph (graph_decode.py) still runs some 70 kernels per
layer, most of them tiny: an RMSNorm is seven (cast, square, mean, add, rsqrt, multiply, weight),
RoPE three per tensor, the NoPE layers' temperature six, attention's mask and softmax five. In a
graph each costs a few microseconds whatever its size, which is as long as a layer's weights take
to read. Each function below is one region that torch.compile turns into one or two Triton
kernels; the matmuls inside stay cuBLAS (inductor's extern kernels). They compute the eager
model's arithmetic (float32 where it is float32; roundings to the activations' dtype may fall at
other points: within bf16 tolerance of the eager step, tests/test_graph_decode.py).

Compiled where the tensors are on CUDA and Triton is there, unless LLAMA4_LOCAL_COMPILE=0;
LLAMA4_LOCAL_COMPILE=1 compiles on the CPU too (tests: inductor's C++ backend). Otherwise the
same functions run eagerly. Compiling costs seconds per function once per process (inductor
caches its kernels on disk), paid in the graph's warm-up before capture: some 13 s per process on
an H200 (session 14), repaid after about 3000 tokens, so the one-reply `prompt` command sets
LLAMA4_LOCAL_COMPILE=0 unless the user set it.
"""

from __future__ import annotations

import os
import sys

import torch

from . import model

_disabled = False
REGIONS: list = []  # every fused region (each keeps its compiled form in .compiled)


def disable(reason: BaseException) -> bool:
    """Stop compiling for the rest of the process (the compiler failed on this machine: the
    regions run as they are); warns once. False when nothing was being compiled."""
    global _disabled
    if _disabled or os.environ.get("LLAMA4_LOCAL_COMPILE") == "0":
        return False
    _disabled = True
    msg = f"{type(reason).__name__}: {reason}".splitlines()[0][:300]
    sys.stderr.write(f"warning: a compiled decode region failed ({msg}); running them uncompiled\n")
    return True


def _wanted(t: torch.Tensor) -> bool:
    if _disabled:
        return False
    flag = os.environ.get("LLAMA4_LOCAL_COMPILE", "")
    if flag == "0":
        return False
    if flag == "1":
        return True
    if t.device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fuse(fn=None, *, eager=None):
    """`fn` compiled (static shapes, one graph) when its first tensor argument asks for it; else
    `eager` (the model's own function, e.g. the CPU's glue kernel) or `fn` as it is."""
    if fn is None:
        return lambda f: fuse(f, eager=eager)
    plain = eager or fn

    def call(*args):
        if not _wanted(args[0]):
            return plain(*args)
        if call.compiled is None:
            call.compiled = _compile(fn)
        try:
            return call.compiled(*args)
        except Exception as e:  # noqa: BLE001 - the compiler failing on this machine: run it as it is
            disable(e)
            return plain(*args)

    call.compiled = None
    call.eager = plain
    REGIONS.append(call)
    call.__name__ = call.__qualname__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call


def _compile(fn):
    """torch.compile'd `fn`: static shapes, one graph, roundings where eager rounds."""
    import torch._dynamo.config as dyn
    from torch._inductor import config

    if hasattr(config, "emulate_precision_casts"):  # round where eager rounds
        config.emulate_precision_casts = True
    for limit in ("recompile_limit", "cache_size_limit"):  # attend: one build per KV span
        if hasattr(dyn, limit):
            setattr(dyn, limit, max(getattr(dyn, limit), 32))
    return torch.compile(fn, dynamic=False, fullgraph=True)


@fuse(eager=lambda x, w, eps: model.rms_norm(x, eps, w))
def norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm(x) * w, as model.RMSNorm."""
    return model.rms_norm_torch(x, eps, w)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """model.apply_rope in real arithmetic: pairs (2i, 2i+1) of x [1, heads, hd] rotated by
    (cos, sin) [1, hd/2] in float32, as the complex product computes them."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2).type_as(x)


@fuse
def qk_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, qk_norm: bool, eps: float):
    """The RoPE layers' q and k [1, heads, hd]: rotated, then (qk_norm) L2-normed without weight."""
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    if qk_norm:
        q, k = model.rms_norm_torch(q, eps), model.rms_norm_torch(k, eps)
    return q, k


@fuse
def q_temperature(q: torch.Tensor, pos: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """The NoPE layers' query scaled by log(floor((pos + 1) / floor_scale) + 1) * attn_scale + 1."""
    scale = torch.log1p(torch.floor((pos.float() + 1.0) / floor_scale)) * attn_scale + 1.0
    return (q * scale[:, None, None]).to(q.dtype)


@fuse
def attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query q [KV, H/KV, hd] against keys and values [KV, S, hd] where `visible` [S]:
    model.one_query_attention's arithmetic ([1, H * hd])."""
    kv, g, hd = q.shape
    scores = torch.bmm(q, keys.transpose(1, 2)) * scale
    scores = scores.masked_fill(~visible, -torch.inf)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.bmm(probs, values).reshape(1, kv * g * hd)


@fuse
def route(logits: torch.Tensor, x: torch.Tensor, top_k: int, shared: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen experts `sel` [k] and the rows they take [k, D]: x scaled by each one's sigmoid
    score, as MoE.route and MoE.forward (the score scales the expert's input); with `shared` >= 0
    (the shared expert's index in the stacks) that index and x itself are appended: [k + 1]."""
    idx, scores = model.top_k_scores(logits, top_k, x.dtype)  # [1, k] each
    rows = x * scores[0, :, None]  # [k, D]
    if shared < 0:
        return idx[0], rows
    return torch.cat([idx[0], idx.new_full((1,), shared)]), torch.cat([rows, x])


def _sum_rows(rows: torch.Tensor) -> torch.Tensor:
    """A layer's feed-forward output [1, D] from its rows: one (a dense MLP's output, or an
    attention output: add_rows_norm serves both residual sums of a layer), or the routed
    experts' rows then the shared expert's, summed as MoE.forward sums them (the routed ones in
    float32, rounded once, then added to the shared one)."""
    if rows.shape[0] == 1:
        return rows
    routed = rows[:-1] if rows.shape[0] == 2 else rows[:-1].float().sum(0, keepdim=True).to(rows.dtype)
    return routed + rows[-1:]


def _add_rows_norm_eager(x, rows, w, eps):
    h = x + _sum_rows(rows)
    return h, model.rms_norm(h, eps, w)


@fuse(eager=_add_rows_norm_eager)
def add_rows_norm(x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, eps: float):
    """(h, rms_norm(h) * w) for h = x + the feed-forward output that `rows` [R, D] sum to."""
    h = x + _sum_rows(rows)
    return h, model.rms_norm_torch(h, eps, w)


@fuse(eager=model.silu_mul)
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, silu rounded to the dtype first, as model.silu_mul."""
    return torch.nn.functional.silu(gate) * up
