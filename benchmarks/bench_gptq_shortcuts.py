"""What less GPTQ arithmetic would cost: KL of the default quantize with its Hessians approximated.

GPTQ's arithmetic is the Hessians' Gram products (T N^2), their factors (N^3) and the walk's
updates (O N^2). Two ways to less of it, each scored as bench_quant_kl.py scores the default
(mean KL against the float32 original over the held-out text, top-1 agreement):

- block:B  every Hessian cut to its diagonal blocks of B inputs (the Gram products, factors and
  updates of those blocks alone: about N / B times less of each);
- rank:K   every Hessian replaced by its K largest eigen-directions plus the diagonal that keeps
  H's own diagonal (GPTQ through K rows, quant/gptq_lowrank.py: 4 K N O for the updates, which
  pays only from K < N / 4).

Both replace the Hessian that error_feedback factors (quant/calibrate.py's), so each run is the
default quantize otherwise; a Hessian as wide as B or K is left as it is. Fewer calibration
tokens, the third way (less forward and Gram), is bench_quant_kl.py --tokens; `--tokens N`
here runs every way at N of them.

And one way to more from the same tokens, for routed experts that see few rows (Scout's ~512
of 8192 against 5120 inputs):

- shrink:L  a routed expert's gate/up Hessian plus L times its share of the rows times the
  Hessian of every routed row of the layer (the same hidden states, all experts' tokens), a
  prior for the directions its own rows leave unseen; its down projection's as it is.

    python benchmarks/bench_gptq_shortcuts.py [--model benchmarks/.cache/small-llama4-256]
        [--ways block:128,block:64,rank:64,rank:32,shrink:0.3] [--tokens N] [--max-windows 60]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import quant.calibrate as calibrate  # noqa: E402
import quant.calibrated as calibrated  # noqa: E402
from llama4_local.evaluate import evaluate  # noqa: E402
from llama4_local.loader import load_model  # noqa: E402
from llama4_local.tokenizer import Tokenizer  # noqa: E402
from quant.gptq import DAMP, error_feedback  # noqa: E402
from quant.quantize import QuantizeOptions, quantize_checkpoint  # noqa: E402


def symmetric(h: torch.Tensor) -> torch.Tensor:
    """H whole (float64) from the lower triangle error_feedback reads."""
    low = torch.tril(h).double()
    return low + torch.tril(low, -1).mT


def block_diagonal(b: int):
    def feedback(h, damp=DAMP, consume=False):
        n = h.shape[0]
        if b >= n:
            return error_feedback(h, damp, consume)
        full, f = symmetric(h), torch.zeros(n, n)
        for i in range(0, n, b):
            j = min(n, i + b)
            f[i:j, i:j] = error_feedback(full[i:j, i:j].float().contiguous(), damp)
        return f

    return feedback


def low_rank(k: int):
    def feedback(h, damp=DAMP, consume=False):
        if k >= h.shape[0]:
            return error_feedback(h, damp, consume)
        full = symmetric(h)
        values, vectors = torch.linalg.eigh(full)
        top = (vectors[:, -k:] * values[-k:]) @ vectors[:, -k:].mT
        top.diagonal().copy_(full.diagonal())  # H's own diagonal kept
        return error_feedback(top.float().contiguous(), damp)

    return feedback


def shrunk_experts(lam: float):
    """calibrated._expert_factors with the gate/up Hessian shrunk toward the layer's (shrink:L)."""

    def expert_factors(stats, e):
        rows = stats.expert_rows(e)
        if rows is None:
            return None, None
        if not hasattr(stats, "routed_gram"):  # once per layer, not once per expert
            every = torch.cat([torch.cat(v) for v in stats.expert_inputs.values()]).float()
            stats.routed_gram = (every.mT @ every, every.shape[0])
        gram, count = stats.routed_gram
        x = rows[0].float()
        h = x.mT @ x + lam * (x.shape[0] / count) * gram
        return calibrate.factor_or_none(h.contiguous(), consume=True), calibrated._feedback(rows[1])

    return expert_factors


WAYS = {"block": block_diagonal, "rank": low_rank}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "benchmarks" / ".cache" / "small-llama4-256")
    ap.add_argument("--ways", default="block:128,block:64,block:32,rank:64,rank:32,rank:16")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=None, help="calibration tokens (default: quantize's)")
    args = ap.parse_args()
    tok = Tokenizer(args.model)
    ids = tok.encode((args.model / "eval.txt").read_text(), add_special_tokens=False)
    ref, _ = load_model(args.model, "float32", "cpu")
    opts = QuantizeOptions(calibration_tokens=args.tokens) if args.tokens else QuantizeOptions()
    expert_factors = calibrated._expert_factors
    for way in ["full", *args.ways.split(",")]:
        kind, _, size = way.partition(":")
        calibrate.error_feedback = WAYS[kind](int(size)) if kind in WAYS else error_feedback
        calibrated._expert_factors = shrunk_experts(float(size)) if kind == "shrink" else expert_factors
        with tempfile.TemporaryDirectory() as tmp:
            quantize_checkpoint(args.model, Path(tmp) / "q", opts)
            model = load_model(Path(tmp) / "q", "float32", "cpu")[0]
            r = evaluate(model, ids, args.ctx, tok.bos_id, ref, args.max_windows)
        kl, top1 = round(r.kl_mean, 6), round(r.top1_agreement, 4)
        row = {"hessian": way, "tokens": opts.calibration_tokens, "kl_mean": kl, "top1": top1}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
