"""Scout's lm_head at decode on the CPU: bf16 (what a bf16 checkpoint reads) against the INT8
copy a quantized checkpoint's CPU run makes at load when it has no sidecar
(quant.kernels.int8_lm_head) and the Q6 blocks of the default quantize's sidecar (quant/head.py),
one token.

Scout's vocabulary is 202048 and its hidden size 5120, so the lm_head is 2.07 GB of bf16 that
every decoded token reads; the benchmark slice of bench_vs_llamacpp.py has a 600-token vocabulary
and does not show it. Random weights (the speed does not depend on them), in memory as a loaded
model's are (4 KB pages; huge pages with LLAMA4_LOCAL_HUGE_PAGES=1, as copy_mapped_weights then
places them). Also the load-time cost of the INT8 copy.

    python benchmarks/bench_lm_head.py [--threads 1,2] [--vocab 202048]
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/bench_lm_head.py --stream-prefetch 2048:t0,4096:t1 [--rounds 4]

`--stream-prefetch`: instead, the Q6 head alone with each prefetch setting of its stream (how far
ahead, which hint), alternated (THP_MEM_ALLOC_ENABLE=1: in 2 MB pages, as a run maps its sidecar).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import best_time, prefetch_settings, spread  # noqa: E402

from llama4_local.loader import _page_slots  # noqa: E402
from quant import cpu_kernel, q6  # noqa: E402
from quant.head import Q6Linear  # noqa: E402
from quant.kernels import Int8Linear  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--vocab", type=int, default=202048)
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--stream-prefetch",
        help="instead: the Q6 head's GB/s with each prefetch setting, BYTES:HINT (t0, t1, t2, nta), alternated",
    )
    ap.add_argument("--rounds", type=int, default=4, help="with --stream-prefetch: rounds of the settings")
    args = ap.parse_args()
    if not cpu_kernel.available():
        sys.exit("our CPU kernel is not available here (needs AVX2/FMA and a C++ compiler)")
    cpu = torch.device("cpu")
    w = torch.randn(args.vocab, args.hidden, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x = torch.randn(1, args.hidden, dtype=torch.bfloat16)
    if args.stream_prefetch:
        return sweep_q6(w, x, cpu, args)
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for row in run(w, x, cpu, args.reps):
            print(json.dumps({"threads": threads, **row}))


def run(w: torch.Tensor, x: torch.Tensor, cpu: torch.device, reps: int) -> list[dict]:
    t0 = time.perf_counter()
    head = Int8Linear(w)
    rows = [{"int8 copy at load (s)": round(time.perf_counter() - t0, 2)}]
    six = Q6Linear(q6.pack(*q6.rtn(w)), w.shape[1], w.dtype)  # rounded alone: the same bytes to read as GPTQ's
    tensors = [w, head.qweight, head.scales, six.q6]
    slots = _page_slots(tensors, True) if os.environ.get("LLAMA4_LOCAL_HUGE_PAGES") == "1" else {}
    wb, head.qweight, head.scales, six.q6 = (
        slots[t.data_ptr()].copy_(t) if t.data_ptr() in slots else t for t in tensors
    )
    sides = {
        "bf16": (lambda: cpu_kernel.half_mv(x, wb), wb.numel() * 2),
        "int8 (Q8_0)": (lambda: head(x), head.qweight.numel() + head.scales.numel() * 4),
        "Q6 (the sidecar)": (lambda: six(x), six.q6.numel()),
    }
    for name, (fn, nbytes) in sides.items():
        seconds = best_time(fn, cpu, reps)
        rows.append({"lm_head": name, "ms": round(seconds * 1e3, 1), "GB": round(nbytes / 1e9, 2)})
        rows[-1]["GB_s"] = round(nbytes / seconds / 1e9, 1)
    return rows


def sweep_q6(w: torch.Tensor, x: torch.Tensor, cpu: torch.device, args) -> None:
    """The Q6 head's decode GB/s with each prefetch setting of its stream, alternated in rounds
    (the same results whatever the setting: checked each time)."""
    six = Q6Linear(q6.pack(*q6.rtn(w)), w.shape[1], w.dtype)
    want, settings = six(x), prefetch_settings(args.stream_prefetch)
    print(json.dumps({"default": cpu_kernel.stream_prefetch_default("q6")}))
    try:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            runs: dict[str, list[float]] = {f"{a}:{h}": [] for a, h in settings}
            for _ in range(args.rounds):
                for ahead, hint in settings:
                    cpu_kernel.set_stream_prefetch(ahead, hint, "q6")
                    if not torch.equal(six(x), want):
                        sys.exit(f"the Q6 head's result moved with prefetch {ahead}:{hint}")
                    runs[f"{ahead}:{hint}"].append(six.q6.numel() / best_time(lambda: six(x), cpu, args.reps) / 1e9)
            for name, v in runs.items():
                print(json.dumps({"threads": threads, "q6_prefetch": name, **spread(v)}))
    finally:
        cpu_kernel.set_stream_prefetch(stream="q6")


if __name__ == "__main__":
    main()
