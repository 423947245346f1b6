"""Host store and device expert cache.

`HostStore` keeps each expert's block in host memory (pinned when a GPU is used, so a move is
one asynchronous DMA copy). Experts beyond `--host-memory` are not held: their block is built
again from the memory-mapped checkpoint each time one is needed.

`ExpertCache` owns `slots` blocks on the compute device, allocated once as one tensor. Copies
run on their own CUDA stream; each slot has a `ready` event (its copy finished) that compute
waits on, and a `released` event (the last compute that read it finished) that the next copy
into the slot waits on. Nothing blocks the host. On the CPU the same code copies synchronously.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch

from .layout import ExpertLayout

Key = tuple[int, int]  # (layer, expert)


@dataclass
class LayerStats:
    uses: int = 0  # experts the layer ran (one per distinct expert per forward)
    hits: int = 0  # resident when the layer started (prefetched ones included)
    misses: int = 0
    cpu: int = 0  # misses computed on the CPU instead of copied
    loads: int = 0  # blocks copied into the cache (demand and prefetch)
    bytes_moved: int = 0
    copy_s: float = 0.0  # time spent copying (device time on CUDA)
    stall_s: float = 0.0  # time compute waited for demand copies (host-measured on the CPU)
    prefetch_guessed: int = 0
    prefetch_correct: int = 0
    prefetch_loads: int = 0
    disk_hints: int = 0  # experts beyond the host budget whose read-ahead a guess started
    spills: int = 0  # experts the device evicted copied back into host RAM (the exclusive host tier)

    def add(self, other: LayerStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.uses if self.uses else None

    @property
    def prefetch_accuracy(self) -> float | None:
        return self.prefetch_correct / self.prefetch_guessed if self.prefetch_guessed else None

    @property
    def h2d_bytes_per_s(self) -> float | None:
        """Bytes moved per second of copying (the bandwidth the copies reached)."""
        return self.bytes_moved / self.copy_s if self.copy_s else None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        d["prefetch_accuracy"] = self.prefetch_accuracy
        return d


class HostStore:
    """Expert blocks in host memory, up to a budget; the rest read from the checkpoint on demand.

    With a budget that holds some but not all experts and a `policy`, the held set is a cache
    too: an expert read from the files takes the row of the policy's victim (after any copy out
    of that row has finished), so the experts in RAM follow the routing instead of staying the
    first ones loaded.

    `exclusive` (offload.setup sets it on such a store when the device cache reads it): an expert
    copied to the device leaves host RAM and one the device evicts is copied back into it
    (ExpertCache.load), so RAM and the device hold different experts. Beside a 24 GB GPU, Scout's
    768 experts then fit in RAM and GPU together from 48 GB of RAM, where holding the same ones
    twice left a fifth of the uses to the disk when misses are copied (docs/benchmarks-history.md,
    session 31). One row beyond the budget (the staging buffer) is the spare that makes each swap
    one pair of copies."""

    def __init__(
        self,
        layout: ExpertLayout,
        keys: list[Key],
        build: Callable[[Key], dict[str, torch.Tensor]],
        pin: bool,
        budget_bytes: int | None = None,
        policy=None,
    ):
        self.layout, self.build, self.pin = layout, build, pin
        self.bounded, self.release = budget_bytes is not None, getattr(build, "release", None)
        held = len(keys) if budget_bytes is None else min(len(keys), max(0, budget_bytes // layout.nbytes))
        self.keys, self.held_keys = keys, keys[:held]
        self.blocks: dict[Key, torch.Tensor] = {}
        self.policy = policy if 0 < held < len(keys) else None
        self.exclusive = False
        self.replaced = 0
        # The last copy out of and into each row (CUDA events by the row's address): the host
        # waits for them before writing a row (both) or reading it (the copy in); copies on the
        # cache's stream are ordered by the stream.
        self._out: dict[int, torch.cuda.Event] = {}
        self._in: dict[int, torch.cuda.Event] = {}
        if self.policy is not None:
            for k in self.held_keys:
                self.policy.insert(k)
        if held:
            # One allocation per layer keeps pinning cheap; every expert is a row.
            by_layer: dict[int, list[Key]] = {}
            for k in self.held_keys:
                by_layer.setdefault(k[0], []).append(k)
            for layer_keys in by_layer.values():
                buf = torch.empty((len(layer_keys), layout.nbytes), dtype=torch.uint8, pin_memory=pin)
                for row, k in zip(buf, layer_keys, strict=True):
                    self.blocks[k] = layout.pack(build(k), row)
        self._staging = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=pin)
        self.free: list[torch.Tensor] = [self._staging]  # rows holding no expert (the exclusive tier's spare)
        self.rebuilt = 0

    @property
    def nbytes(self) -> int:
        return len(self.blocks) * self.layout.nbytes

    def _host(self, row: torch.Tensor, write: bool) -> torch.Tensor:
        """`row` once the host may read it (a copy into it finished) or write it (copies both ways)."""
        for events in (self._in, self._out) if write else (self._in,):
            ev = events.pop(row.data_ptr(), None)
            if ev is not None:
                ev.synchronize()
        return row

    def _read(self, key: Key, row: torch.Tensor) -> torch.Tensor:
        """Expert `key` read from the checkpoint into `row`; its pages dropped where bounded."""
        self.rebuilt += 1
        out = self.layout.pack(self.build(key), self._host(row, write=True))
        if self.bounded and self.release is not None:
            self.release(key)
        return out

    def _victim_row(self) -> torch.Tensor:
        """The row of the held expert the policy gives up (it is then read from the files)."""
        victim = self.policy.victim(list(self.blocks))
        self.policy.evict(victim)
        self.replaced += 1
        return self.blocks.pop(victim)

    def _spare_row(self) -> torch.Tensor:
        """A row for an expert joining the exclusive tier: a free one, else the policy's victim's."""
        return self.free.pop() if self.free else self._victim_row()

    def block(self, key: Key) -> torch.Tensor:
        """The expert's block; for one not held, a staging buffer valid until the next call.

        With a budget, an expert not held is read from the checkpoint's mapped files and its
        pages are then dropped from the page cache (when the builder can: `build.release`), so
        the budget bounds the RAM experts take, page cache included; every such read is a disk
        read."""
        b = self.blocks.get(key)
        if b is not None:
            if self.policy is not None:
                self.policy.hit(key)
            return self._host(b, write=False)
        if self.policy is not None:  # into a free row (exclusive tier), else a held expert's the policy gives up
            row = self._spare_row() if self.exclusive else self._victim_row()
            out = self.blocks[key] = self._read(key, row)
            self.policy.insert(key)
            return out
        return self._read(key, self._staging)

    # -- copies to the device (ExpertCache.load) ----------------------------------------------------
    def take(self, key: Key) -> torch.Tensor:
        """The block to copy `key` to the device from; hand it to `done` once the copy is queued.
        Exclusive: its own row, which leaves the held set, or a free row it is read into from the
        files; else `block(key)`."""
        if not self.exclusive:
            return self.block(key)
        row = self.blocks.pop(key, None)
        if row is not None:
            self.policy.evict(key)
            return row
        return self._read(key, self._spare_row())

    def put_back(self, key: Key) -> torch.Tensor | None:
        """A row for `key`, which the device evicts, to be copied into (None: not exclusive, or
        already held)."""
        if not self.exclusive or key in self.blocks:
            return None
        row = self.blocks[key] = self._spare_row()
        self.policy.insert(key)
        return row

    def done(self, row: torch.Tensor, copy_out=None, back: torch.Tensor | None = None, copy_in=None) -> None:
        """The copy out of `row` (from take) ends at `copy_out`, and the copy into `back` (from
        put_back) at `copy_in` (CUDA events; None on the CPU). Exclusive: `row` is free."""
        if copy_out is not None:
            self._out[row.data_ptr()] = copy_out
        if back is not None and copy_in is not None:
            self._in[back.data_ptr()] = copy_in
        if self.exclusive:
            self.free.append(row)

    def willneed(self, key: Key) -> bool:
        """Start reading a not-held expert's bytes into the page cache in the background (the
        kernel's read-ahead); False when it is held in RAM or the builder cannot say where its
        bytes are."""
        hint = getattr(self.build, "willneed", None)
        if key in self.blocks or hint is None:
            return False
        hint(key)
        return True


class ExpertCache:
    """`slots` expert blocks on `device`, filled from a HostStore; a policy ranks evictions."""

    def __init__(self, store: HostStore, slots: int, device: torch.device, policy):
        if slots < 1:
            raise ValueError("the expert cache needs at least one slot")
        self.store, self.device, self.policy = store, torch.device(device), policy
        self.layout = store.layout
        self.buf = torch.empty((slots, self.layout.nbytes), dtype=torch.uint8, device=self.device)
        self.slots = slots
        self.slot_of: dict[Key, int] = {}
        self.key_of: list[Key | None] = [None] * slots
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.ready: list = [None] * slots
        self.released: list = [None] * slots
        self._timings: list[tuple[LayerStats, torch.cuda.Event, torch.cuda.Event, bool]] = []
        self._views = [self.layout.views(self.buf[s]) for s in range(slots)]

    def resident(self, key: Key) -> bool:
        return key in self.slot_of

    def load(self, key: Key, stats: LayerStats, protect: set[Key], demand: bool) -> bool:
        """Start copying `key` in; False when every resident block is protected (nothing moved)."""
        if key in self.slot_of:
            return True
        victim = None
        if len(self.slot_of) < self.slots:
            slot = self.key_of.index(None)
        else:
            candidates = [k for k in self.slot_of if k not in protect]
            if not candidates:
                return False
            victim = self.policy.victim(candidates)
            slot = self.slot_of.pop(victim)
            self.policy.evict(victim)
        self.key_of[slot] = key
        self.slot_of[key] = slot
        self.policy.insert(key)
        store = self.store
        # An exclusive host tier: the expert leaves host RAM, the evicted one goes back into it.
        src = store.take(key)
        back = store.put_back(victim) if victim is not None else None
        n = self.layout.nbytes
        stats.loads += 1
        stats.bytes_moved += n if back is None else 2 * n
        stats.spills += back is not None
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self.stream):
                if self.released[slot] is not None:
                    self.stream.wait_event(self.released[slot])
                start.record(self.stream)
                if back is not None:  # the evicted expert out of the slot first, then the new one in
                    back.copy_(self.buf[slot], non_blocking=True)
                self.buf[slot].copy_(src, non_blocking=True)
                end.record(self.stream)
            self.ready[slot] = end
            store.done(src, end, back, end)
            self._timings.append((stats, start, end, demand))
            if len(self._timings) > 1024:
                self.collect_timings(wait=False)
        else:
            t0 = time.perf_counter()
            if back is not None:
                back.copy_(self.buf[slot])
            self.buf[slot].copy_(src)
            store.done(src)
            dt = time.perf_counter() - t0
            stats.copy_s += dt
            if demand:
                stats.stall_s += dt
        return True

    def acquire(self, key: Key) -> dict:
        """Views of a resident expert's slot, ordered after its copy on the compute stream."""
        slot = self.slot_of[key]
        if self.cuda and self.ready[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        return self._views[slot]

    def release(self, key: Key) -> None:
        """Compute that reads the slot has been queued; a later copy into it waits for it."""
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self.released[self.slot_of[key]] = ev

    def collect_timings(self, wait: bool = True) -> None:
        """Fold finished CUDA copy timings into the stats (all of them when `wait`)."""
        if not self._timings:
            return
        if wait:
            torch.cuda.synchronize(self.device)
        pending = []
        for item in self._timings:
            stats, start, end, demand = item
            if not wait and not end.query():
                pending.append(item)
                continue
            dt = start.elapsed_time(end) / 1000
            stats.copy_s += dt
            if demand:
                stats.stall_s += dt
        self._timings = pending
