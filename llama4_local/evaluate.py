"""Perplexity, and KL divergence against a reference model (quantization quality).

The text is tokenized once and cut into windows of `ctx` tokens, each starting with BOS;
every next-token prediction inside a window is scored. With a reference model, both models
see the same windows and, per position, we take KL(reference || model) over the whole
vocabulary and whether their top-1 tokens agree: the measures llama.cpp's
`llama-perplexity --kl-divergence` reports.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import UserError
from .model import Llama4Text


@dataclass
class EvalResult:
    tokens: int  # predictions scored
    windows: int
    perplexity: float
    reference_perplexity: float | None = None
    kl_mean: float | None = None
    kl_median: float | None = None
    kl_max: float | None = None
    kl_p99: float | None = None
    top1_agreement: float | None = None

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def windows(ids: list[int], ctx: int, bos: int | None, limit: int | None = None) -> Iterator[list[int]]:
    body = ctx - (1 if bos is not None else 0)
    if body < 2:
        raise UserError(f"--ctx must be at least 3, got {ctx}")
    count = 0
    for s in range(0, len(ids) - 1, body):
        chunk = ids[s : s + body]
        if len(chunk) < 2:
            break
        yield ([bos] if bos is not None else []) + chunk
        count += 1
        if limit and count >= limit:
            return


def _log_probs(model: Llama4Text, ids: list[int], piece: int) -> torch.Tensor:
    """log softmax of every position's next-token logits [T, V], float32 on the CPU."""
    device = model.device
    x = torch.tensor(ids, dtype=torch.long, device=device)
    cache = model.new_cache(len(ids))
    out = [
        torch.log_softmax(model(x[s : s + piece], cache, last_only=False), -1).cpu() for s in range(0, len(ids), piece)
    ]
    return torch.cat(out)


def evaluate(
    model: Llama4Text,
    ids: list[int],
    ctx: int,
    bos: int | None,
    reference: Llama4Text | None = None,
    max_windows: int | None = None,
    piece: int = 512,
) -> EvalResult:
    if len(ids) < 2:
        raise UserError("the text is too short to evaluate: it needs at least 2 tokens")
    nll, ref_nll, n, n_win = 0.0, 0.0, 0, 0
    kls, agree = [], 0
    for win in windows(ids, ctx, bos, max_windows):
        targets = torch.tensor(win[1:])
        lp = _log_probs(model, win, piece)[:-1]  # [T-1, V]: position i predicts win[i+1]
        nll -= lp.gather(1, targets[:, None]).sum().item()
        n += len(targets)
        n_win += 1
        if reference is not None:
            rp = _log_probs(reference, win, piece)[:-1]
            ref_nll -= rp.gather(1, targets[:, None]).sum().item()
            kls.append((rp.exp() * (rp - lp)).sum(-1).clamp_min(0))  # KL(ref || model) per position
            agree += (rp.argmax(-1) == lp.argmax(-1)).sum().item()
    res = EvalResult(tokens=n, windows=n_win, perplexity=math.exp(nll / n))
    if reference is not None:
        kl = torch.cat(kls).double()
        res.reference_perplexity = math.exp(ref_nll / n)
        res.kl_mean, res.kl_median, res.kl_max = kl.mean().item(), kl.median().item(), kl.max().item()
        res.kl_p99 = torch.quantile(kl, 0.99).item()
        res.top1_agreement = agree / n
    return res
