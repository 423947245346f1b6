"""The offload manager: routed experts served from a device cache, filled from host memory.

`attach` replaces each MoE layer's experts with `OffloadedExperts`, which hands the layer's
(expert, tokens) groups to the manager. The manager

- runs the experts that are resident first, while copies of the missing ones are under way,
  and never evicts an expert that the running layer still needs (unless the cache is smaller
  than what one layer needs, when it must);
- computes a miss on the CPU instead of copying it, per `miss_policy`: `swap` always copies,
  `cpu` computes every miss of a few tokens on the CPU, `auto` picks the cheaper of the two
  from a cost model measured at start-up; pieces of many tokens (prefill) are always copied;
  a decode step's shared expert is queued on the device while the CPU computes its misses;
- before each MoE layer runs, applies that layer's router to the residual stream coming into
  the layer to guess its experts and starts copying them (speculative prefetch), so the copy
  overlaps the layer's attention;
- counts, per layer, uses, hits, misses, CPU-computed misses, bytes moved, copy and stall time,
  and how many prefetch guesses were right.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from llama4_local.model import rms_norm

from .cache import ExpertCache, HostStore, Key, LayerStats
from .layout import ExpertKernel

MISS_POLICIES = ("swap", "cpu", "auto")
CPU_MAX_TOKENS = 8  # an expert with more tokens than this is always copied (prefill)
LOOKAHEAD = 2  # copies started ahead of the expert being computed


@dataclass
class CostModel:
    """Seconds to copy one expert to the device, and to compute it on the CPU for 1 and 8 tokens."""

    copy_s: float
    device_s: float
    cpu1_s: float
    cpu8_s: float

    def cpu(self, n: int) -> float:
        return self.cpu1_s + (self.cpu8_s - self.cpu1_s) * (n - 1) / 7

    def swap(self, n: int) -> float:
        return self.copy_s + self.device_s

    def as_dict(self) -> dict:
        return {k: round(v * 1e3, 4) for k, v in vars(self).items()} | {"unit": "ms"}


class OffloadedExperts(nn.Module):
    """Stands in for a layer's routed experts; the weights live in the manager's store and cache."""

    def __init__(self, layer: int, num_experts: int):
        super().__init__()
        self.layer, self.num_experts = layer, num_experts
        self.manager: OffloadManager | None = None

    def run(self, groups: list[tuple[int, torch.Tensor]], overlap=None) -> list[torch.Tensor]:
        return self.manager.run(self.layer, groups, overlap)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.run([(e, x)])[0]


class OffloadManager:
    def __init__(
        self,
        model: nn.Module,
        cache: ExpertCache,
        kernel: ExpertKernel,
        cpu_store: HostStore,
        cpu_kernel: ExpertKernel,
        miss_policy: str = "swap",
        prefetch: bool = True,
    ):
        if miss_policy not in MISS_POLICIES:
            raise ValueError(f"unknown miss policy {miss_policy!r}")
        self.model, self.cache, self.kernel = model, cache, kernel
        self.cpu_store, self.cpu_kernel = cpu_store, cpu_kernel
        self.miss_policy, self.prefetch = miss_policy, prefetch
        self.device = cache.device
        self.moe = {i: layer.feed_forward for i, layer in enumerate(model.layers) if layer.is_moe}
        self.stats = {i: LayerStats() for i in self.moe}
        order = sorted(self.moe)
        self.next_moe = dict(zip(order, order[1:], strict=False))  # each MoE layer's next one
        self.guess: dict[int, set[Key]] = {}
        self.cost: CostModel | None = None
        self.lookahead = LOOKAHEAD if cache.cuda else 0
        self.host_budget: int | None = None  # host RAM the expert stores may take (None: every expert)
        self.host_budget_auto = False  # whether it came from the machine's available RAM (offload.setup)
        for ff in self.moe.values():
            ff.experts.manager = self
        if miss_policy == "auto":
            self.cost = self.calibrate()

    # -- statistics -------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.cache.collect_timings()
        self.stats = {i: LayerStats() for i in self.moe}

    def totals(self) -> LayerStats:
        self.cache.collect_timings()
        total = LayerStats()
        for st in self.stats.values():
            total.add(st)
        return total

    def summary(self) -> dict:
        return {
            "slots": self.cache.slots,
            "experts": len(self.moe) * next(iter(self.moe.values())).num_experts,
            "slot_bytes": self.cache.layout.nbytes,
            "policy": self.cache.policy.name,
            "miss_policy": self.miss_policy,
            "prefetch": self.prefetch,
            "host_held": len(self.cache.store.blocks),
            "host_read_from_files": self.cache.store.rebuilt,  # disk reads once the budget binds
            "host_replaced": self.cache.store.replaced,
            "cost_model": self.cost.as_dict() if self.cost else None,
            "total": self.totals().as_dict(),
            "layers": {i: st.as_dict() for i, st in self.stats.items()},
        }

    # -- prefetch -------------------------------------------------------------------------------
    def _guess(self, i: int, x: torch.Tensor) -> set[Key]:
        """Layer i's router applied to x (normed as the layer would): its likely experts."""
        ff, norm = self.moe[i], self.model.layers[i].post_attention_layernorm
        logits = ff.router(rms_norm(x, norm.eps) * norm.weight)
        return {(i, e) for e in torch.topk(logits, ff.top_k, dim=1).indices.unique().tolist()[: self.cache.slots]}

    def before_layer(self, i: int, x: torch.Tensor) -> None:
        """Guess layer i's experts from the residual stream entering it; start copying them.

        An expert beyond the host budget would be read from disk here, with nothing to overlap
        on the CPU: instead the guess only starts the kernel's read-ahead of its bytes
        (posix_fadvise WILLNEED) and the copy happens if the layer does choose it. The next MoE
        layer's guess (its router on the same residual stream) starts its read-ahead too, so
        the disk has a layer's compute to deliver it."""
        if not self.prefetch or i not in self.moe:
            return
        guess = self.guess[i] = self._guess(i, x)
        st, store = self.stats[i], self.cache.store
        for key in guess:
            if self.cache.resident(key):
                continue
            if store.willneed(key):  # on disk: read-ahead only
                st.disk_hints += 1
            elif self.cache.load(key, st, guess, demand=False):
                st.prefetch_loads += 1
        nxt = self.next_moe.get(i)
        if nxt is not None and store.bounded:
            for key in self._guess(nxt, x):
                if not self.cache.resident(key) and store.willneed(key):
                    self.stats[nxt].disk_hints += 1

    # -- one layer --------------------------------------------------------------------------------
    def _cpu_for(self, n_tokens: int) -> bool:
        if n_tokens > CPU_MAX_TOKENS or self.miss_policy == "swap":
            return False
        if self.miss_policy == "cpu":
            return True
        return self.cost.cpu(n_tokens) < self.cost.swap(n_tokens)

    def _cpu_reads_ram(self, key: Key) -> bool:
        """Whether a CPU-computed miss would find `key` in host RAM: not where the CPU has its own
        store (the stock CUDA kernel's layout differs) that lacks it while the device's store holds
        it, where the CPU would read the checkpoint's files and a copy reads RAM."""
        cpu, dev = self.cpu_store, self.cache.store
        return cpu is dev or key in cpu.blocks or key not in dev.blocks

    def run(self, layer: int, groups: list[tuple[int, torch.Tensor]], overlap=None) -> list[torch.Tensor]:
        """Each group's output, in order. `overlap`: other device work of the layer (a decode
        step's shared expert), called once the CPU misses have their inputs and before they
        compute, so the device runs it while the host computes them (queued before, the
        inputs' copy would wait for it; after, it would wait for the CPU)."""
        cache, st = self.cache, self.stats[layer]
        keys = [(layer, e) for e, _ in groups]
        was_resident = [cache.resident(k) for k in keys]
        st.uses += len(keys)
        st.hits += sum(was_resident)
        st.misses += len(keys) - sum(was_resident)
        guess = self.guess.pop(layer, None)
        if guess is not None:
            st.prefetch_guessed += len(guess)
            st.prefetch_correct += len(guess & set(keys))
        for k, r in zip(keys, was_resident, strict=True):
            if r:
                cache.policy.hit(k)
        n = len(groups)
        on_cpu = [
            j
            for j in range(n)
            if not was_resident[j] and self._cpu_for(groups[j][1].shape[0]) and self._cpu_reads_ram(keys[j])
        ]
        cpu_inputs = {j: groups[j][1].to("cpu") for j in on_cpu}  # before queueing device work
        if overlap is not None:
            overlap()
        skip = set(on_cpu)
        order = [j for j in range(n) if was_resident[j]] + [
            j for j in range(n) if not was_resident[j] and j not in skip
        ]
        pending = [keys[j] for j in order]
        results: list[torch.Tensor | None] = [None] * n
        for pos, j in enumerate(order):
            key = keys[j]
            needed = set(pending[pos:])
            if not cache.resident(key) and not cache.load(key, st, needed, demand=True):
                cache.load(key, st, {key}, demand=True)  # fewer slots than the layer needs
            for ahead in pending[pos + 1 : pos + 1 + self.lookahead]:
                if not cache.resident(ahead):
                    cache.load(ahead, st, needed, demand=True)
            results[j] = self.kernel(groups[j][1], cache.acquire(key))
            cache.release(key)
        for j in on_cpu:
            t0 = time.perf_counter()
            views = self.cpu_store.layout.views(self.cpu_store.block(keys[j]))
            y = self.cpu_kernel(cpu_inputs[j], views)
            results[j] = y.to(self.device, non_blocking=True)
            st.cpu += 1
            st.stall_s += time.perf_counter() - t0
        return results

    # -- cost model -----------------------------------------------------------------------------
    def calibrate(self, reps: int = 3) -> CostModel:
        """Time one expert's copy, its device compute, and its CPU compute for 1 and 8 tokens."""
        key = next(iter(self.cache.store.held_keys or [(min(self.moe), 0)]))
        block = self.cache.store.block(key)
        scratch = torch.empty_like(block, device=self.device)
        dim = self.model.cfg.hidden_size
        dtype = self.model.embed_tokens.weight.dtype

        def best(fn) -> float:
            times = []
            for _ in range(reps + 1):
                if self.cache.cuda:
                    torch.cuda.synchronize(self.device)
                t0 = time.perf_counter()
                fn()
                if self.cache.cuda:
                    torch.cuda.synchronize(self.device)
                times.append(time.perf_counter() - t0)
            return min(times[1:])

        copy_s = best(lambda: scratch.copy_(block, non_blocking=True))
        dev_views = self.cache.layout.views(scratch)
        x_dev = torch.randn(1, dim, dtype=dtype, device=self.device)
        device_s = best(lambda: self.kernel(x_dev, dev_views))
        cpu_views = self.cpu_store.layout.views(self.cpu_store.block(key))
        x1, x8 = torch.randn(1, dim, dtype=dtype), torch.randn(8, dim, dtype=dtype)
        cpu1 = best(lambda: self.cpu_kernel(x1, cpu_views))
        cpu8 = best(lambda: self.cpu_kernel(x8, cpu_views))
        return CostModel(copy_s=copy_s, device_s=device_s, cpu1_s=cpu1, cpu8_s=cpu8)
