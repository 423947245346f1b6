"""Decode and prefill of the INT4 checkpoint against the unquantized one, in one run.

Uses bench_runner's mid-sized checkpoint (hidden 1024, 16 experts of 3 x 1024 x 1024, 8 layers),
quantizes its experts and shared experts (INT4, group 128, symmetric; the plain fit, since the
random checkpoint has no tokenizer to calibrate with, and GPTQ changes which integers are stored,
not the speed) with `quant.quantize`, and times this runner on both in bfloat16. On a CPU where
our AVX2 kernel serves, INT4 is timed twice: with int8 activations (what bf16 runs use) and with
float ones.

    python benchmarks/bench_int4_decode.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_runner import time_ours, write_checkpoint  # noqa: E402
from timing import copy_bandwidth  # noqa: E402

from quant.kernels import use_cpu_path  # noqa: E402
from quant.quantize import QuantizeOptions, quantize_checkpoint  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    bw = copy_bandwidth(device)
    print(json.dumps({"device": args.device, "threads": torch.get_num_threads(), "copy_GB_s": round(bw / 1e9, 2)}))
    prompt = torch.randint(3, 32000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        src, q = Path(tmp) / "bf16", Path(tmp) / "int4"
        write_checkpoint(src)
        quantize_checkpoint(src, q, QuantizeOptions(device=args.device, calibrate=False))
        runs = [("bfloat16", src, None), ("int4", q, None)]
        if device.type == "cpu":
            runs.append(("int4 (float activations)", q, lambda m: use_cpu_path(m, "avx2")))
        for name, path, prepare in runs:
            r = time_ours(path, "bfloat16", device, prompt, 32, args.reps, prepare)
            row = {
                "weights": name,
                "prefill_tok_s": round(r["prefill_tok_s"], 1),
                "decode_tok_s": round(r["decode_tok_s"], 1),
                "MB_per_token": round(r["bytes_per_token"] / 1e6, 1),
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
