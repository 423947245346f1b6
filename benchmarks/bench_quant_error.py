"""INT4 reconstruction error next to bitsandbytes NF4 and plain round-to-nearest, in one run.

Matrices of Scout's expert shape (8192 x 5120, bf16, scaled like trained weights): Gaussian and
Student-t with 5 degrees of freedom (heavy tails). For group sizes 64 and 128: relative error
||W - deq(q(W))|| / ||W|| of plain symmetric round-to-nearest (compressed-tensors' min-max
scale), our symmetric and asymmetric fits, and NF4 (bitsandbytes, blocksize = group size), and
each one's ratio to NF4. Also the quantizer's speed.

With `--optimum ROWS`, also the best any uniform INT4 grid in this format (integer zero point,
bf16 scale) can do on the first ROWS rows: an exhaustive search per group over all 16 zero
points x 48 scales, each refined by least squares. It bounds what a better fit could gain.

With `--checkpoint DIR`, instead the expert tensors of a real checkpoint (routed experts, each
as the linear [out, in] it is, and shared experts), the error over all of them together
(sqrt of summed squared errors over sqrt of summed squares).

    pip install bitsandbytes && python benchmarks/bench_quant_error.py [--rows 8192] [--device cpu] [--optimum 256]
    python benchmarks/bench_quant_error.py --checkpoint benchmarks/small-llama4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant.int4 import (  # noqa: E402
    QMAX,
    QMIN,
    _err,
    _grouped,
    dequantize_int4,
    quantize_int4,
    quantize_rtn,
    relative_error,  # noqa: E402
)
from quant.quantize import expert_weights  # noqa: E402


def nf4_error(w: torch.Tensor, group_size: int) -> float:
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_4bit(w, blocksize=group_size, quant_type="nf4")
    return relative_error(w, bnbf.dequantize_4bit(q, state))


def optimum_error(w: torch.Tensor, group_size: int, n_scales: int = 48, iters: int = 3) -> float:
    """Relative error of the best uniform grid per group (integer zero, bf16 scale), by exhaustive search."""
    wg = _grouped(w, group_size)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    best = None
    for z in range(QMIN, QMAX + 1):
        top, bottom = QMAX - z, QMIN - z  # the grid spans s * bottom .. s * top
        reach = torch.zeros_like(hi)
        if top > 0:
            reach = torch.maximum(reach, hi / top)
        if bottom < 0:
            reach = torch.maximum(reach, lo / bottom)
        for k in range(n_scales):
            s = (reach * (0.45 + 0.6 * k / (n_scales - 1))).clamp_min(1e-12)
            q = torch.clamp(torch.round(wg / s + z), QMIN, QMAX)
            for _ in range(iters):
                d = q - z
                s = ((wg * d).sum(-1, keepdim=True) / d.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)).clamp_min(1e-12)
                s = s.to(w.dtype).float()
                q = torch.clamp(torch.round(wg / s + z), QMIN, QMAX)
            e = _err(wg, s, z, q)
            zt = torch.full_like(s, z)
            if best is None:
                best = [e, s, zt]
            else:
                b = e < best[0]
                best = [torch.min(e, best[0]), torch.where(b, s, best[1]), torch.where(b, zt, best[2])]
    _, s, z = best
    q = torch.clamp(torch.round(wg / s + z), QMIN, QMAX)
    return relative_error(w, (s * (q - z)).reshape(w.shape).to(w.dtype))


def checkpoint_errors(model_dir: Path) -> None:
    import bitsandbytes.functional as bnbf

    mats = [w.bfloat16() for w in expert_weights(model_dir)]
    print(json.dumps({"checkpoint": str(model_dir), "matrices": len(mats), "params": sum(w.numel() for w in mats)}))
    for gs in (64, 128):
        sq = {"nf4": 0.0, "rtn": 0.0, "int4_sym": 0.0, "int4_asym": 0.0}
        norm = 0.0
        for w in mats:
            wf = w.float()
            norm += wf.pow(2).sum().item()
            q, state = bnbf.quantize_4bit(w, blocksize=gs, quant_type="nf4")
            deq = {
                "nf4": bnbf.dequantize_4bit(q, state),
                "rtn": dequantize_int4(quantize_rtn(w, gs)),
                "int4_sym": dequantize_int4(quantize_int4(w, gs, True)),
                "int4_asym": dequantize_int4(quantize_int4(w, gs, False)),
            }
            for k, d in deq.items():
                sq[k] += (wf - d.float()).pow(2).sum().item()
        row = {"weights": "checkpoint experts", "group_size": gs}
        for k, v in sq.items():
            row[k] = round((v / norm) ** 0.5, 5)
            if k != "nf4":
                row[f"{k}_vs_nf4"] = round((v / sq["nf4"]) ** 0.5, 3)
        print(json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=5120)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--optimum", type=int, default=0, metavar="ROWS", help="also the exhaustive optimum on ROWS rows")
    ap.add_argument("--checkpoint", type=Path, help="measure on this checkpoint's expert tensors instead")
    args = ap.parse_args()
    if args.checkpoint:
        return checkpoint_errors(args.checkpoint)
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
            if args.optimum:
                part = w[: args.optimum]
                nf4_part = nf4_error(part, gs)
                asym_part = relative_error(part, dequantize_int4(quantize_int4(part, gs, False)))
                row["rows_for_optimum"] = args.optimum
                row["asym_vs_nf4_on_those_rows"] = round(asym_part / nf4_part, 4)
                row["optimum_vs_nf4"] = round(optimum_error(part, gs) / nf4_part, 4)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
