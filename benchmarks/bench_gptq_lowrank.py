"""GPTQ of one routed expert at Scout's shapes: through the Hessian's factor, and through the
calibration rows (quant/gptq_lowrank.py), alternated; --updates times both walks with
each precision of their update products (quant/gptq.py: float32, int8, bfloat16), --gram int8
adds the Hessian from the int8 Gram products (quant/int8_gram_kernel.py) beside the float one,
and each result's output error on the rows, ||(W - Q) x|| / ||W x||, is printed. --heavy draws
the rows heavy-tailed (Student-t with 3 degrees of freedom, every 64th row 30x: BOS-like tokens)
instead of Gaussian.

Scout routes 8192 calibration tokens over 16 experts, about 512 rows each (unevenly). For each
of gate (or up: 8192 x 5120) and down (5120 x 8192) this times the feedback (Gram product and
Cholesky factor, or the rows' form) and the GPTQ walk, on random weights and rows with uneven
feature scales, best of --reps, and prints the per-expert total (gate and up share a feedback).

    python benchmarks/bench_gptq_lowrank.py [--rows 512] [--reps 3] [--threads 2] [--updates float32,int8]
        [--gram int8] [--heavy]
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
from quant.int4 import dequantize_int4  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--updates", default="", help="comma-separated: float32, int8, bfloat16 (default: the host's)")
    ap.add_argument("--gram", default="", help="int8: also the Hessian from the int8 Gram products")
    ap.add_argument("--heavy", action="store_true", help="heavy-tailed rows with BOS-like outliers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    best: dict[tuple[str, str, str], float] = {}
    errors: dict[tuple[str, str], float] = {}
    ups = [u for u in args.updates.split(",") if u]
    paths = [f"hessian:{u}" for u in ups] or ["hessian"]
    if args.gram == "int8":
        paths += [p + "+gram8" for p in paths]
    paths += [f"rows:{u}" for u in ups] or ["rows"]
    for _ in range(args.reps):
        for kind, (inputs, outputs) in {"gate": (5120, 8192), "down": (8192, 5120)}.items():
            g = torch.Generator().manual_seed(0)
            x = rows(args.rows, inputs, g, args.heavy)
            w = torch.randn(outputs, inputs, generator=g).bfloat16()
            for path in paths:
                if path.startswith("hessian"):
                    int8 = path.endswith("+gram8")
                    f, t_f = timed(lambda: error_feedback(gram_lower(x, int8=int8), consume=True))
                else:
                    f, t_f = timed(lambda: lowrank_feedback(x, DAMP))
                updates = getattr(torch, path.removesuffix("+gram8").split(":")[1]) if ":" in path else None
                q, t_q = timed(lambda: gptq_int4(w, f, 128, updates=updates))
                del f
                errors[(kind, path)] = output_error(w, q, x)
                for part, t in (("feedback", t_f), ("gptq", t_q)):
                    key = (kind, path, part)
                    best[key] = min(best.get(key, t), t)
    print(f"one routed expert at Scout's shapes, {args.rows} rows, {args.threads} threads, best of {args.reps} (s)")
    print("| linear | path | feedback | GPTQ walk | total | output error |")
    print("|---|---|---|---|---|---|")
    expert = {}
    for kind in ("gate", "down"):
        for path in paths:
            f, q = best[(kind, path, "feedback")], best[(kind, path, "gptq")]
            print(f"| {kind} | {path} | {f:.2f} | {q:.2f} | {f + q:.2f} | {errors[(kind, path)]:.5f} |")
            # gate and up share the feedback: an expert is one gate feedback, two walks, and down
            expert[path] = expert.get(path, 0.0) + (f + 2 * q if kind == "gate" else f + q)
    per = ", ".join(f"{path} {t:.2f} s ({expert[paths[0]] / t:.2f}x)" for path, t in expert.items())
    print(f"\nper expert (gate + up + down): {per}")


def rows(n: int, inputs: int, g: torch.Generator, heavy: bool) -> torch.Tensor:
    """Calibration-like rows [n, inputs] (bf16) with uneven feature scales; `heavy`: Student-t(3)
    entries and every 64th row 30x larger."""
    if heavy:
        x = torch.distributions.StudentT(3.0).sample((n, inputs))  # (the global generator: main seeds it)
        x[::64] *= 30
    else:
        x = torch.randn(n, inputs, generator=g)
    return (x * torch.linspace(0.2, 3.0, inputs)).bfloat16()


def output_error(w: torch.Tensor, q, x: torch.Tensor) -> float:
    """||(W - Q) x|| / ||W x|| over the rows x."""
    wf, xf = w.float(), x.float()
    ref = xf @ wf.t()
    return float((xf @ (wf - dequantize_int4(q, torch.float32)).t()).norm() / ref.norm())


if __name__ == "__main__":
    main()
