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
  The Triton GEMV (LLAMA4_LOCAL_CUDA_INT4=triton) reads the chosen expert in place; other paths
  gather its buffers by `index_select` (a copy of the expert per token: about 6 GB of traffic per
  Scout token, ~1.6 ms on an H200's bandwidth).

So one step is a fixed sequence of kernels, which `CudaGraphDecode` captures once and replays
per token. Only models with every expert resident (no offload manager) qualify. On the CPU the
same step runs eagerly: that is how tests prove it equals the eager model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import UserError
from .kv_cache import KVCache
from .model import apply_rope, matmul, rms_norm, rope_freqs, silu_mul


class StaticDecode:
    """One-token decode steps for `model` that write into an eager KVCache's own buffers.

    The cache's buffers are grown once to their limit (its NoPE layers' `max_len` slots, its
    chunked layers' min(chunk, max_len)) and zeroed past what they hold, so their addresses
    never change again; each step writes its K and V at the slot the eager ChunkedKV or FullKV
    would use, and `advance` moves the cache's counters, so eager prefills and static steps can
    take turns on one cache (a chat's next turn, a server's reuse)."""

    def __init__(self, model, cache: KVCache):
        if model.offload is not None:
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
        self.slots = {c: torch.arange(c, device=model.embed_tokens.weight.device) for c in set(self.caps)}
        # (QuantizedExperts.stacks() stacks once per model, whatever number of caches it serves)
        self.experts = {
            i: _stack_experts(layer.feed_forward.experts) for i, layer in enumerate(model.layers) if layer.is_moe
        }

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
    def step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits [1, V] (float32) for `token` [1] at position `pos` [1] (both int64, on the device)."""
        m = self.model
        x = F.embedding(token, m.embed_tokens.weight)
        freqs = rope_freqs(m.inv_freq, pos)
        for i, layer in enumerate(m.layers):
            h = x + self._attention(i, layer.self_attn, layer.input_layernorm(x), pos, freqs)
            y = layer.post_attention_layernorm(h)
            x = h + (self._moe(i, layer.feed_forward, y) if layer.is_moe else layer.feed_forward(y))
        return m.lm_head(m.norm(x)).float()

    def _attention(self, i: int, attn, x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        h, kv, hd = attn.n_heads, attn.n_kv, attn.head_dim
        q = attn.q_proj(x).view(1, h, hd)
        k = attn.k_proj(x).view(1, kv, hd)
        v = attn.v_proj(x).view(1, kv, hd)
        if attn.use_rope:
            q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        if attn.qk_norm:
            q, k = rms_norm(q, attn.eps), rms_norm(k, attn.eps)
        if attn.temperature_tuning:
            scale = torch.log1p(torch.floor((pos.float() + 1.0) / attn.floor_scale)) * attn.attn_scale + 1.0
            q = (q * scale[:, None, None]).to(q.dtype)
        cap = self.caps[i]
        slot = pos % cap  # full layers: cap = max_len > pos, so the slot is the position
        keys, values = self.k[i], self.v[i]
        keys.index_copy_(1, slot, k.transpose(0, 1))
        values.index_copy_(1, slot, v.transpose(0, 1))
        visible = self.slots[cap] <= slot  # chunked: this chunk's slots so far; full: positions <= pos
        scores = torch.bmm(q.view(kv, h // kv, hd), keys.transpose(1, 2)) * hd**-0.5  # [KV, H/KV, S]
        scores = scores.masked_fill(~visible, -math.inf)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        out = torch.bmm(probs, values).reshape(1, h * hd)
        return attn.o_proj(out.to(x.dtype))

    def _moe(self, i: int, ff, x: torch.Tensor) -> torch.Tensor:
        idx, scores = ff.route(x)  # [1, k] each, on the device
        out = ff.shared_expert(x)
        run = self.experts[i]
        for j in range(ff.top_k):  # the router score scales the expert's input, as in MoE.forward
            out = out + run(idx[0, j : j + 1], x * scores[:, j : j + 1])
        return out


def _stack_experts(experts):
    """A function (expert index [1], x [1, D]) -> expert(x), gathering the expert's weights."""
    from quant.modules import QuantizedExperts

    if isinstance(experts, QuantizedExperts):
        from quant.kernels import int4_matmul

        stacks = experts.stacks()
        first = experts.experts[0]
        projs = {p: (getattr(first, p).path, getattr(first, p).group_size, stacks[p]) for p in stacks}

        def linear(p: str, e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            path, group, stacked = projs[p]
            if path == "triton":  # reads expert e's weights in place: no gathered copy
                from quant.triton_int4 import int4_gemv

                return int4_gemv(x, stacked["packed"], stacked["scales_and_zeros"], group, expert=e)
            return int4_matmul(path, group, x, {n: t.index_select(0, e)[0] for n, t in stacked.items()})

        def run(e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return linear("down_proj", e, silu_mul(linear("gate_proj", e, x), linear("up_proj", e, x)))

        return run

    def run_dense(e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # model.Experts: [E, D, 2I], [E, I, D]
        gate, up = matmul(x, experts.gate_up_proj.index_select(0, e)[0]).chunk(2, dim=-1)
        return matmul(silu_mul(gate, up), experts.down_proj.index_select(0, e)[0])

    return run_dense


class CudaGraphDecode:
    """StaticDecode.step captured once as a CUDA graph; `__call__(token)` replays it at the
    cache's next position and advances the cache."""

    def __init__(self, static: StaticDecode):
        dev = static.k[0].device
        if dev.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA model")
        self.static = static
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        # Warm-up and capture write K/V at the next position's slot, outside what the cache
        # counts; the first real step writes that slot again before anything reads it.
        self.pos = torch.full((1,), static.position, dtype=torch.long, device=dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                static.step(self.token, self.pos)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = static.step(self.token, self.pos)

    def __call__(self, token: int) -> torch.Tensor:
        """Logits [1, V] (a buffer the next call overwrites) for `token` at the next position."""
        self.pos.fill_(self.static.position)
        self.token.fill_(token)
        self.graph.replay()
        self.static.advance()
        return self.logits


def eager_static(static: StaticDecode):
    """The static step run as it is (no graph): `(token) -> logits [1, V]`, advancing the cache."""
    dev = static.k[0].device

    def step(token: int) -> torch.Tensor:
        logits = static.step(torch.tensor([token], device=dev), torch.tensor([static.position], device=dev))
        static.advance()
        return logits

    return step


MODES = ("eager", "static", "graph")


def decode_mode() -> str:
    """LLAMA4_LOCAL_DECODE: "eager" (default: the model's own forward per token), "static"
    (StaticDecode steps as they are) or "graph" (replayed as a CUDA graph where the model is on
    CUDA, else as "static"). Opt-in until measured on a GPU."""
    import os

    mode = os.environ.get("LLAMA4_LOCAL_DECODE", "eager")
    if mode not in MODES:
        raise UserError(f"LLAMA4_LOCAL_DECODE must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


def stepper(model, cache: KVCache, mode: str | None = None):
    """A `(token) -> logits [1, V]` decode step on `cache` in `mode` (default: decode_mode()), or
    None for the eager forward (that mode, or a model with an expert cache). A static stepper is
    kept on the cache and reused by later turns on it."""
    mode = mode or decode_mode()
    if mode == "eager" or model.offload is not None:
        return None
    graph = mode == "graph" and model.embed_tokens.weight.device.type == "cuda"
    kept = cache.decoder
    if kept is not None and kept[0] is model and kept[1] == graph:
        return kept[2]
    static = StaticDecode(model, cache)
    step = CudaGraphDecode(static) if graph else eager_static(static)
    cache.decoder = (model, graph, step)
    return step


def greedy_static(
    model, prompt: torch.Tensor, n: int, graph: bool | None = None, feed: list[int] | None = None
) -> tuple[list[int], torch.Tensor]:
    """Eager prefill of `prompt` [T], then `n` greedy tokens (or `feed`'s) by static decode steps,
    replayed as a CUDA graph on CUDA unless `graph` is False: (tokens fed, logits after each [n, V])."""
    dev = model.embed_tokens.weight.device
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
