"""Scout's quantize, layer by layer: the default (calibrated) quantize of Scout-sized layers, timed
by part, and what that makes for Scout's 48 layers on this machine.

Writes a checkpoint of Scout's real layers (benchmarks/scout_slice.py: hidden 5120, 16 routed
experts of 5120 x 8192 and a shared one, 40 / 8 heads; --layers 2 by default, 8.4 GB of bf16,
random weights) and runs `quant.quantize` on it with the default options (GPTQ on the bundled
calibration text, 8192 tokens), timing each layer's calibration forward (the last layer's runs
no down projections: nothing reads its output) and its quantization, and within that the
routed experts'. Scout's estimate is 47 layers like the first one plus one like the last.
Random routing is less even than a trained router's, so more experts than Scout's take the
Hessian's path (quant/gptq_lowrank.py's `pays`); the counts are printed.

    python benchmarks/bench_quantize_layer.py [--layers 2] [--threads N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quant import calibrate, calibrated  # noqa: E402
from quant.gptq_lowrank import LowRankFeedback  # noqa: E402
from quant.quantize import QuantizeOptions, quantize_checkpoint  # noqa: E402

SCOUT_LAYERS = 48


def timed(record: list, fn):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            record.append(time.perf_counter() - t0)

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="write (or reuse) the source checkpoint here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        src = args.keep or Path(tmp) / "src"
        if not (src / "config.json").exists():
            from scout_slice import write_slice

            write_slice(src, layers=args.layers, experts=16)
        forward, layer, experts, paths = [], [], [], {"rows": 0, "hessian": 0}
        run_layer, quantize_layer = calibrate.LayerRunner.run_layer, calibrated._quantize_layer
        calibrate.LayerRunner.run_layer = timed(forward, run_layer)
        calibrated._quantize_layer = timed(layer, quantize_layer)
        expert = calibrated._expert
        calibrated._expert = timed(experts, expert)
        pays = LowRankFeedback.pays

        def counted(rows, inputs, updates=torch.bfloat16):
            ok = pays(rows, inputs, updates)
            paths["rows" if ok else "hessian"] += 1
            return ok

        LowRankFeedback.pays = staticmethod(counted)
        t0 = time.perf_counter()
        try:
            quantize_checkpoint(src, Path(tmp) / "out", QuantizeOptions())
        finally:
            calibrate.LayerRunner.run_layer, calibrated._quantize_layer, calibrated._expert = (
                run_layer,
                quantize_layer,
                expert,
            )
            LowRankFeedback.pays = staticmethod(pays)
        total = time.perf_counter() - t0
    n = len(forward)
    per_layer = [
        {
            "layer": i,
            "forward_s": round(forward[i], 1),
            "quantize_s": round(layer[i], 1),
            "routed_experts_s": round(sum(experts[16 * i : 16 * i + 16]), 1),
        }
        for i in range(n)
    ]
    for row in per_layer:
        print(json.dumps(row))
    first = forward[0] + layer[0]
    scout = (SCOUT_LAYERS - 1) * first + forward[-1] + layer[-1]
    rest = total - sum(forward) - sum(layer)
    print(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "total_s": round(total, 1),
                "other_s": round(rest, 1),
                "expert_inputs_through": paths,
                "scout_estimate_h": round((scout + rest / n * SCOUT_LAYERS) / 3600, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
