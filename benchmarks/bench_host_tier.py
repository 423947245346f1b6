"""Where a 24 GB GPU's misses come from when host RAM holds only some of Scout's experts.

Drives the real `offload.cache.HostStore` and `ExpertCache` (on the CPU, with 64-byte stand-in
blocks, so it runs anywhere in seconds) with Scout's counts: 768 routed experts (48 layers x 16),
one chosen per layer and token, the device cache's slots as the planner gives them at 24 GiB, and
the host tier's rows as `host_budget_from` gives them on machines of 32 and 48 GB (MemAvailable
28 and 44 GiB). Each decode token runs the 48 layers in order; the layer's expert is loaded
(LRU on both tiers, as the defaults are for 16 experts) and counted as a device hit, a host
hit, or a read from the checkpoint's files (the disk) when it runs; with prefetch, reads per
token count the guesses' reads too. The host tier is exclusive (what
`offload.setup` builds: an expert copied to the device leaves RAM, an evicted one is copied
back) or inclusive (RAM keeps copies of the device's experts, as before session 31).

Routing: uniform (every expert equally likely: the cache's worst case) or Zipf with exponent s
per layer (a few hot experts), `--tokens` decode tokens after a warm-up of as many. Misses are
either all copied to the device (`--miss swap`) or, as the default `auto` mostly does for one
token, computed on the CPU from host RAM after a prefill that filled the device (`cpu`).

    python benchmarks/bench_host_tier.py [--slots 250] [--hosts 379,620] [--zipf 0,1]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from offload.cache import ExpertCache, HostStore, LayerStats  # noqa: E402
from offload.layout import ExpertLayout  # noqa: E402
from offload.policy import make_policy  # noqa: E402

LAYERS, EXPERTS = 48, 16
BLOCK = {"w": torch.zeros(16, dtype=torch.float32)}  # 64 bytes: the counts, not the bytes, matter here


def trace(tokens: int, s: float, seed: int) -> list[tuple[int, int]]:
    """(layer, expert) uses of `tokens` decode tokens; Zipf(s) per layer (s = 0: uniform), each
    layer's popularity order shuffled."""
    r = random.Random(seed)
    weights = [1 / (i + 1) ** s for i in range(EXPERTS)]
    order = [r.sample(range(EXPERTS), EXPERTS) for _ in range(LAYERS)]
    return [(i, order[i][r.choices(range(EXPERTS), weights)[0]]) for _ in range(tokens) for i in range(LAYERS)]


def serve(
    uses: list[tuple[int, int]], slots: int, held: int, exclusive: bool, warm: int, miss: str, prefetch: float
) -> dict:
    """Counts over the uses after the first `warm`, through the real store and cache. `miss`:
    "swap" copies every miss to the device; "cpu" computes decode misses on the CPU from host RAM
    (OffloadManager's cpu policy, what `auto` mostly picks for one token), after a 256-token
    prefill whose pieces copied every expert of every layer to the device in layer order.
    `prefetch`: the share of right guesses of a prefetch that copies its guess before each use
    (0: none; the live cache's router guesses were right 55% of the time with 16 experts)."""
    keys = [(i, e) for i in range(LAYERS) for e in range(EXPERTS)]
    layout = ExpertLayout(BLOCK)
    store = HostStore(
        layout, keys, lambda k: BLOCK, pin=False, budget_bytes=held * layout.nbytes, policy=make_policy("lru")
    )
    store.exclusive = exclusive and store.policy is not None
    cache = ExpertCache(store, slots, torch.device("cpu"), make_policy("lru"))
    stats = LayerStats()
    counts = {"device": 0, "host": 0, "disk": 0}
    if miss == "cpu":
        for i in range(LAYERS):  # the prefill: each layer's 16 experts, copied as the layer runs
            layer = {(i, e) for e in range(EXPERTS)}
            for key in sorted(layer):
                cache.load(key, stats, layer, demand=True)
    r = random.Random(1)
    reads0 = spills0 = 0
    for n, key in enumerate(uses):
        if n == warm:
            reads0, spills0 = store.rebuilt, stats.spills
        if prefetch:  # the router's guess, right `prefetch` of the time, copied before the layer runs
            guess = key if r.random() < prefetch else (key[0], r.choice([e for e in range(EXPERTS) if e != key[1]]))
            if not cache.resident(guess) and guess in store.blocks:  # one on disk: read-ahead only (manager)
                cache.load(guess, stats, {guess}, demand=False)
        where = "device" if cache.resident(key) else "host" if key in store.blocks else "disk"
        if cache.resident(key):
            cache.policy.hit(key)
        elif miss == "cpu":
            store.block(key)
        else:
            cache.load(key, stats, {key}, demand=True)
        if n >= warm:
            counts[where] += 1
    total = sum(counts.values())
    tokens = total / LAYERS
    return {k: round(v / total, 4) for k, v in counts.items()} | {
        "disk_reads_per_token": round((store.rebuilt - reads0) / tokens, 2),  # prefetches' reads too
        "copies_back_per_token": round((stats.spills - spills0) / tokens, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=250, help="device slots (24 GiB with the vision tower: 250)")
    ap.add_argument("--hosts", default="379,620", help="host rows (32 GB: 379, 48 GB: 620 of 768)")
    ap.add_argument("--zipf", default="0,1", help="routing exponents (0: uniform)")
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--miss", default="swap,cpu", help="swap: every miss copied; cpu: decode misses on the CPU")
    ap.add_argument("--prefetch", default="0,0.55", help="prefetch guess accuracies (0: no prefetch)")
    args = ap.parse_args()
    for s in [float(z) for z in args.zipf.split(",")]:
        uses = trace(2 * args.tokens, s, seed=0)
        for held in [int(h) for h in args.hosts.split(",")]:
            for miss, pf in itertools.product(args.miss.split(","), [float(a) for a in args.prefetch.split(",")]):
                row = {"routing": "uniform" if s == 0 else f"zipf {s}", "slots": args.slots, "host_rows": held}
                row.update(miss=miss, prefetch=pf)
                for exclusive in (True, False):
                    r = serve(uses, args.slots, held, exclusive, args.tokens * LAYERS, miss, pf)
                    row["exclusive" if exclusive else "inclusive"] = r
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
