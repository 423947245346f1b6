"""Which cached expert to evict: LRU, frequency with decay, and Belady's optimum for replay.

A policy sees keys (layer, expert): `insert` when a key enters the cache, `hit` when a resident
key is used, `evict` when it leaves, and answers `victim(candidates)`. The cache decides which
keys may be evicted (never one the running layer still needs); the policy only ranks them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence

POLICIES = ("auto", "lru", "lfu")
# "auto": measured on trained small models (docs/benchmarks.md, expert-cache policies): with 16
# experts per layer LRU hits more at small caches, with 128 (Maverick's) LFU with decay hits more
# at every cache size from 1/16 to 1/2 of the experts.
LFU_FROM_EXPERTS = 64


def resolve_policy(name: str, experts_per_layer: int) -> str:
    """The policy `name` stands for ("auto": lfu for many experts per layer, else lru)."""
    if name != "auto":
        return name
    return "lfu" if experts_per_layer >= LFU_FROM_EXPERTS else "lru"


class LRU:
    """Evict the key used longest ago."""

    name = "lru"

    def __init__(self):
        self.order: OrderedDict[Hashable, None] = OrderedDict()

    def insert(self, key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def hit(self, key) -> None:
        self.order.move_to_end(key)

    def evict(self, key) -> None:
        self.order.pop(key, None)

    def victim(self, candidates: Iterable) -> Hashable:
        allowed = set(candidates)
        for key in self.order:  # oldest first
            if key in allowed:
                return key
        raise ValueError("no evictable key")


class LFUDecay:
    """Evict the key with the lowest use count, counts halving every `half_life` accesses.

    Experts that a layer keeps choosing (MoE routing is skewed toward a few experts per layer)
    stay resident through bursts of one-off uses, which LRU would let push them out. The decay
    lets the ranking follow a conversation as its topic drifts. Ties go to the older key.
    """

    name = "lfu"

    def __init__(self, half_life: float = 256.0):
        self.decay = 0.5 ** (1.0 / half_life)
        self.clock = 0
        self.score: dict[Hashable, tuple[float, int]] = {}  # key -> (score at time t, t)

    def _bump(self, key) -> None:
        self.clock += 1
        s, t = self.score.get(key, (0.0, self.clock))
        self.score[key] = (s * self.decay ** (self.clock - t) + 1.0, self.clock)

    def insert(self, key) -> None:
        self._bump(key)

    def hit(self, key) -> None:
        self._bump(key)

    def evict(self, key) -> None:
        # Keep the history: an expert that returns keeps its earned frequency (decayed).
        pass

    def _now(self, key) -> float:
        s, t = self.score.get(key, (0.0, self.clock))
        return s * self.decay ** (self.clock - t)

    def victim(self, candidates: Iterable) -> Hashable:
        return min(candidates, key=lambda k: (self._now(k), self.score.get(k, (0, 0))[1]))


def make_policy(name: str):
    if name == "lru":
        return LRU()
    if name == "lfu":
        return LFUDecay()
    raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")


def replay(trace: Sequence, slots: int, policy) -> int:
    """Hits of `policy` serving `trace` with `slots` slots, the way the live cache serves it.

    `trace` is a sequence of keys, or of groups (lists) of keys that one layer runs together
    (see offload.trace.access_groups). As in OffloadManager.run, a group's resident keys are
    used first, then its misses are loaded in order, and a miss never evicts a key its own group
    still needs unless nothing else is resident.
    """
    resident: set = set()
    hits = 0
    for group in trace:
        group = group if isinstance(group, list) else [group]
        was = [k in resident for k in group]
        hits += sum(was)
        for k, w in zip(group, was, strict=True):
            if w:
                policy.hit(k)
        order = [k for k, w in zip(group, was, strict=True) if w] + [
            k for k, w in zip(group, was, strict=True) if not w
        ]
        for pos, key in enumerate(order):
            if key in resident:
                continue
            if len(resident) >= slots:
                needed = set(order[pos:])
                candidates = [k for k in resident if k not in needed] or list(resident)
                v = policy.victim(candidates)
                resident.discard(v)
                policy.evict(v)
            resident.add(key)
            policy.insert(key)
    return hits


def belady(trace: Sequence[Hashable], slots: int) -> int:
    """Hits of Belady's optimal policy: on a miss, evict the key whose next use is furthest away."""
    import heapq

    n = len(trace)
    next_use = [n] * n
    last: dict[Hashable, int] = {}
    for i in range(n - 1, -1, -1):
        next_use[i] = last.get(trace[i], n + i)  # never used again: beyond every real use
        last[trace[i]] = i
    resident: dict[Hashable, int] = {}  # key -> its next use
    heap: list[tuple[int, int, Hashable]] = []  # (-next use, tiebreak, key), lazily cleaned
    hits = 0
    for i, key in enumerate(trace):
        if key in resident:
            hits += 1
        elif len(resident) >= slots:
            while True:
                neg, _, k = heapq.heappop(heap)
                if resident.get(k) == -neg:
                    del resident[k]
                    break
        resident[key] = next_use[i]
        heapq.heappush(heap, (-next_use[i], i, key))
    return hits
