"""The calibrated quantize's forward, one layer, with its products in int8 and in the model's dtype.

Loads a bf16 checkpoint memory-mapped (as `quantize` does), cuts the bundled calibration text
into its windows (8192 tokens by default) and times `LayerRunner.run_layer` (the forward that
records each linear's inputs, with the Hessians' Gram products it feeds) for each mode, in the
order given, on a fresh runner each time: `int8` (quant/int8_forward.py, the default) or `model`
(LLAMA4_LOCAL_NO_INT8_CALIBRATION=1). Reports seconds, the int8 products' and the weights'
rounding share, and how many rows each routed expert saw.

    python benchmarks/bench_calibration_forward.py benchmarks/.cache/scout-slice [--modes int8,model,int8] [--layer 0]
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

from llama4_local.loader import load_model  # noqa: E402
from llama4_local.tokenizer import Tokenizer  # noqa: E402
from quant import int8_forward  # noqa: E402
from quant.calibrate import DEFAULT_TOKENS, LayerRunner, calibration_windows  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--modes", default="int8,model,int8")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, "bfloat16", "cpu", mmap=True)
    windows = calibration_windows(Tokenizer(args.model), None, args.tokens)
    spent: dict[str, float] = {}

    def timed(key, fn):
        def run(*a):
            t = time.perf_counter()
            y = fn(*a)
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - t
            return y

        return run

    int8_forward.product = timed("int8 products", int8_forward.product)
    int8_forward.Int8Weight.of_in_out = timed("experts' weights rounded", int8_forward.Int8Weight.of_in_out)
    for mode in args.modes.split(","):
        if mode not in ("int8", "model"):
            raise SystemExit(f"unknown mode {mode!r}: int8 or model")
        os.environ.pop("LLAMA4_LOCAL_NO_INT8_CALIBRATION", None)
        if mode == "model":
            os.environ["LLAMA4_LOCAL_NO_INT8_CALIBRATION"] = "1"
        runner = LayerRunner(model, windows)
        spent.clear()
        t0 = time.perf_counter()
        stats = runner.run_layer(args.layer)
        seconds = time.perf_counter() - t0
        rows = sorted(sum(x.shape[0] for x in xs) for xs in stats.expert_inputs.values())
        row = {"mode": mode, "layer": args.layer, "tokens": stats.tokens, "seconds": round(seconds, 2)}
        print(json.dumps(row | {k: round(v, 2) for k, v in spent.items()} | {"expert_rows": rows}), flush=True)


if __name__ == "__main__":
    main()
