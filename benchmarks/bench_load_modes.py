"""How a CPU load places an INT4 checkpoint's weights, and what each way costs: load time and decode.

Each run is a fresh process (load, an 8-token warm-up, then 32 greedy single-token steps three
times, the best kept), and the modes alternate `--reps` times:

- `default`: what `prompt`/`chat`/`serve` do without --mmap/--no-mmap (the mapping where the page
  cache serves it in 2 MB pages, llama4_local/pages.py; else a copy);
- `mmap`: --mmap, the mapping whatever its pages;
- `copy-thp`: --no-mmap as the CLI runs it (THP_MEM_ALLOC_ENABLE=1: torch backs the copies with
  transparent huge pages);
- `copy-4k`: --no-mmap without it (copies in 4 KB pages).

Prints each mode's load seconds and decode tok/s (median and best over the reps), and whether
the default kept the mapping.

    python benchmarks/bench_load_modes.py [--model DIR] [--threads 2] [--reps 4]

Default model: the Scout-width slice's INT4 checkpoint that bench_vs_llamacpp.py writes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"default": (None, "1"), "mmap": (True, "1"), "copy-thp": (False, "1"), "copy-4k": (False, "0")}


def child(spec: dict) -> None:
    """One run: load with the given mmap choice, time decode, print JSON."""
    import torch

    sys.path.insert(0, str(ROOT))
    from llama4_local.loader import file_mappings, load_model
    from quant import cpu_kernel

    torch.set_num_threads(spec["threads"])
    cpu_kernel.available()  # a (re)build of the extension is not load time
    t0 = time.perf_counter()
    model, _ = load_model(spec["model"], "bfloat16", "cpu", mmap=spec["mmap"], int8_attention=True)
    load = time.perf_counter() - t0
    maps = [(lo, hi) for lo, hi, _ in file_mappings()]
    big = max((t for t in model.buffers() if t.numel()), key=lambda t: t.numel() * t.element_size())
    mapped = any(lo <= big.data_ptr() < hi for lo, hi in maps)
    best = 0.0
    with torch.inference_mode():
        model(torch.arange(1, 9), model.new_cache(8))
        for _ in range(3):
            cache, token = model.new_cache(40), torch.tensor([1])
            t0 = time.perf_counter()
            for _ in range(32):
                token = model(token, cache)[-1].argmax().reshape(1)
            best = max(best, 32 / (time.perf_counter() - t0))
    print(json.dumps({"load_s": load, "decode": best, "mapped": mapped}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "benchmarks" / ".cache" / "scout-slice-int4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if not args.model.is_dir():
        sys.exit(f"error: {args.model} is not a checkpoint directory; run benchmarks/bench_vs_llamacpp.py first")
    modes = args.modes.split(",")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for rep in range(args.reps):
        for mode in modes[rep % len(modes) :] + modes[: rep % len(modes)]:
            mmap, thp = MODES[mode]
            spec = {"model": str(args.model), "threads": args.threads, "mmap": mmap}
            env = {**os.environ, "THP_MEM_ALLOC_ENABLE": thp}
            cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[mode].append(r)
            print(f"rep {rep + 1} {mode:9s} load {r['load_s']:5.2f} s decode {r['decode']:5.1f} tok/s "
                  f"{'mapped' if r['mapped'] else 'copied'}", file=sys.stderr, flush=True)  # fmt: skip
    print(f"\n{args.model.name}, {args.threads} threads, {args.reps} reps (fresh process each, alternated)")
    print("| mode | load s (median) | decode tok/s (median) | decode (best) | weights |")
    print("|---|---|---|---|---|")
    for mode, rs in results.items():
        where = "mapped" if all(r["mapped"] for r in rs) else "copied" if not any(r["mapped"] for r in rs) else "mixed"
        load = statistics.median(r["load_s"] for r in rs)
        dec = [r["decode"] for r in rs]
        print(f"| {mode} | {load:.2f} | {statistics.median(dec):.1f} | {max(dec):.1f} | {where} |")


if __name__ == "__main__":
    main()
