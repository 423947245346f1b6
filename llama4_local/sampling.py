"""Sampling settings and the next-token choice.

The order matches transformers' logits processors: repetition penalty, then temperature,
top-k, top-p, min-p, then a draw (or argmax when temperature is 0).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from .config import read_json
from .errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.6  # Llama 4 Instruct's published default
    top_k: int = 0  # 0: off
    top_p: float = 0.9
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> SamplingParams:
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise UserError(f"--min-p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise UserError(f"--repetition-penalty must be > 0 (1 turns it off), got {self.repetition_penalty}")
        return self

    def merged(self, **overrides) -> SamplingParams:
        """A copy with every override that is not None."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class GenerationDefaults:
    """What the checkpoint's generation_config.json asks for."""

    sampling: SamplingParams
    max_new_tokens: int | None
    eos_token_ids: tuple[int, ...]


def end_token_ids(cfg, defaults: GenerationDefaults, tokenizer) -> set[int]:
    """Every id that ends a reply: config.json's, generation_config.json's and the tokenizer's eos."""
    ids = set(cfg.eos_token_ids) | set(defaults.eos_token_ids)
    if tokenizer.eos_id is not None:
        ids.add(tokenizer.eos_id)
    return ids


def read_generation_config(model_dir: Path) -> GenerationDefaults:
    path = Path(model_dir) / "generation_config.json"
    raw = read_json(path) if path.is_file() else {}
    known = {f.name for f in fields(SamplingParams)}
    keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
    values = {k: raw[k] for k in keys if raw.get(k) is not None}
    if raw.get("do_sample") is False:
        values["temperature"] = 0.0  # greedy unless the user asks otherwise
    params = SamplingParams(**{k: v for k, v in values.items() if k in known})
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return GenerationDefaults(params, raw.get("max_new_tokens"), tuple(int(e) for e in eos_ids))


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device):
        self.p = params.validate()
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, history: torch.Tensor | None) -> int:
        """Choose the next token from logits [V] (float32); history [N] holds the ids so far."""
        p = self.p
        if p.repetition_penalty != 1.0 and history is not None and history.numel():
            prev = logits[history]
            logits = logits.clone()
            logits[history] = torch.where(prev < 0, prev * p.repetition_penalty, prev / p.repetition_penalty)
        if p.temperature == 0:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        # The draw is among the candidates the filters leave (ids: their token ids; None: all):
        # on Scout's 202k tokens a draw over the whole vocabulary took 4.6 ms (two CPU threads).
        ids = None
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            ids = torch.nonzero(logits >= kth).squeeze(1)  # ties with the k-th stay, as transformers
            logits = logits[ids]
        if p.top_p < 1.0:
            keep = top_p_keep(logits, p.top_p)
            ids, logits = (keep if ids is None else ids[keep]), logits[keep]
        probs = logits.softmax(-1)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        choice = draw(probs, self.generator)
        return choice if ids is None else int(ids[choice])


DRAW_BY_CDF = 4096  # from this many candidates a draw inverts the cumulative sum


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One index drawn with probability probs [N] / their sum. torch.multinomial took 4.6 ms over
    Scout's 202k tokens (two CPU threads; a request with top-p 1, as many clients send); a
    uniform draw into the float64 cumulative sum takes a tenth of that. Small sets (what top-p
    leaves) keep torch.multinomial, and so does anything it would refuse (its error)."""
    if probs.shape[-1] < DRAW_BY_CDF:
        return int(torch.multinomial(probs, 1, generator=generator))
    cdf = probs.double().cumsum(-1)
    total = cdf[-1]
    if not (bool(torch.isfinite(total)) and float(total) > 0 and bool((probs >= 0).all())):
        return int(torch.multinomial(probs, 1, generator=generator))
    u = torch.rand((), dtype=torch.float64, generator=generator, device=probs.device) * total
    i = int(torch.searchsorted(cdf, u, right=True))  # the first index whose cumulative sum passes u
    return i if i < cdf.shape[-1] else int(torch.searchsorted(cdf, total))  # u rounded up to the total


TOP_P_FIRST = 256  # candidates top-p looks among first (x8 while they hold less than top_p)


def top_p_keep(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Positions in logits [V] of the smallest set of most likely tokens whose probability reaches
    top_p, most likely first: a token stays while the tokens above it hold less than top_p (the
    most likely always). transformers sorts the whole vocabulary for this; at Scout's 202k tokens
    that took ~18 ms of a 29 ms draw on two CPU threads (docs/benchmarks-history.md, session 25). Here
    the set is looked for among the TOP_P_FIRST most likely (torch.topk), among more only where
    those hold less than top_p (at least 8x, or what their mass a token says the rest needs), and
    past an eighth of the vocabulary (a flat distribution) by buckets (top_p_by_buckets). The same
    set up to float32 rounding at its edge."""
    probs = logits.softmax(-1)
    v = probs.shape[-1]
    k = min(TOP_P_FIRST, v)
    while True:
        if k * 8 > v and bool(torch.isfinite(probs).all()):  # flat: the buckets cost less than this top-k
            return top_p_by_buckets(probs, top_p)
        top, idx = torch.sort(probs, descending=True) if k * 8 > v else torch.topk(probs, k)  # NaN: sorted
        cum = top.cumsum(-1)
        mass = float(cum[-1])
        if top.shape[0] == v or mass >= top_p:
            break
        # at least 8x; as many as the same mass per token would need where the tail is that flat
        k = max(k * 8, int(k * top_p / max(mass, 1e-30)))
    keep = torch.ones_like(cum, dtype=torch.bool)
    keep[1:] = cum[:-1] < top_p  # the mass above each token
    return idx[keep]


BUCKET_SHIFT = 15  # probabilities by their float32 bits' top 17: exponent and 8 bits of mantissa


def top_p_by_buckets(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """top_p_keep's set for probs [V] without sorting V: a flat distribution's set is most of the
    vocabulary, and a sort of Scout's 202k took ~20 ms. Non-negative floats order as their bits,
    so the bits' top 17 put every probability in one of ~32k buckets (a bucket spans 1/256 of its
    value) in order; the buckets' masses from the top find the one where the mass reaches top_p:
    every token above it stays, and only that bucket's tokens are sorted. Positions in no
    particular order (a draw does not depend on it)."""
    key = probs.view(torch.int32) >> BUCKET_SHIFT
    mass = torch.zeros(int(key.max()) + 1, dtype=torch.float64, device=probs.device)
    mass.index_add_(0, key, probs.double())
    from_top = mass.flip(0).cumsum(0)  # the mass of each bucket and all above it
    i = int(torch.searchsorted(from_top, torch.tensor(top_p, dtype=torch.float64, device=probs.device)))
    if i >= from_top.shape[0]:  # the whole mass (rounded) falls short of top_p: every possible token
        return torch.nonzero(probs > 0).squeeze(1)
    edge = from_top.shape[0] - 1 - i
    above = float(from_top[i - 1]) if i else 0.0
    at = torch.nonzero(key == edge).squeeze(1)
    top, order = torch.sort(probs[at], descending=True)
    before = top.double().cumsum(0) - top.double()  # the mass of the edge bucket's tokens above each
    return torch.cat([torch.nonzero(key > edge).squeeze(1), at[order[above + before < top_p]]])
