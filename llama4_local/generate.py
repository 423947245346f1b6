"""Generation in three levels, as mlx-lm does it.

- `generate_step` prefills the prompt in pieces and yields token ids, one forward per token.
- `stream_generate` turns them into `Response` records: a text piece that never splits a
  character, timings, and why generation finished (eos, a stop string, or the length limit).
- `generate` collects a whole reply.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .errors import UserError
from .graph_decode import stepper
from .kv_cache import KVCache
from .model import Llama4Text
from .sampling import Sampler, SamplingParams
from .tokenizer import StreamingDetokenizer, Tokenizer

DEFAULT_PREFILL_CHUNK = 512  # tokens per prefill forward: bounds activation memory on long prompts


def check_context(
    cfg, prompt_tokens: int, max_new_tokens: int, context: int | None = None, option: str = "--max-tokens"
) -> int:
    """The cache length this request needs; a clear error when it exceeds the context.

    `option` is what the user calls the reply length (the server's clients say max_tokens).
    """
    if max_new_tokens < 0:
        raise UserError(f"{option} must be >= 0, got {max_new_tokens}")
    limit = min(context or cfg.max_position_embeddings, cfg.max_position_embeddings)
    need = prompt_tokens + max_new_tokens
    if need > limit:
        raise UserError(
            f"prompt ({prompt_tokens} tokens) plus {option} {max_new_tokens} is {need} tokens, "
            f"more than the context of {limit}; shorten the prompt or lower {option}"
        )
    if prompt_tokens == 0:
        raise UserError("the prompt is empty after tokenization; give some text")
    return need


def prefill(
    model: Llama4Text, ids: torch.Tensor, cache: KVCache, chunk: int, image_features: torch.Tensor | None = None
) -> torch.Tensor:
    """Run ids [T] through the model in pieces of `chunk`; logits of the last position [V].

    `image_features` hold one row per <|patch|> token of ids, in order; each piece gets its own.
    """
    if chunk < 1:
        raise UserError(f"--prefill-chunk must be >= 1, got {chunk}")
    logits, used = None, 0
    for s in range(0, ids.shape[0], chunk):
        piece, feats = ids[s : s + chunk], None
        if image_features is not None:
            n = int((piece == model.image_token_id).sum())
            feats, used = (image_features[used : used + n] if n else None), used + n
        logits = model(piece, cache, image_features=feats)
    return logits[-1]


class LogitsProcessor(Protocol):
    """Changes the next token's logits [V] before sampling and learns which token was chosen."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor: ...

    def accept(self, token: int) -> None: ...


class OutputPenalties:
    """OpenAI's presence and frequency penalties over the tokens generated so far.

    logit[t] -= presence * (count[t] > 0) + frequency * count[t]; the prompt does not count.
    """

    def __init__(self, presence: float, frequency: float, vocab: int, device):
        self.presence, self.frequency = presence, frequency
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits - self.presence * (self.counts > 0) - self.frequency * self.counts

    def accept(self, token: int) -> None:
        self.counts[token] += 1


class LogitBias:
    """Adds a fixed bias to some tokens' logits (OpenAI's logit_bias: -100 bans, +100 forces)."""

    def __init__(self, bias: dict[int, float], device):
        self.ids = torch.tensor(list(bias), dtype=torch.long, device=device)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32, device=device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_add(0, self.ids, self.values)

    def accept(self, token: int) -> None:
        pass


def _steps(
    model: Llama4Text,
    prompt: list[int],
    sampler: Sampler,
    cache: KVCache,
    prefill_chunk: int,
    history: list[int] | None,
    image_features: torch.Tensor | None,
    processors: Sequence[LogitsProcessor] = (),
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (token, the model's own logits [V] for it) without end."""
    device = model.device
    ids = torch.tensor(prompt, dtype=torch.long, device=device)
    seen = torch.tensor(history if history is not None else prompt, dtype=torch.long, device=device)
    use_history = sampler.p.repetition_penalty != 1.0
    logits = prefill(model, ids, cache, prefill_chunk, image_features)
    static = stepper(model, cache)  # None: the eager forward (the default; LLAMA4_LOCAL_DECODE)
    while True:
        shaped = logits
        for proc in processors:
            shaped = proc(shaped)
        token = sampler(shaped, seen if use_history else None)
        for proc in processors:
            proc.accept(token)
        yield token, logits
        next_id = torch.tensor([token], dtype=torch.long, device=device)
        if use_history:
            seen = torch.cat([seen, next_id])
        logits = model(next_id, cache)[-1] if static is None else static(token)[-1].clone()


def generate_step(
    model: Llama4Text,
    prompt: list[int],
    sampler: Sampler,
    cache: KVCache,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    history: list[int] | None = None,
    image_features: torch.Tensor | None = None,
) -> Iterator[int]:
    """Yield generated token ids without end; the caller decides when to stop.

    `prompt` holds the tokens not yet in `cache`; `history` (default: prompt) is every token of
    the context, for the repetition penalty.
    """
    for token, _ in _steps(model, prompt, sampler, cache, prefill_chunk, history, image_features):
        yield token


@dataclass
class TokenLogprob:
    """A generated token's log probability under the model, and the most likely alternatives."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    lp = torch.log_softmax(logits.float(), dim=-1)
    alts = []
    if top > 0:
        values, ids = torch.topk(lp, min(top, lp.shape[-1]))
        alts = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(lp[token]), alts)


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    cache: dict | None = None  # expert-cache figures when offloading (offload.cache.LayerStats)
    images: int = 0
    vision_s: float = 0.0  # the vision tower's time on the images (before the prefill)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        # The first token comes from the prefill; each later one costs one decode forward.
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_s": round(self.prefill_s, 4),
            "decode_s": round(self.decode_s, 4),
            "prefill_tok_s": round(self.prefill_tps, 2),
            "decode_tok_s": round(self.decode_tps, 2),
            **({"expert_cache": self.cache} if self.cache is not None else {}),
            **({"images": self.images, "vision_s": round(self.vision_s, 4)} if self.images else {}),
        }

    def line(self) -> str:
        text = (
            f"prompt {self.prompt_tokens} tok, generated {self.generated_tokens} tok, "
            f"prefill {self.prefill_tps:.1f} tok/s, decode {self.decode_tps:.1f} tok/s"
        )
        if self.images:
            text += f"; {self.images} image(s) encoded in {self.vision_s:.2f} s"
        c = self.cache
        if c:
            hit = f"{c['hit_rate']:.0%}" if c["hit_rate"] is not None else "-"
            text += f"; expert cache hits {hit}, {c['cpu']} on CPU, moved {c['bytes_moved'] / 2**20:.0f} MiB"
            if c["prefetch_accuracy"] is not None:
                text += f", prefetch right {c['prefetch_accuracy']:.0%}"
        return text


@dataclass
class Response:
    text: str  # new text since the previous record (may be empty)
    token: int | None  # the token this record is for (None for a final flush)
    finish_reason: str | None = None  # "stop" (eos or stop string) or "length" on the last record
    stats: Stats = field(default_factory=Stats)
    logprob: TokenLogprob | None = None  # when asked for


class _StopMatcher:
    """Holds back text that might be the start of a stop string, so nothing printed is retracted."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0

    def push(self, piece: str) -> tuple[str, bool]:
        """Add a piece; return (text safe to emit, whether a stop string was hit)."""
        self.text += piece
        if not self.stops:
            out, self.emitted = self.text[self.emitted :], len(self.text)
            return out, False
        longest = max(len(s) for s in self.stops)
        search_from = max(0, self.emitted - longest + 1)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out = self.text[self.emitted : end] if end > self.emitted else ""
            self.emitted = max(self.emitted, end)
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        safe = max(self.emitted, len(self.text) - hold)
        out, self.emitted = self.text[self.emitted : safe], safe
        return out, False

    def rest(self) -> str:
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out


def stream_generate(
    model: Llama4Text,
    tokenizer: Tokenizer,
    prompt: list[int],
    params: SamplingParams,
    max_new_tokens: int,
    eos_ids: set[int],
    stop: list[str] | None = None,
    ignore_eos: bool = False,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    cache: KVCache | None = None,
    context: int | None = None,
    image_features: torch.Tensor | None = None,
    processors: Sequence[LogitsProcessor] = (),
    logprobs: int | None = None,
    history: list[int] | None = None,
) -> Iterator[Response]:
    """Yield one Response per generated token; the last one carries finish_reason.

    `processors` shape the logits before sampling (penalties, biases, a grammar); `logprobs`
    (the number of alternatives, 0 for none) adds each token's log probability under the model.
    `history` is every token of the context when `prompt` is only the part not yet cached.
    """
    need = check_context(model.cfg, len(prompt), max_new_tokens, context)
    device = model.device
    if cache is None:
        cache = model.new_cache(need)
    sampler = Sampler(params, device)
    detok = StreamingDetokenizer(tokenizer)
    stopper = _StopMatcher(stop or [])
    stats = Stats(prompt_tokens=len(prompt))
    if max_new_tokens <= 0:
        yield Response("", None, "length", stats)
        return
    steps = _steps(model, prompt, sampler, cache, prefill_chunk, history, image_features, processors)
    t0 = time.perf_counter()
    for n, (token, logits) in enumerate(steps, start=1):
        now = time.perf_counter()
        if n == 1:
            stats.prefill_s = now - t0
        else:
            stats.decode_s += now - t0
        stats.generated_tokens = n
        lp = token_logprob(logits, token, logprobs) if logprobs is not None else None
        if token in eos_ids and not ignore_eos:
            yield Response(stopper.push(detok.flush())[0] + stopper.rest(), token, "stop", stats, lp)
            return
        piece, hit = stopper.push(detok.add(token))
        if hit:
            yield Response(piece, token, "stop", stats, lp)
            return
        if n >= max_new_tokens:
            tail, hit = stopper.push(detok.flush())
            text = piece + tail + ("" if hit else stopper.rest())
            yield Response(text, token, "stop" if hit else "length", stats, lp)
            return
        yield Response(piece, token, None, stats, lp)
        t0 = time.perf_counter()


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: Stats


def collect(stream: Iterator[Response], on_text: Callable[[str], None] | None = None) -> Completion:
    """The whole reply from a stream of Responses; `on_text` sees each text piece as it comes."""
    parts, ids, last = [], [], None
    for r in stream:
        if r.text:
            parts.append(r.text)
            if on_text:
                on_text(r.text)
        if r.token is not None:
            ids.append(r.token)
        last = r
    return Completion("".join(parts), ids, last.finish_reason, last.stats)


def generate(
    model, tokenizer, prompt, params, max_new_tokens, eos_ids, on_text: Callable[[str], None] | None = None, **kw
) -> Completion:
    """The whole reply; `on_text` sees each text piece as it is generated."""
    return collect(stream_generate(model, tokenizer, prompt, params, max_new_tokens, eos_ids, **kw), on_text)
