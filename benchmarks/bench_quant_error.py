"""INT4 reconstruction error next to bitsandbytes NF4 and plain round-to-nearest, in one run.

Matrices of Scout's expert shape (8192 x 5120, bf16, scaled like trained weights): Gaussian and
Student-t with 5 degrees of freedom (heavy tails). For group sizes 64 and 128: relative error
||W - deq(q(W))|| / ||W|| of plain symmetric round-to-nearest (compressed-tensors' min-max
scale), our symmetric and asymmetric fits, and NF4 (bitsandbytes, blocksize = group size), and
each one's ratio to NF4. Also the quantizer's speed.

    pip install bitsandbytes && python benchmarks/bench_quant_error.py [--rows 8192] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant.int4 import dequantize_int4, quantize_int4, quantize_rtn, relative_error  # noqa: E402


def nf4_error(w: torch.Tensor, group_size: int) -> float:
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_4bit(w, blocksize=group_size, quant_type="nf4")
    return relative_error(w, bnbf.dequantize_4bit(q, state))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=5120)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    shape = (args.rows, args.cols)
    mats = {
        "gaussian": torch.randn(*shape, generator=g) * 0.02,
        "student_t5": torch.distributions.StudentT(5.0).sample(shape) * 0.02,
    }
    for name, w in mats.items():
        w = w.bfloat16()
        for gs in (64, 128):
            nf4 = nf4_error(w, gs)
            row = {"weights": name, "group_size": gs, "nf4": round(nf4, 5)}
            wd = w.to(args.device)
            for label, fn in (
                ("rtn", lambda: quantize_rtn(wd, gs)),
                ("int4_sym", lambda: quantize_int4(wd, gs, True)),
                ("int4_asym", lambda: quantize_int4(wd, gs, False)),
            ):
                t = time.perf_counter()
                qw = fn()
                if args.device != "cpu":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t
                err = relative_error(w, dequantize_int4(qw).cpu())
                row[label] = round(err, 5)
                row[f"{label}_vs_nf4"] = round(err / nf4, 3)
                row[f"{label}_Mparam_s"] = round(w.numel() / dt / 1e6, 1)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
