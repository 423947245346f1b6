"""A decode step with static shapes and no host syncs, and its CUDA-graph replay.

The eager decode step (model.Llama4Text.forward) asks the host for every layer's chosen experts
(`idx.tolist()`), slices KV caches by Python positions and grows them, so on a GPU it costs some
3400 kernel launches and 290 host syncs per Scout token (docs/benchmarks.md). `StaticDecode`
computes the same token with everything on the device:

- K and V live in fixed buffers per layer, zero-filled: `max_len` slots for the NoPE (full)
  layers, slot = position; min(chunk, max_len) slots for the chunked layers, slot = position
  mod chunk (the eager ChunkedKV's own slot order). Attention reads the whole buffer and masks
  the slots that do not hold a visible position (a later one, or one of an earlier chunk).
- The position is a device tensor: RoPE rotations, NoPE temperature tuning, the KV write slot
  and the mask follow from it.
- Routed experts are chosen by a device index: each projection's buffers are stacked over the
  experts once (the experts' own buffers become views of the stack, so memory stays the same).
  The Triton GEMV (CUDA's default INT4 path) reads the chosen expert in place; the stock kernel
  (LLAMA4_LOCAL_CUDA_INT4=stock) gathers its buffers by `index_select`, a copy of the expert per
  token: 3.9 ms of a 12.6 ms Scout step on an H200 (docs/benchmarks.md).

- The elementwise work between the matmuls runs as llama4_local/fused.py's compiled regions on
  CUDA (an RMSNorm one kernel instead of seven): ~1440-1730 kernels per Scout token, not 3400.

So one step is a fixed sequence of kernels, which `CudaGraphDecode` captures once and replays
per token: the default decode on CUDA when every expert is resident (no offload manager), 75-89
Scout tokens/s on an H200 against 12-20 eager. On the CPU the same step runs eagerly (slower
than the eager model there, so not the default): that is how tests prove it equals the eager
model. Attention reads the first `span` slots of each buffer, span the smallest of 512, 1024,
2048, ... past the position (one graph per span, captured when first needed): reading every
slot of a 128k context would cost some 6 GB per Scout token.
"""

from __future__ import annotations

import sys

import torch

from . import fused
from .errors import UserError
from .joined import fuse_qkv
from .kv_cache import KVCache
from .model import matmul, rms_norm

MIN_SPAN = 512  # the smallest number of KV slots a step reads (span_for)


class StaticDecode:
    """One-token decode steps for `model` that write into an eager KVCache's own buffers.

    The cache's buffers are grown once to their limit (its NoPE layers' `max_len` slots, its
    chunked layers' min(chunk, max_len)) and zeroed past what they hold, so their addresses
    never change again; each step writes its K and V at the slot the eager ChunkedKV or FullKV
    would use, and `advance` moves the cache's counters, so eager prefills and static steps can
    take turns on one cache (a chat's next turn, a server's reuse)."""

    def __init__(self, model, cache: KVCache, offloaded: bool = False):
        """`offloaded`: the model has an expert cache and the caller runs its MoE halves
        (piecewise_decode.py); only the attention halves are used then."""
        if model.offload is not None and not offloaded:
            raise UserError("a static decode step needs every expert resident (no expert cache)")
        self.model, self.cache = model, cache
        self.caps, self.k, self.v = [], [], []
        for kv in cache.layers:
            cap = kv.buf.limit
            held = kv.length - kv.start if kv.chunked else kv.length
            kv.buf.reserve(cap, keep=held)
            kv.buf.k[:, held:].zero_()  # masked slots are read too: 0 x stale must not be NaN
            kv.buf.v[:, held:].zero_()
            self.caps.append(cap)
            self.k.append(kv.buf.k)
            self.v.append(kv.buf.v)
        self.slots = {c: torch.arange(c, device=model.device) for c in set(self.caps)}
        self.qkv = [fuse_qkv(layer.self_attn) for layer in model.layers]  # joined once per model
        # (QuantizedExperts.stacks() stacks once per model, whatever number of caches it serves)
        moe = [] if offloaded else [i for i, layer in enumerate(model.layers) if layer.is_moe]
        self.experts = {i: _stack_experts(model.layers[i].feed_forward) for i in moe}

    @property
    def position(self) -> int:
        """Where the next token goes; a step there needs room: position < max_len."""
        n = self.cache.length
        if n >= self.cache.max_len:
            raise UserError(f"the context is full: all {self.cache.max_len} positions are used")
        return n

    def advance(self) -> None:
        """Count the token the last step wrote, as the eager caches' update would."""
        for kv in self.cache.layers:
            kv.length += 1
            if kv.chunked and kv.length % kv.chunk == 0:  # the block is complete: the next starts
                # As ChunkedKV.update: the finished block is kept (a copy) where the cache may be
                # rewound into it; the buffer holds exactly that block now.
                kv.prev = (kv.buf.k.clone(), kv.buf.v.clone(), kv.length - kv.chunk) if kv.keep_previous else None
                kv.start = kv.length

    @torch.inference_mode()
    def step(self, token: torch.Tensor, pos: torch.Tensor, span: int | None = None) -> torch.Tensor:
        """Logits [1, V] (float32) for `token` [1] at position `pos` [1] (both int64, on the device),
        attention reading the first `span` slots of each buffer (all: None; span_for(position)
        covers every position up to it). The elementwise work runs as fused.py's compiled
        regions on CUDA."""
        m = self.model
        x, y, cos, sin = self.embed(token, pos)
        for i, layer in enumerate(m.layers):
            h, y = self.attention_half(i, x, y, pos, cos, sin, span)
            rows = self._moe(i, layer.feed_forward, y) if layer.is_moe else layer.feed_forward(y)
            x, y = self.add_rows(i, h, rows)
        return m.lm_head(y).float()

    def embed(self, token: torch.Tensor, pos: torch.Tensor):
        """(x, its first norm, cos, sin) for `token` at `pos`."""
        m = self.model
        x = m.embed(token)
        angles = pos.float()[:, None] * m.inv_freq[None, :]  # rope_freqs's, as cos and sin
        first = m.layers[0].input_layernorm
        return x, fused.norm(x, first.weight, first.eps), torch.cos(angles), torch.sin(angles)

    def attention_half(self, i: int, x, y, pos, cos, sin, span=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's residual after attention and its post-attention norm, from the residual x
        entering the layer and its norm y."""
        layer = self.model.layers[i]
        post = layer.post_attention_layernorm
        out = self._attention(i, layer.self_attn, y, pos, cos, sin, span)
        return fused.add_rows_norm(x, out, post.weight, post.eps)

    def span_for(self, position: int) -> int:
        """Slots a step at `position` reads: the smallest of MIN_SPAN, 2 MIN_SPAN, 4 MIN_SPAN, ...
        past it (so one CUDA graph serves a range of positions), at most the largest buffer. A
        step reads its chunk's or context's first `span` slots, never all of a long context's."""
        n = MIN_SPAN
        while n <= position:
            n *= 2
        return min(n, max(self.caps))

    def add_rows(self, i: int, h: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual leaving layer i (h plus the feed-forward rows' sum) and the next norm of it."""
        m = self.model
        nxt = m.layers[i + 1].input_layernorm if i + 1 < len(m.layers) else m.norm
        return fused.add_rows_norm(h, rows, nxt.weight, nxt.eps)

    def _attention(self, i: int, attn, x: torch.Tensor, pos: torch.Tensor, cos, sin, span=None) -> torch.Tensor:
        h, kv, hd = attn.n_heads, attn.n_kv, attn.head_dim
        if self.qkv[i] is not None:  # one product for q, k and v
            q, k, v = self.qkv[i](x).split((h * hd, kv * hd, kv * hd), dim=-1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q, k, v = q.reshape(1, h, hd), k.reshape(1, kv, hd), v.reshape(1, kv, hd)
        if attn.use_rope:
            q, k = fused.qk_rope(q, k, cos, sin, attn.qk_norm, attn.eps)
        elif attn.qk_norm:  # (not in Llama 4: qk-norm goes with RoPE)
            q, k = rms_norm(q, attn.eps), rms_norm(k, attn.eps)
        if attn.temperature_tuning:
            q = fused.q_temperature(q, pos, attn.floor_scale, attn.attn_scale)
        cap = self.caps[i]
        slot = pos % cap  # full layers: cap = max_len > pos, so the slot is the position
        n = cap if span is None else min(cap, span)  # slot <= pos < span: the slot is among them
        keys, values = self.k[i][:, :n], self.v[i][:, :n]
        keys.index_copy_(1, slot, k.transpose(0, 1))
        values.index_copy_(1, slot, v.transpose(0, 1))
        visible = self.slots[cap][:n] <= slot  # chunked: this chunk's slots so far; full: positions <= pos
        out = fused.attend(q.view(kv, h // kv, hd), keys, values, visible, hd**-0.5)
        return attn.o_proj(out.to(x.dtype))

    def _moe(self, i: int, ff, x: torch.Tensor) -> torch.Tensor:
        """The layer's expert outputs as rows [k + 1, D], routed ones then the shared expert's
        (add_rows_norm sums them as MoE.forward does)."""
        rows_of, shared = self.experts[i]
        sel, inp = fused.route(ff.router(x), x, ff.top_k, shared)  # on the device: no host sync
        if shared >= 0:  # the shared expert is one more row of the stacked experts
            return rows_of(sel, inp)
        return torch.cat([rows_of(sel, inp), shared_row(ff, x)])


def shared_row(ff, x: torch.Tensor) -> torch.Tensor:
    """The MoE layer's shared expert on x [1, D], its SwiGLU one fused region."""
    sh = ff.shared_expert
    return sh.down_proj(fused.silu_mul(sh.gate_proj(x), sh.up_proj(x)))


def capture(fn, dev: torch.device, pool, warmups: int = 1):
    """(graph, fn()'s output): fn run `warmups` times on a side stream (where fused.py's regions
    compile, outside any capture), then captured as a CUDA graph in memory pool `pool`. Where fn
    is a decode step, warm-up and capture write K/V at the next position's slot, outside what the
    cache counts; the first real step writes that slot again before anything reads it."""
    if not _announced:
        _announce()
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def _stack_experts(ff) -> tuple:
    """(rows_of, shared) for MoE layer `ff`: rows_of(sel [R], x [R, D]) -> [R, D], row r through
    expert sel[r] (int64, on the device); `shared` the shared expert's index in the stacks, or -1
    where it is not stacked with the routed ones (then the caller runs it)."""
    from quant.modules import QuantizedExperts

    experts = ff.experts
    if isinstance(experts, QuantizedExperts):
        from quant.kernels import int4_matmul

        stacks = experts.stacks(extra=ff.shared_expert)
        shared = experts.num_experts if experts.stacked_extra else -1
        first = experts.experts[0].gate_proj
        path, group = first.path, first.group_size
        if path == "triton":  # each row reads its expert's weights in place: two launches in all
            from quant.triton_experts import experts_gemv

            w = {p: (b["packed"], b["scales_and_zeros"]) for p, b in stacks.items()}

            def rows_triton(sel: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
                h = experts_gemv(x, sel, *w["gate_proj"], group, up=w["up_proj"])
                return experts_gemv(h, sel, *w["down_proj"], group)

            return rows_triton, shared

        def lin(p: str, e: torch.Tensor, a: torch.Tensor) -> torch.Tensor:  # gathers expert e's weights (a copy)
            return int4_matmul(path, group, a, {n: t.index_select(0, e)[0] for n, t in stacks[p].items()})

        def rows_gathered(sel: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            out = []
            for r in range(x.shape[0]):
                e, xr = sel[r : r + 1], x[r : r + 1]
                out.append(lin("down_proj", e, fused.silu_mul(lin("gate_proj", e, xr), lin("up_proj", e, xr))))
            return torch.cat(out)

        return rows_gathered, shared

    def rows_dense(sel: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # model.Experts: [E, D, 2I], [E, I, D]
        out = []
        for r in range(x.shape[0]):
            e = sel[r : r + 1]
            gate, up = matmul(x[r : r + 1], experts.gate_up_proj.index_select(0, e)[0]).chunk(2, dim=-1)
            out.append(matmul(fused.silu_mul(gate, up), experts.down_proj.index_select(0, e)[0]))
        return torch.cat(out)

    return rows_dense, -1


class CudaGraphDecode:
    """StaticDecode.step captured as CUDA graphs, one per span of KV slots it reads (captured when
    a position first needs it); `__call__(token)` replays the one for the cache's next position
    and advances the cache."""

    def __init__(self, static: StaticDecode):
        dev = static.k[0].device
        if dev.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA model")
        self.static, self.dev = static, dev
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        # One memory pool for every span's graph: one replays at a time, and what a replay leaves
        # for its caller (the logits) is read before the next replay.
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture(static.span_for(static.position))

    def _capture(self, span: int) -> None:
        self.pos.fill_(self.static.position)
        self.graphs[span] = capture(lambda: self.static.step(self.token, self.pos, span), self.dev, self.pool, 2)

    def __call__(self, token: int) -> torch.Tensor:
        """Logits [1, V] (a buffer a later call overwrites) for `token` at the next position."""
        at = self.static.position
        span = self.static.span_for(at)
        if span not in self.graphs:
            self._capture(span)
        graph, logits = self.graphs[span]
        self.pos.fill_(at)
        self.token.fill_(token)
        graph.replay()
        self.static.advance()
        return logits


def eager_static(static: StaticDecode):
    """The static step run as it is (no graph): `(token) -> logits [1, V]`, advancing the cache."""
    dev = static.k[0].device

    def step(token: int) -> torch.Tensor:
        at = static.position
        logits = static.step(torch.tensor([token], device=dev), torch.tensor([at], device=dev), static.span_for(at))
        static.advance()
        return logits

    return step


MODES = ("auto", "eager", "static", "graph")


def decode_mode() -> str:
    """LLAMA4_LOCAL_DECODE: "auto" (the default: "graph" where the model is on CUDA with every
    expert resident, else "eager"), "eager" (the model's own forward per token), "static"
    (StaticDecode steps as they are) or "graph" (replayed as a CUDA graph where the model is on
    CUDA, else as "static"). With an expert cache, "static" and "graph" are piecewise_decode's
    steps (graphs for the attention halves only)."""
    import os

    mode = os.environ.get("LLAMA4_LOCAL_DECODE", "auto")
    if mode not in MODES:
        raise UserError(f"LLAMA4_LOCAL_DECODE must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


def stepper(model, cache: KVCache, mode: str | None = None):
    """A `(token) -> logits [1, V]` decode step on `cache` in `mode` (default: decode_mode()), or
    None for the eager forward (that mode, or "auto" off CUDA or with an expert cache). A model
    with an expert cache takes piecewise_decode's steps in "static" and "graph". A static
    stepper is kept on the cache and reused by later turns on it. In "auto", a graph that fails to build
    (a compiler missing on this machine, say) warns once and leaves the eager forward."""
    mode = mode or decode_mode()
    cuda = model.device.type == "cuda"
    offloaded = model.offload is not None
    if mode == "eager" or (mode == "auto" and (offloaded or not cuda)):
        return None
    graph = mode in ("graph", "auto") and cuda
    kept = cache.decoder
    if kept is not None and kept[0] is model and kept[1] == graph:
        return kept[2]

    def build():
        if offloaded:  # attention halves static (graphs on CUDA), MoE halves through the expert cache
            from .piecewise_decode import PiecewiseDecode

            return PiecewiseDecode(model, cache, graphs=graph)
        static = StaticDecode(model, cache)
        return CudaGraphDecode(static) if graph else eager_static(static)

    try:
        step = build()
    except Exception as e:  # noqa: BLE001 - any failure to capture: fall back in auto
        if mode != "auto":
            raise
        print(f"warning: CUDA-graph decode unavailable ({type(e).__name__}: {e}); decoding eagerly", file=sys.stderr)
        step = None
    cache.decoder = (model, graph, step)
    return step


_announced = False


def _announce() -> None:
    """Say once per process why the first decode step waits (inductor compiles fused.py's regions)."""
    global _announced
    _announced = True
    if fused._wanted(torch.empty(0, device="cuda")):
        sys.stderr.write("llama4-local: compiling the CUDA decode step (once per process, seconds to a minute)\n")


def greedy_static(
    model, prompt: torch.Tensor, n: int, graph: bool | None = None, feed: list[int] | None = None
) -> tuple[list[int], torch.Tensor]:
    """Eager prefill of `prompt` [T], then `n` greedy tokens (or `feed`'s) by static decode steps,
    replayed as a CUDA graph on CUDA unless `graph` is False: (tokens fed, logits after each [n, V])."""
    dev = model.device
    cache = model.new_cache(prompt.shape[0] + n)
    logits = model(prompt.to(dev), cache)
    use_graph = dev.type == "cuda" if graph is None else graph
    step = stepper(model, cache, "graph" if use_graph else "static")
    tokens, out = [], []
    for i in range(n):
        tok = int(logits[-1].argmax()) if feed is None else feed[i]
        tokens.append(tok)
        logits = step(tok).clone()
        out.append(logits)
    return tokens, torch.cat(out)
