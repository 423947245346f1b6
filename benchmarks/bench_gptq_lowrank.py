"""GPTQ of one routed expert at Scout's shapes: through the Hessian's factor, and through the
calibration rows (quant/gptq_lowrank.py), alternated.

Scout routes 8192 calibration tokens over 16 experts, about 512 rows each (unevenly). For each
of gate (or up: 8192 x 5120) and down (5120 x 8192) this times the feedback (Gram product and
Cholesky factor, or the rows' form) and the GPTQ walk, on random weights and rows with uneven
feature scales, best of --reps, and prints the per-expert total (gate and up share a feedback).

    python benchmarks/bench_gptq_lowrank.py [--rows 512] [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant.gptq import DAMP, error_feedback, gptq_int4, gram_lower  # noqa: E402
from quant.gptq_lowrank import lowrank_feedback  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    best: dict[tuple[str, str, str], float] = {}
    for _ in range(args.reps):
        for kind, (inputs, outputs) in {"gate": (5120, 8192), "down": (8192, 5120)}.items():
            g = torch.Generator().manual_seed(0)
            x = (torch.randn(args.rows, inputs, generator=g) * torch.linspace(0.2, 3.0, inputs)).bfloat16()
            w = torch.randn(outputs, inputs, generator=g).bfloat16()
            for path in ("hessian", "rows"):
                if path == "hessian":
                    f, t_f = timed(lambda: error_feedback(gram_lower(x), consume=True))
                else:
                    f, t_f = timed(lambda: lowrank_feedback(x, DAMP))
                _, t_q = timed(lambda: gptq_int4(w, f, 128))
                del f
                for part, t in (("feedback", t_f), ("gptq", t_q)):
                    key = (kind, path, part)
                    best[key] = min(best.get(key, t), t)
    print(f"one routed expert at Scout's shapes, {args.rows} rows, {args.threads} threads, best of {args.reps} (s)")
    print("| linear | path | feedback | GPTQ walk | total |")
    print("|---|---|---|---|---|")
    expert = {}
    for kind in ("gate", "down"):
        for path in ("hessian", "rows"):
            f, q = best[(kind, path, "feedback")], best[(kind, path, "gptq")]
            print(f"| {kind} | {path} | {f:.2f} | {q:.2f} | {f + q:.2f} |")
            # gate and up share the feedback: an expert is one gate feedback, two walks, and down
            expert[path] = expert.get(path, 0.0) + (f + 2 * q if kind == "gate" else f + q)
    print(
        f"\nper expert (gate + up + down): hessian {expert['hessian']:.2f} s, rows {expert['rows']:.2f} s, "
        f"{expert['hessian'] / expert['rows']:.2f}x"
    )


if __name__ == "__main__":
    main()
