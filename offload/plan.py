"""The memory plan: what goes on the GPU, and how many expert slots the rest buys.

Everything but the routed experts (embeddings, attention, norms, routers, shared experts, dense
MLPs, lm_head) lives on the device, with the KV cache for the requested context and a
workspace for activations. What is left of the budget becomes expert-cache slots of one
expert block each. Where not every expert fits, the token embeddings (Scout's: 1.93 GiB, read
one row a token) stay in host RAM instead, as llama.cpp keeps them, and so do the vision
tower's blocks (1.5 GiB, copied in one at a time when an image comes), and the lm_head is read
in Q6 where the checkpoint has its blocks (0.78 GiB against 1.93): some 30, 23 and 18 more
slots at Scout's size. Sizes are computed from the config and the quantization scheme, in the
layout the device kernels use (INT4: half a byte per weight plus a bf16 scale and offset per
group and row), so the plan can be made, printed and tested without any weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from llama4_local.config import TextConfig
from llama4_local.errors import UserError
from llama4_local.model import SCORE_KEYS

GiB = 1 << 30
MiB = 1 << 20
DEFAULT_MARGIN = 1 * GiB  # left free for the CUDA context, allocator slack and other processes
WORKSPACE_FIXED = 256 * MiB
# Host RAM left free when the expert store's size comes from what is available (no --host-memory):
# the OS, this process's own (CUDA context, torch, Python) and a page cache for the experts read
# from the checkpoint; 3 GiB and 5% of what is available.
HOST_RESERVE = 3 * GiB
HOST_RESERVE_SHARE = 0.05


def host_budget_from(needed: int, available: int) -> int | None:
    """Host RAM for expert blocks when --host-memory is not given: None (hold every expert) where
    `needed` bytes fit in `available` (MemAvailable; 0: unknown, no bound) less the reserve, else
    that much (at least 0), the experts beyond it read from the checkpoint's mapped files when
    chosen: holding all of Scout's (48 GiB) on a 32 GB machine would fail to pin or drive it
    into swap."""
    if available <= 0:
        return None
    room = int(available - HOST_RESERVE - HOST_RESERVE_SHARE * available)
    return None if needed <= room else max(0, room)


@dataclass(frozen=True)
class Quantized:
    """Which parts are INT4, and the group size (None: a bf16/fp16 checkpoint)."""

    group_size: int = 128
    experts: bool = True
    shared: bool = True
    attention: bool = False
    kind: str = "int4"  # "nf4": a float32 absmax per block instead of a bf16 scale and offset; or "fp8"
    mlp: bool = False  # the dense MLPs of layers without experts (Maverick)


def linear_bytes(n_out: int, n_in: int, elt: int, q: Quantized | None, quantized: bool) -> int:
    if q is None or not quantized:
        return n_out * n_in * elt
    if q.kind == "fp8":
        return n_out * n_in + n_out * 2  # a byte per weight + a bf16 scale per row (the published layout)
    groups = n_in // q.group_size
    if q.kind == "nf4":
        return n_out * n_in // 2 + groups * n_out * 4 + 16 * 4  # nibbles + float32 absmax + the levels
    return n_out * n_in // 2 + groups * n_out * 2 * 2  # nibbles + (scale, offset) in bf16


def expert_bytes(cfg: TextConfig, elt: int, q: Quantized | None) -> int:
    d, i = cfg.hidden_size, cfg.intermediate_size
    quant = q is not None and q.experts
    return 2 * linear_bytes(i, d, elt, q, quant) + linear_bytes(d, i, elt, q, quant)


def kv_bytes(cfg: TextConfig, context: int, elt: int) -> int:
    per_pos = 2 * cfg.num_kv_heads * cfg.head_dim * elt
    total = 0
    for chunked in cfg.chunked_layers:
        total += per_pos * (min(context, cfg.attention_chunk_size) if chunked else context)
    return total


def dense_parts(cfg: TextConfig, elt: int, q: Quantized | None) -> dict[str, int]:
    """Bytes of everything but the routed experts, by part."""
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    att_q = q is not None and q.attention
    sh_q = q is not None and q.shared
    mlp_q = q is not None and q.mlp
    parts = {"embeddings": cfg.vocab_size * d * elt, "lm_head": cfg.vocab_size * d * elt}
    attention = norms = routers = shared = mlp = 0
    for layer in range(cfg.num_layers):
        attention += 2 * linear_bytes(h * hd, d, elt, q, att_q) + 2 * linear_bytes(kv * hd, d, elt, q, att_q)
        norms += 2 * d * elt
        if cfg.moe_layers[layer]:
            routers += cfg.num_experts * d * elt
            shared += 3 * linear_bytes(cfg.intermediate_size, d, elt, q, sh_q)
        else:
            mlp += 3 * linear_bytes(cfg.intermediate_size_mlp, d, elt, q, mlp_q)
    parts.update(attention=attention, norms=norms + d * elt, routers=routers, shared_experts=shared, dense_mlp=mlp)
    return parts


def workspace_bytes(cfg: TextConfig, prefill_chunk: int, context: int) -> int:
    """Activations of one prefill piece, with room for attention scores if not fused (float32)."""
    d, i = cfg.hidden_size, max(cfg.intermediate_size, cfg.intermediate_size_mlp)
    act = prefill_chunk * (6 * d + 4 * i) * 4
    scores = cfg.num_heads * prefill_chunk * min(context, SCORE_KEYS) * 4  # model.Attention._attend bounds them
    return WORKSPACE_FIXED + act + scores + cfg.vocab_size * 4


@dataclass
class MemoryPlan:
    budget: int
    context: int
    dense: dict[str, int]
    kv_cache: int
    workspace: int
    expert_bytes: int
    experts_total: int
    slots: int
    host_budget: int | None
    host_experts: int
    host_from_available: bool = False  # host_budget came from the machine's available RAM
    host_dense: dict[str, int] = field(default_factory=dict)  # device bytes kept in host RAM instead, by part
    head_q6: bool = False  # the lm_head read in Q6 on the device (its sidecar), not as stored

    @property
    def dense_total(self) -> int:
        return sum(self.dense.values())

    @property
    def used(self) -> int:
        return self.dense_total + self.kv_cache + self.workspace + self.slots * self.expert_bytes

    @property
    def all_resident(self) -> bool:
        return self.slots >= self.experts_total

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(dense_total=self.dense_total, used=self.used, all_resident=self.all_resident)
        return d

    def rows(self) -> list[tuple[str, str, int]]:
        """(what, where, bytes) for printing."""
        label = {"lm_head": "lm head (Q6)"} if self.head_q6 else {}
        rows = [(label.get(name, name.replace("_", " ")), "gpu", n) for name, n in self.dense.items() if n]
        rows.append((f"KV cache ({self.context} tokens)", "gpu", self.kv_cache))
        rows.append(("workspace", "gpu", self.workspace))
        rows.append(
            (f"expert cache: {self.slots} of {self.experts_total} experts", "gpu", self.slots * self.expert_bytes)
        )
        why = {"embeddings": "embeddings (a row a token)", "vision blocks": "vision blocks (copied in per image)"}
        rows += [(why.get(name, name), "cpu", n) for name, n in self.host_dense.items()]
        if self.all_resident:
            return rows
        held = f"experts in host RAM: {self.host_experts}"
        if self.host_from_available:
            held += " (what this machine's available RAM holds)"
        rows.append((held, "cpu", self.host_experts * self.expert_bytes))
        cold = self.experts_total - self.host_experts
        if 0 < self.host_experts < self.experts_total:  # RAM holds none of the GPU's (cache.HostStore)
            cold = max(0, cold - self.slots)
        if cold:
            rows.append((f"experts read from disk on demand: {cold}", "disk", cold * self.expert_bytes))
        return rows


def plan_memory(
    cfg: TextConfig,
    budget: int,
    context: int,
    elt: int = 2,
    q: Quantized | None = None,
    prefill_chunk: int = 512,
    host_budget: int | None = None,
    vision: int = 0,
    available: int = 0,
    vision_host: int = 0,
    head_q6: int = 0,
) -> MemoryPlan:
    """Fit a model into `budget` bytes of device memory; UserError naming the minimum if it cannot.

    `vision`: bytes of the vision tower and its activations, when images will be read.
    `host_budget`: host RAM for expert blocks; None: every expert, or, given `available` (the
    machine's available RAM), as many as host_budget_from allows.
    `vision_host`: bytes of those the tower can leave in host RAM (its blocks, streamed in as
    they run: vision.load_vision). `head_q6`: bytes of the lm_head in Q6 where the checkpoint's
    sidecar holds it and the device can read it (quant/triton_q6.py); 0: none.
    Where the experts do not all fit, the embeddings (untied ones: a tied table is the lm_head
    too) and the vision blocks go to host RAM and the lm_head is read in Q6, unless that would
    make room for every expert: the slots then stay as they were, everything on the device as
    stored, so that "every expert resident" always means the whole model on the device.
    """
    dense = dense_parts(cfg, elt, q)
    if vision:
        dense["vision"] = vision
    kv = kv_bytes(cfg, context, elt)
    work = workspace_bytes(cfg, prefill_chunk, context)
    one = expert_bytes(cfg, elt, q)
    total = cfg.num_experts * sum(cfg.moe_layers)
    fixed = sum(dense.values()) + kv + work
    saved = {  # device bytes each move frees
        "embeddings": 0 if cfg.tie_word_embeddings else dense["embeddings"],
        "vision blocks": vision_host if vision else 0,
        "lm_head": max(0, dense["lm_head"] - head_q6) if head_q6 else 0,
    }
    saved = {k: n for k, n in saved.items() if n > 0}  # (a tiny tower's round of tiles outweighs its blocks)
    host_dense, q6 = {}, False
    if saved and total and budget - fixed + sum(saved.values()) < total * one:  # some experts stay off
        host_dense = {k: n for k, n in saved.items() if k != "lm_head"}
        if "embeddings" in saved:
            del dense["embeddings"]
        if "vision blocks" in saved:
            dense["vision"] -= vision_host
        if "lm_head" in saved:
            dense["lm_head"], q6 = head_q6, True
        fixed -= sum(saved.values())
    if fixed + one > budget:
        need = (fixed + one) / GiB
        raise UserError(
            f"the model needs at least {need:.1f} GiB of GPU memory for a {context}-token context "
            f"(everything but the experts, plus one expert slot{', with the vision tower' if vision else ''}); "
            f"{budget / GiB:.1f} GiB were given: raise --gpu-memory, lower --context, "
            + ("leave images out (chat --no-vision), " if vision else "")
            + "or quantize attention too (quantize --attention, the default when calibrating)"
        )
    slots = min(total, (budget - fixed) // one)
    auto = False
    if slots >= total:
        host = 0  # every expert lives on the device; none is staged in host RAM
    else:
        if host_budget is None:
            host_budget = host_budget_from(total * one, available)
            auto = host_budget is not None
        host = total if host_budget is None else min(total, host_budget // one)
    return MemoryPlan(budget, context, dense, kv, work, one, total, int(slots), host_budget, host, auto, host_dense, q6)
