"""Wiring: replace a model's routed experts by offloaded ones and build store, cache and manager."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from llama4_local.checkpoint import Checkpoint
from llama4_local.errors import UserError

from .cache import ExpertCache, HostStore, Key
from .layout import ExpertKernel, ExpertLayout
from .manager import MISS_POLICIES, OffloadedExperts, OffloadManager
from .policy import POLICIES, make_policy, resolve_policy


@dataclass
class OffloadOptions:
    """What the user asked for; `slots` None means: as many as the memory plan allows."""

    slots: int | None = None
    gpu_memory: int | None = None  # bytes; None: the GPU's free memory minus a margin
    host_memory: int | None = None  # bytes of host RAM for expert blocks; None: all experts
    policy: str = "auto"  # lru for Scout's 16 experts per layer, lfu for Maverick's 128
    miss_policy: str = "auto"
    prefetch: bool = True

    def validate(self) -> OffloadOptions:
        if self.slots is not None and self.slots < 1:
            raise UserError(f"--expert-cache-slots must be at least 1, not {self.slots}")
        if self.policy not in POLICIES:
            raise UserError(f"--cache-policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if self.miss_policy not in MISS_POLICIES:
            raise UserError(f"--miss-policy must be one of {', '.join(MISS_POLICIES)}, not {self.miss_policy!r}")
        return self


def replace_experts(model) -> None:
    """Swap every MoE layer's experts for a weightless stand-in (before weights are loaded)."""
    for i, layer in enumerate(model.layers):
        if layer.is_moe:
            layer.feed_forward.experts = OffloadedExperts(i, layer.feed_forward.num_experts)


def expert_builder(ckpt: Checkpoint, scheme, dtype: torch.dtype, device: torch.device):
    """(build(key) -> tensors in `device`'s kernel layout, on the CPU; the kernel that reads them)."""
    if scheme is None:
        cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def build_dense(key: Key) -> dict[str, torch.Tensor]:
            i, e = key
            if i not in cache:  # memory-mapped, so this reads nothing yet
                base = f"layers.{i}.feed_forward.experts"
                cache.clear()
                cache[i] = (ckpt.get(f"{base}.gate_up_proj"), ckpt.get(f"{base}.down_proj"))
            gate_up, down = cache[i]
            return {"gate_up": gate_up[e].to(dtype), "down": down[e].to(dtype)}

        return build_dense, ExpertKernel()

    from quant.format import from_tensors
    from quant.kernels import kernel_for, make_linear

    def read(key: Key, p: str):
        prefix = f"layers.{key[0]}.feed_forward.experts.{key[1]}.{p}_proj"
        try:
            return from_tensors(ckpt.get, prefix, scheme)
        except KeyError as err:
            raise UserError(f"quantized checkpoint {ckpt.root} lacks {err.args[0]}; is it complete?") from None

    # One kernel path for all projections of all experts (same shapes, group and dtype), so one
    # layout fits every expert; the reference path where a shape rule fails for one of them.
    first = (min(int(n.split(".")[1]) for n in ckpt.names if ".feed_forward.experts." in n), 0)
    paths = {kernel_for(read(first, p), device, dtype) for p in ("gate", "down")}
    path = paths.pop() if len(paths) == 1 else "reference"

    def build_int4(key: Key) -> dict[str, torch.Tensor]:
        out = {}
        for p in ("gate", "up", "down"):
            lin = make_linear(read(key, p), device, dtype, path=path)
            out.update({f"{p}.{n}": b.to("cpu") for n, b in lin.tensors().items()})
        return out

    sources: dict[Key, list[str]] = {}  # each expert's checkpoint tensors, listed once
    for n in ckpt.names:
        parts = n.split(".")
        if len(parts) > 5 and parts[2:4] == ["feed_forward", "experts"] and parts[4].isdigit():
            sources.setdefault((int(parts[1]), int(parts[4])), []).append(n)

    def release(key: Key) -> None:  # the expert's source pages out of the page cache
        ckpt.drop_pages(sources.get(key, []))

    def willneed(key: Key) -> None:  # background read-ahead of the expert's source pages
        ckpt.prefetch_pages(sources.get(key, []))

    build_int4.release = release
    build_int4.willneed = willneed

    group = scheme.fp8.block if scheme.kind == "fp8" else scheme.group_size
    return build_int4, ExpertKernel(path, group)


def attach_offload(
    model,
    ckpt: Checkpoint,
    scheme,
    dtype: torch.dtype,
    device: torch.device,
    slots: int,
    opts: OffloadOptions,
) -> OffloadManager:
    """Build host store(s), the device cache and the manager for a model from `replace_experts`."""
    build, kernel = expert_builder(ckpt, scheme, dtype, device)
    cpu = None
    if device.type != "cpu" and opts.miss_policy != "swap":
        cpu = expert_builder(ckpt, scheme, dtype, torch.device("cpu"))
    return build_manager(model, build, kernel, device, slots, opts, cpu)


def build_manager(model, build, kernel, device: torch.device, slots: int, opts: OffloadOptions, cpu=None):
    """Store, cache and manager from a block builder: `build(key)` gives an expert's tensors in the
    device kernel's layout, `cpu` (a (build, kernel) pair) the CPU layout for CPU-computed misses.

    Without --host-memory the stores hold every expert where the machine's available RAM takes
    them (plan.host_budget_from), else as many as it does; the manager's `host_budget` says which
    bound applied (None: none)."""
    from llama4_local.loader import available_memory

    from .plan import host_budget_from

    moe = [i for i, layer in enumerate(model.layers) if layer.is_moe]
    keys = [(i, e) for i in moe for e in range(model.layers[i].feed_forward.num_experts)]
    slots = min(slots, len(keys))
    policy = resolve_policy(opts.policy, model.layers[moe[0]].feed_forward.num_experts)
    layout, cpu_layout = ExpertLayout(build(keys[0])), None
    if cpu is not None:
        cpu_layout = ExpertLayout(cpu[0](keys[0]))
        if cpu_layout.entries == layout.entries:  # Triton on CUDA: the CPU kernel reads the pinned blocks
            cpu_layout = None
    budget, auto = opts.host_memory, False
    if budget is None:
        need = len(keys) * (layout.nbytes + (cpu_layout.nbytes if cpu_layout else 0))
        budget = host_budget_from(need, available_memory())
        auto = budget is not None
    store = HostStore(layout, keys, build, pin=device.type == "cuda", budget_bytes=budget, policy=make_policy(policy))
    cpu_store, cpu_kernel = store, (kernel if cpu is None else cpu[1])
    if cpu_layout is not None:  # the stock CUDA kernel's own layout: a second copy, from what is left
        left = None if budget is None else max(0, budget - store.nbytes)
        cpu_store = HostStore(cpu_layout, keys, cpu[0], pin=False, budget_bytes=left)
    # Some experts held, not all: RAM and the device hold different ones (cache.HostStore), unless
    # LLAMA4_LOCAL_INCLUSIVE_HOST=1 (RAM keeps copies of the device's experts; for comparison).
    store.exclusive = store.policy is not None and os.environ.get("LLAMA4_LOCAL_INCLUSIVE_HOST") != "1"
    cache = ExpertCache(store, slots, device, make_policy(policy))
    manager = OffloadManager(model, cache, kernel, cpu_store, cpu_kernel, opts.miss_policy, opts.prefetch)
    manager.host_budget = budget
    manager.host_budget_auto = auto
    return manager
