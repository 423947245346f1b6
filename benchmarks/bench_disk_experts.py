"""Experts beyond RAM: decode with most experts read from the checkpoint's files on demand.

A CPU-only run of the INT4 Scout-width slice (benchmarks/scout_slice.py, quantized; its 16
experts are 1.02 GB of the 1.81 GB) with an expert cache of a few slots in RAM and
`--host-memory 0`: every expert the cache misses is read from the memory-mapped shards, and
the runner then drops those pages from the page cache (posix_fadvise DONTNEED), so each miss is
a real disk read and the page cache cannot quietly hold the whole checkpoint. The page cache is
dropped before each configuration (/proc/sys/vm/drop_caches, as root; the script says when it
cannot). Reports decode tok/s, misses and bytes read from disk per token (/proc/self/io
read_bytes: what the block device delivered), against the same run with every expert in RAM,
and the disk's own sequential read speed.

    python benchmarks/bench_disk_experts.py [--model benchmarks/.cache/scout-slice-int4] [--slots 4,8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llama4_local.loader import load_model  # noqa: E402
from offload.setup import OffloadOptions  # noqa: E402

DEFAULT_MODEL = ROOT / "benchmarks" / ".cache" / "scout-slice-int4"


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def disk_read_speed(model_dir: Path) -> float:
    """GB/s reading the checkpoint's shards once from a dropped page cache (1 MiB reads)."""
    drop_page_cache()
    total, t0 = 0, time.perf_counter()
    for p in sorted(model_dir.glob("*.safetensors")):
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return total / (time.perf_counter() - t0) / 1e9


@torch.inference_mode()
def decode(model, tokens: int) -> dict:
    cache, token = model.new_cache(tokens + 9), torch.tensor([1])
    for _ in range(8):  # not timed: attention and norms paged in, the expert cache filled
        token = model(token, cache)[-1].argmax().reshape(1)
    if getattr(model, "offload", None) is not None:
        model.offload.reset_stats()
        store = model.offload.cache.store
        rebuilt0 = store.rebuilt
    r0, t0 = read_bytes(), time.perf_counter()
    for _ in range(tokens):
        token = model(token, cache)[-1].argmax().reshape(1)
    dt = time.perf_counter() - t0
    out = {"decode_tok_s": round(tokens / dt, 2), "disk_MB_per_token": round((read_bytes() - r0) / tokens / 1e6, 1)}
    if getattr(model, "offload", None) is not None:
        t = model.offload.totals()
        out.update(
            misses_per_token=round(t.misses / tokens, 2),
            hit_rate=round(t.hits / max(1, t.uses), 3),
            read_from_files_per_token=round((store.rebuilt - rebuilt0) / tokens, 2),
            prefetch_accuracy=round(t.prefetch_correct / max(1, t.prefetch_guessed), 3),
            read_ahead_hints_per_token=round(t.disk_hints / tokens, 2),
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--slots", default="4,8")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.model.is_dir():
        sys.exit(f"{args.model} is missing: run benchmarks/bench_vs_llamacpp.py once (it writes it)")
    dropped = drop_page_cache()
    print(json.dumps({"page_cache_dropped": dropped, "disk_GB_s": round(disk_read_speed(args.model), 2)}))
    runs = [("all experts in RAM (no offload)", None)]
    for slots in [int(s) for s in args.slots.split(",")]:
        for policy, prefetch in (("lru", False), ("lru", True), ("lfu", True)):
            opts = OffloadOptions(slots=slots, host_memory=0, policy=policy, miss_policy="swap", prefetch=prefetch)
            runs.append(
                (f"{slots} slots in RAM, the rest from disk, {policy}, prefetch {'on' if prefetch else 'off'}", opts)
            )
    for name, opts in runs:
        drop_page_cache()
        model, _ = load_model(args.model, "bfloat16", "cpu", offload=opts, int8_attention=True)
        row = {"run": name, **decode(model, args.tokens)}
        print(json.dumps(row), flush=True)
        del model


if __name__ == "__main__":
    main()
