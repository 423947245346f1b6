"""A checkpoint of ours decoding with each INT4 stream prefetch setting, alternated in one process.

bench_cpu_threads.py --stream-prefetch times the kernel alone on Scout's expert matrices; this
times what a user sees: `--prompt` tokens of prefill and `--gen` decode steps of a loaded
checkpoint (the issue's slice by default, timed as bench_vs_llamacpp.py times ours), each
setting (BYTES:HINT, hint t0, t1, t2 or nta) of the `--streams` named (the INT4 weights', the Q6
lm_head's; the others keep this CPU's default) in turn, `--reps` rounds. Prefetching changes no
result, only where the weights' lines wait; the medians and ranges are printed per setting.

    python benchmarks/bench_stream_prefetch.py [--model DIR] [--settings 4096:t0,4096:t1]
        [--streams int4,q6] [--threads 1,2] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vs_llamacpp import CACHE, Ours  # noqa: E402  (sets THP_MEM_ALLOC_ENABLE before torch)
from timing import prefetch_settings, spread  # noqa: E402

from quant import cpu_kernel  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=CACHE / "scout-slice-int4")
    ap.add_argument("--settings", default="4096:t0,4096:t1", help="BYTES:HINT, comma-separated")
    ap.add_argument("--streams", default="int4", help="which streams each setting applies to: int4, q6")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    args = ap.parse_args()
    if not args.model.is_dir():
        sys.exit(f"no checkpoint at {args.model}: run bench_vs_llamacpp.py once to write the slice, or pass --model")
    if not cpu_kernel.available():
        sys.exit("the CPU kernel is not built here: nothing to set")
    settings = prefetch_settings(args.settings)
    streams = args.streams.split(",")
    if not set(streams) <= set(cpu_kernel.STREAMS):
        sys.exit(f"--streams: some of {', '.join(cpu_kernel.STREAMS)}")
    ours = Ours(args.model)
    defaults = {stream: cpu_kernel.stream_prefetch_default(stream) for stream in streams}
    print(json.dumps({"default": defaults, "model": str(args.model)}), flush=True)
    try:
        for threads in (int(t) for t in args.threads.split(",")):
            ours.run(threads, 16, 8)  # warm-up
            runs: dict[str, list[dict]] = {f"{a}:{h}": [] for a, h in settings}
            for _ in range(args.reps):
                for ahead, hint in settings:
                    for stream in streams:
                        cpu_kernel.set_stream_prefetch(ahead, hint, stream)
                    runs[f"{ahead}:{hint}"].append(ours.run(threads, args.prompt, args.gen))
            for name, rs in runs.items():
                row = {key: spread([r[key] for r in rs]) for key in ("prefill", "decode")}
                print(json.dumps({"threads": threads, "setting": name, **row}), flush=True)
    finally:
        for stream in streams:
            cpu_kernel.set_stream_prefetch(stream=stream)


if __name__ == "__main__":
    main()
