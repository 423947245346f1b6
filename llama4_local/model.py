"""The Llama 4 text decoder, computing what transformers' Llama4ForCausalLM computes.

Shape legend: T new tokens, S key positions, D hidden, H query heads, KV key/value heads,
hd head dim, E routed experts, I expert intermediate size, V vocabulary.

One sequence at a time (a local runner serves one conversation), so activations are [T, D].
Module names follow the Hugging Face checkpoint (`q_proj`, `router`, `shared_expert`,
`experts.gate_up_proj`) so loading is a prefix strip (see checkpoint.py).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_decode
from .config import TextConfig
from .errors import UserError
from .kv_cache import KVCache


def _weight(*shape: int) -> nn.Parameter:
    """A parameter on the meta device: no memory until the loader assigns the checkpoint tensor."""
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


_LOW_PRECISION = (torch.bfloat16, torch.float16)
_UPCAST_ROWS = 8


def _cpu_low_precision(x: torch.Tensor, w: torch.Tensor) -> bool:
    return x.device.type == "cpu" and w.dtype in _LOW_PRECISION


def _rows_mv(x: torch.Tensor, w_out_in: torch.Tensor) -> torch.Tensor:
    kernel = _half_kernel()
    k = w_out_in.shape[1]
    if kernel is not None and x.shape[0] <= kernel.HALF_MAX_ROWS and k % 16 == 0 and w_out_in.is_contiguous():
        return kernel.half_mv(x, w_out_in)
    return torch.stack([torch.mv(w_out_in, row) for row in x])


@functools.cache
def _half_kernel():
    """quant.cpu_kernel when its AVX2 build is available (a bf16/fp16 matvec at memory speed), else None."""
    from quant import cpu_kernel

    return cpu_kernel if cpu_kernel.available() else None


# CPUs without bf16/fp16 matrix units are slow at low-precision GEMM, and pathologically slow
# at a bf16 vector times an [in, out] matrix (0.25 GB/s against 6 GB/s for torch.mv on the
# transposed view, on a 2-core AVX2 machine). So on the CPU, in bf16/fp16: a few rows go
# through torch.mv; from _UPCAST_ROWS rows on, the product runs in float32 and is rounded back
# (76 ms against 18 ms for 128 x 1024 x 2048), the same products the reference rounds. Where
# the CPU has bf16 dot products (AVX512-BF16, AMX) a bf16 GEMM runs natively instead: float32
# accumulation, one rounding of the output, as before, at 3-6x the speed of widening the weight.


def native_low_precision(dtype: torch.dtype) -> bool:
    """Whether CPU products in `dtype` run as they are rather than widened to float32: bf16 where
    the CPU has bf16 dot products (quant.cpu_kernel.native_bf16)."""
    from quant import cpu_kernel

    return dtype == torch.bfloat16 and cpu_kernel.native_bf16()


def _native(x: torch.Tensor, w: torch.Tensor) -> bool:
    return x.dtype == w.dtype and native_low_precision(w.dtype)


# Widened a cache-sized chunk of the weight at a time (float32 bytes): widening a whole bf16
# matrix wrote and re-read a float32 copy twice its size, and the SGEMM ran at 61-63 GFLOP/s on
# Scout's 8192 x 5120 products for 128 rows (two Zen 3 threads), 117-130 in 8 MB chunks.
WIDEN_CHUNK_BYTES = 8 << 20


def _widened_linear(x: torch.Tensor, w: torch.Tensor, in_out: bool = False) -> torch.Tensor:
    """x [T, in] @ w^T (w [out, in]; or x @ w for w [in, out] with in_out) in float32 SGEMMs over
    chunks of the outputs, each chunk's weights widened just before (the same products as
    widening all of w first); the result in x's dtype."""
    xf = x.float()
    n_in, n_out = (w.shape[0], w.shape[1]) if in_out else (w.shape[1], w.shape[0])
    step = max(16, WIDEN_CHUNK_BYTES // (4 * n_in))
    out = torch.empty(x.shape[0], n_out, dtype=x.dtype, device=x.device)
    for c in range(0, n_out, step):
        part = xf @ w[:, c : c + step].float() if in_out else F.linear(xf, w[c : c + step].float())
        out[:, c : c + step] = part  # rounded to x's dtype here
    return out


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ w [out, in]^T."""
    if _cpu_low_precision(x, w):
        if x.shape[0] < _UPCAST_ROWS:
            return _rows_mv(x, w)
        if not _native(x, w):
            return _widened_linear(x, w)
    return F.linear(x, w)


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ w [in, out] (the fused expert layout)."""
    if _cpu_low_precision(x, w):
        if x.shape[0] < _UPCAST_ROWS:
            kernel = _half_kernel()
            if kernel is not None and x.shape[0] <= kernel.HALF_MAX_ROWS and w.is_contiguous():
                return kernel.half_vm(x, w)  # streams the layout as stored (torch.mv on w.t(): half speed)
            return _rows_mv(x, w.t())
        if not _native(x, w):
            return _widened_linear(x, w, in_out=True)
    return x @ w


class Linear(nn.Module):
    """nn.Linear without bias or initialisation (weights always come from the checkpoint)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = _weight(d_out, d_in)

    def forward(self, x):
        return linear(x, self.weight)


def rms_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """x / rms(x) over the last dimension, in float32, cast back, as the reference does; then
    times `weight` (in x's dtype). On the CPU one call to quant/glue_kernel.py instead of 7-8 torch
    operations (same roundings; only the order of the sum of squares differs)."""
    if _glue_kernel(x) and (weight is None or weight.dtype == x.dtype):
        return _half_kernel().rms_norm(x, weight, eps)
    return rms_norm_torch(x, eps, weight)


def rms_norm_torch(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """rms_norm in torch operations alone (what GPUs run, and what torch.compile traces)."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
    return y if weight is None else y * weight


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's silu(gate) * up (silu rounded to the dtype first, as torch computes it)."""
    if _glue_kernel(gate) and up.dtype == gate.dtype and up.shape == gate.shape:
        return _half_kernel().silu_mul(gate, up)
    return F.silu(gate) * up


def _glue_kernel(x: torch.Tensor) -> bool:
    """Whether quant.cpu_kernel's kernels for a CPU tensor in bf16 or float32 can serve x."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) and _half_kernel() is not None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = _weight(dim)

    def forward(self, x):
        return rms_norm(x, self.eps, self.weight)


def rope_inv_freq(cfg: TextConfig) -> torch.Tensor:
    """Inverse frequencies [hd/2] in float32, with llama3 scaling when configured.

    llama3 scaling divides the frequencies of long wavelengths by `factor` and keeps the short
    ones, blending in between. Scout sets low = high = 1, so the blend band is empty: the split
    is sharp at wavelength original_max.
    """
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    if s.high_freq_factor != s.low_freq_factor:
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        blended = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        scaled = torch.where(medium, blended, scaled)
    return scaled


def rope_freqs(inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Complex rotations e^{i pos theta} [T, hd/2] (complex64), as the reference builds them."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of x [T, heads, hd] as complex numbers."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs[:, None, :]).flatten(2).type_as(x)


def one_query_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v for one query position, q [H, 1, hd] against keys and values
    [KV, S, hd] (head i reads KV head i // (H / KV), as SDPA's enable_gqa), as the reference's eager
    attention computes it: two batched products in the inputs' dtype (float32 accumulation), the
    softmax in float32, its probabilities rounded to that dtype. On the CPU our kernel computes the
    same steps (quant/attn_kernel.py, see _attention_kernel), reading a bf16 cache as it is; the
    torch form below serves the rest (GPUs, fp16, no built kernel). Torch's SDPA was slower than
    it on the CPU (60 against 44 us at 50 keys, float32, one Zen 4 thread; 27.6 against 11.8 ms
    at 8000), and widening a bf16 cache every step slower still (the Scout-width slice decoded
    13.1 tok/s after a 4000-token prompt on two threads, against 22-26 read as is)."""
    h, _, hd = q.shape
    kv = keys.shape[0]
    if _attention_kernel(q, keys, values):
        return _half_kernel().attend_one(q, keys, values)
    scores = torch.bmm(q.reshape(kv, h // kv, hd), keys.transpose(1, 2)) * hd**-0.5  # [KV, H/KV, S]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.bmm(probs, values).reshape(h, 1, hd)


def _attention_kernel(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether quant/attn_kernel.py serves this one-query attention: on the CPU, bf16 or float32,
    head dim a multiple of 16, rows of keys and values contiguous. torch.bmm sends bf16 to oneDNN,
    which compiles a kernel for every new number of keys (one more each token): 1.3-1.9 ms in
    every decode step's first layer and ~250 us in each other one on the Scout-width slice (two
    Zen 4 threads), where the kernel takes ~20 us; float32 bmm has no such cost but widening a
    bf16 cache to float32 every step does."""
    return (
        _glue_kernel(q)
        and keys.dtype == values.dtype == q.dtype
        and q.shape[-1] % 16 == 0
        and keys.stride(-1) == 1
        and values.stride(-1) == 1
        and keys.shape[1] > 0
    )


SCORE_KEYS = 8192  # keys a prefill piece's queries attend in one SDPA call (offload.plan reserves their scores)


def _expand_kv() -> bool:
    """LLAMA4_LOCAL_SDPA_EXPAND=1: a prefill piece's attention with K/V repeated per query head
    instead of SDPA's grouped heads (a knob for a GPU session to time: bench_graph_decode.py)."""
    return os.environ.get("LLAMA4_LOCAL_SDPA_EXPAND") == "1"


def _sdpa_backends(device: torch.device):
    """SDPA without cuDNN's backend on CUDA: torch 2.11 picks cuDNN on Hopper, which builds an
    execution plan for every new query and key count (a one-query decode step spent 80 ms of host
    time in it across Scout's 48 layers on an H200, the key count one longer each token; so did
    every prefill chunk of a new length). The flash and memory-efficient kernels need no plan."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = h, kv, hd
        self.use_rope = cfg.rope_layers[layer]
        self.qk_norm = cfg.use_qk_norm and self.use_rope
        self.temperature_tuning = cfg.attn_temperature_tuning and not self.use_rope
        self.chunk = cfg.attention_chunk_size if cfg.chunked_layers[layer] else None
        self.eps = cfg.rms_norm_eps
        self.floor_scale, self.attn_scale = cfg.floor_scale, cfg.attn_scale
        self.q_proj = Linear(d, h * hd)
        self.k_proj = Linear(d, kv * hd)
        self.v_proj = Linear(d, kv * hd)
        self.o_proj = Linear(h * hd, d)

    def forward(self, x: torch.Tensor, pos0: int, freqs: torch.Tensor, cache) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.n_heads, self.head_dim)  # [T, H, hd]
        k = self.k_proj(x).view(t, self.n_kv, self.head_dim)  # [T, KV, hd]
        v = self.v_proj(x).view(t, self.n_kv, self.head_dim)
        if self.use_rope:
            q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        if self.qk_norm:  # L2 norm without weight, after RoPE
            q, k = rms_norm(q, self.eps), rms_norm(k, self.eps)
        if self.temperature_tuning:
            # Longer contexts flatten attention; NoPE layers sharpen queries by
            # log(floor((pos+1)/floor_scale) + 1) * attn_scale + 1 (exactly 1 early on).
            pos = torch.arange(pos0, pos0 + t, device=x.device).float()
            scale = torch.log1p(torch.floor((pos + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            q = (q * scale[:, None, None]).to(q.dtype)
        q = q.transpose(0, 1)  # [H, T, hd]
        keys, values, first = cache.update(pos0, k.transpose(0, 1), v.transpose(0, 1))  # [KV, S, hd]
        mask = None
        if t > 1:
            qpos = torch.arange(pos0, pos0 + t, device=x.device)[:, None]
            kpos = torch.arange(first, first + keys.shape[1], device=x.device)[None, :]
            mask = kpos <= qpos  # [T, S]
            if self.chunk:
                mask &= (kpos // self.chunk) == (qpos // self.chunk)
        qkv = (q, keys, values)
        if t == 1:
            if _cpu_low_precision(q, keys) and not native_low_precision(keys.dtype) and not _attention_kernel(*qkv):
                # Without bf16 dot products one bf16 query takes a CPU path 7-9x slower than
                # float32's (950 against 126 us at 160 keys, one thread): attend in float32.
                qkv = tuple(a.float() for a in qkv)
            out = one_query_attention(*qkv)  # [H, 1, hd]
        else:
            out = self._attend(q, keys, values, mask)
        return self.o_proj(out.transpose(0, 1).reshape(t, -1).to(x.dtype))

    def _attend(self, q, keys, values, mask) -> torch.Tensor:
        """SDPA of queries q [H, T, hd] on keys and values [KV, S, hd] under mask [T, S]: [H, T, hd].
        Beyond SCORE_KEYS keys (a NoPE layer deep into a long context) the queries go a few at a
        time, so that scores a backend materializes (CUDA's math one takes a mask with grouped
        heads: [H, T, S]) stay within what offload.plan reserves for a prefill piece, T x
        SCORE_KEYS a head: 128k tokens in would otherwise need 10 GB for one 512-token piece."""
        step = q.shape[1] if keys.shape[1] <= SCORE_KEYS else max(1, q.shape[1] * SCORE_KEYS // keys.shape[1])
        gqa = self.n_kv != self.n_heads
        if gqa and _expand_kv():  # every query head its own K/V copy: CUDA's memory-efficient kernel then
            # takes the mask (no scores materialized) for [H, S, hd] twice; not yet timed on a GPU
            keys, values = (a.repeat_interleave(self.n_heads // self.n_kv, dim=0) for a in (keys, values))
            gqa = False
        outs = []
        with _sdpa_backends(q.device):
            for i in range(0, q.shape[1], step):
                qi, mi = q[None, :, i : i + step], mask[i : i + step]
                out = F.scaled_dot_product_attention(qi, keys[None], values[None], attn_mask=mi, enable_gqa=gqa)
                outs.append(out[0])
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); the shared expert and the dense layers."""

    def __init__(self, d: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(d, inter)
        self.up_proj = Linear(d, inter)
        self.down_proj = Linear(inter, d)

    def forward(self, x):
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class Experts(nn.Module):
    """The routed experts as the checkpoint stores them, fused: [E, D, 2I] and [E, I, D]."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        e, d, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = _weight(e, d, 2 * i)
        self.down_proj = _weight(e, i, d)

    def act(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """What expert e's down projection sees for its tokens x [N, D]: silu(gate) * up [N, I]."""
        gate, up = matmul(x, self.gate_up_proj[e]).chunk(2, dim=-1)  # [N, I] each
        return silu_mul(gate, up)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens x [N, D] -> [N, D]."""
        return matmul(self.act(e, x), self.down_proj[e])

    def run(self, groups: list[tuple[int, torch.Tensor]], overlap=None) -> list[torch.Tensor]:
        """Each (expert, its tokens) group's output, in order. Offloaded experts reorder inside
        and call `overlap` (other work of the layer) where it overlaps their CPU misses; here
        it runs first."""
        if overlap is not None:
            overlap()
        return [self.expert(e, x) for e, x in groups]


def top_k_scores(logits: torch.Tensor, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A router's top-k experts [T, k] for its logits [T, E] and their sigmoid scores [T, k] in
    `dtype`, as the reference."""
    top, idx = torch.topk(logits, k, dim=1)
    return idx, torch.sigmoid(top.float()).to(dtype)


class MoE(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int = 0):
        super().__init__()
        self.layer, self.top_k, self.num_experts = layer, cfg.top_k, cfg.num_experts
        self.observer = None  # called with (layer, expert ids [T, k]); e.g. a routing recorder
        self.router = Linear(cfg.hidden_size, cfg.num_experts)
        self.experts = Experts(cfg)
        self.shared_expert = MLP(cfg.hidden_size, cfg.intermediate_size)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts [T, k] and their sigmoid scores [T, k], in x's dtype as the reference."""
        return top_k_scores(self.router(x), self.top_k, x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx, scores = self.route(x)
        if self.observer is not None:
            self.observer(self.layer, idx)
        # As the reference, the k routed outputs are summed first (float32, one rounding), then
        # added to the shared expert's: adding them one by one rounds k times in bf16.
        if x.shape[0] == 1:  # decode: no grouping needed; k experts for the one token
            shared = []  # queued by the experts where it overlaps an offloaded layer's CPU misses
            groups = [(e, x * scores[:, j : j + 1]) for j, e in enumerate(idx[0].tolist())]
            ys = list(self.experts.run(groups, overlap=lambda: shared.append(self.shared_expert(x))))
            return shared[0].add_(ys[0] if len(ys) == 1 else torch.stack(ys).sum(0))
        out = self.shared_expert(x)
        fused = getattr(self.experts, "fused", None)  # grouped kernels, no host sync (Triton INT4)
        y = fused(x, idx, scores) if fused is not None else None
        if y is not None:
            return out + y
        # Group the (token, slot) pairs by expert so each selected expert runs once on all its
        # tokens; experts nobody chose are never touched.
        flat = idx.flatten()  # [T*k]
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = order // self.top_k
        weights = scores.flatten()[order][:, None]
        groups, sels = [], []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sel = tokens[start : start + n]
            # The router score scales the expert's input, not its output.
            groups.append((e, x[sel] * weights[start : start + n]))
            sels.append(sel)
            start += n
        if self.top_k > 1:  # each token's k outputs summed in float32, then rounded once
            routed = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            for sel, y in zip(sels, self.experts.run(groups), strict=True):
                routed.index_add_(0, sel, y.float())
            return out.add_(routed.to(out.dtype))
        for sel, y in zip(sels, self.experts.run(groups), strict=True):
            if sel.shape[0] == x.shape[0]:
                out += y  # every token chose this expert: sel is 0..T-1 in order
            else:
                out.index_add_(0, sel, y)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.is_moe = cfg.moe_layers[layer]
        self.feed_forward = MoE(cfg, layer) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size_mlp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, pos0, freqs, cache):
        if x.shape[0] == 1 and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            fast = cpu_decode.plan(self)  # the whole layer in one C++ call, same arithmetic
            if fast is not None:
                return cpu_decode.run(fast, x, pos0, freqs, cache)
        h = x + self.self_attn(self.input_layernorm(x), pos0, freqs, cache)
        return h + self.feed_forward(self.post_attention_layernorm(h))


class Llama4Text(nn.Module):
    """Embeddings, decoder layers, final norm and the (untied) lm_head.

    Built on the meta device (see `_weight`); `loader.load_weights` fills in every tensor.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = _weight(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.register_buffer("inv_freq", rope_inv_freq(cfg).to("meta"), persistent=False)
        self.offload = None  # an offload manager: told before each layer runs (to prefetch)
        self.vision = None  # vision.Vision when the checkpoint's vision tower is loaded
        self.image_token_id: int | None = None  # <|patch|>: where image features go

    @property
    def device(self) -> torch.device:
        """Where the model computes: the embeddings may lie elsewhere (host RAM, beside an expert
        cache on a GPU: loader.load_model)."""
        return self.norm.weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of ids [T] as [T, D] on ids' device, looked up where the table lies."""
        w = self.embed_tokens.weight
        if ids.device == w.device:
            return F.embedding(ids, w)
        return F.embedding(ids.to(w.device), w).to(ids.device)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image tiles [N, 3, S, S] -> features [N * tokens_per_tile, hidden] for the <|patch|> positions."""
        if self.vision is None:
            raise UserError("this model was loaded without its vision tower; it cannot read images")
        return self.vision(pixels).to(self.embed_tokens.weight.dtype)

    def new_cache(self, max_len: int, keep_previous: bool = False) -> KVCache:
        """An empty cache; `keep_previous` lets it be rewound into the chunk before the current one."""
        return KVCache(self.cfg, max_len, self.embed_tokens.weight.dtype, self.device, keep_previous)

    @torch.inference_mode()
    def forward(
        self, ids: torch.Tensor, cache: KVCache, last_only: bool = True, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run ids [T] at the positions following the cache; logits [1 or T, V] in float32.

        `image_features` [n, D] replace the embeddings of the n <|patch|> tokens among ids, in order.
        """
        pos0 = cache.length
        x = self.embed(ids)  # [T, D]
        if image_features is not None:
            mask = ids == self.image_token_id
            if int(mask.sum()) != image_features.shape[0]:
                raise ValueError(f"{int(mask.sum())} image token(s) for {image_features.shape[0]} feature rows")
            x[mask] = image_features.to(device=x.device, dtype=x.dtype)
        positions = torch.arange(pos0, pos0 + ids.shape[0], device=ids.device)
        freqs = rope_freqs(self.inv_freq, positions)  # [T, hd/2]
        for i, (layer, kv) in enumerate(zip(self.layers, cache.layers, strict=True)):
            if self.offload is not None:
                self.offload.before_layer(i, x)
            x = layer(x, pos0, freqs, kv)
        if last_only:
            x = x[-1:]
        return self.lm_head(self.norm(x)).float()
