"""Time of one sampled token's draw at Scout's vocabulary: our Sampler against the full-sort form.

The full-sort form is what the Sampler did before session 25 and what transformers' top-p does:
sort the whole vocabulary, sum the tail, mask, softmax, draw over the whole vocabulary. Logits
are random normal times a scale: a large scale is peaked (most of the mass in a few tokens, as
a trained model's logits mostly are), a small one flat.

    python benchmarks/bench_sampling.py [--vocab 202048] [--threads 1,2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import best_time  # noqa: E402

from llama4_local.sampling import Sampler, SamplingParams  # noqa: E402


def full_sort_draw(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    logits = logits / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - p.top_p
        drop[-1] = False
        logits = logits.masked_fill(drop.scatter(0, sorted_idx, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=gen))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=202048)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    device = torch.device(args.device)
    cases = [
        ("default (T 0.6, top-p 0.9)", SamplingParams(seed=0)),
        ("top-k 40 + top-p 0.9", SamplingParams(seed=0, top_k=40)),
        ("no filter (top-p 1)", SamplingParams(seed=0, top_p=1.0)),
    ]
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name, params in cases:
            for scale in (8.0, 3.0, 0.3):
                logits = torch.randn(args.vocab, generator=torch.Generator().manual_seed(0)).to(device) * scale
                ours = Sampler(params, device)
                gen = torch.Generator(device=device).manual_seed(0)
                t_ours = best_time(lambda: ours(logits, None), device, args.reps)
                t_sort = best_time(lambda: full_sort_draw(logits, params, gen), device, args.reps)
                row = {
                    "threads": threads,
                    "params": name,
                    "logit_scale": scale,
                    "ours_ms": round(t_ours * 1e3, 3),
                    "full_sort_ms": round(t_sort * 1e3, 3),
                    "speedup": round(t_sort / t_ours, 2),
                }
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
