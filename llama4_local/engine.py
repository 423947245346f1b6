"""The engine behind `prompt`, `chat` and `serve`: one loaded model, requests as token ids, KV
caches reused by prefix.

Clients resend the whole conversation every turn. `PrefixCache` keeps the KV caches of recent
requests (llama.cpp's "slots") keyed by the exact tokens they hold; a new request takes the
cache that shares the longest prefix with it, rewinds it to that prefix and prefills only the
rest. Image positions are keyed by the image's bytes too, so two different images of the same
size never match. Generation itself is `generate.stream_generate`. The terminal chat keeps one
conversation (one cache entry), the server a few, a one-shot prompt none.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .generate import DEFAULT_PREFILL_CHUNK, LogitsProcessor, Response, check_context, stream_generate
from .kv_cache import KVCache
from .sampling import SamplingParams
from .tokenizer import Tokenizer


@dataclass
class ImageInput:
    """A prepared image (images.PreparedImage) and a digest of its bytes, the key for reuse."""

    prepared: object
    digest: str

    @classmethod
    def of(cls, prepared, data: bytes) -> ImageInput:
        return cls(prepared, hashlib.sha256(data).hexdigest())

    @classmethod
    def from_file(cls, reader, path) -> ImageInput:
        """An image file, read and checked now (images.ImageReader.load), keyed by its bytes."""
        prepared = reader.load(path)
        return cls.of(prepared, Path(path).expanduser().read_bytes())


@dataclass
class GenerationRequest:
    prompt: list[int]  # token ids, images already expanded to their layouts
    params: SamplingParams
    max_tokens: int
    images: list[ImageInput] = field(default_factory=list)  # in the order their layouts appear
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    processors: Sequence[LogitsProcessor] = ()
    logprobs: int | None = None  # alternatives per token (0: only the chosen one's); None: none


@dataclass
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int = 0
    vision_s: float = 0.0  # the vision tower's time on this request's new images

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def longest_common_prefix(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """KV caches of recent requests, each with the keys (tokens) it holds; least recently used go first.

    At most `entries` caches are kept idle, and at most `max_bytes` of them. A cache in use is
    taken out, so two requests never share one.
    """

    def __init__(self, new_cache, entries: int = 4, max_bytes: int | None = None):
        self.new_cache = new_cache  # () -> an empty KVCache for the whole context
        self.entries = entries
        self.max_bytes = max_bytes
        self._idle: OrderedDict[int, tuple[KVCache, list]] = OrderedDict()
        self._lock = threading.Lock()
        self._next = 0

    def take(self, keys: list) -> tuple[KVCache, int]:
        """A cache for `keys` and how many of its first keys it already holds (always < len(keys))."""
        with self._lock:
            best, best_n = None, 0
            for slot, (_, held) in self._idle.items():
                n = longest_common_prefix(held, keys)
                if n > best_n:
                    best, best_n = slot, n
            if best is not None:
                cache, _ = self._idle.pop(best)
                reuse = min(best_n, len(keys) - 1)  # the last prompt token must run: its logits start the reply
                if cache.rewind(reuse):
                    return cache, reuse
            while self._idle and len(self._idle) >= self.entries:  # would go when this one comes back: free it now
                self._idle.popitem(last=False)
        return self.new_cache(), 0

    def give(self, cache: KVCache, keys: list) -> None:
        """Keep `cache`, which holds exactly `keys`, for later requests."""
        if self.entries <= 0 or cache.length != len(keys) or not keys:
            return
        with self._lock:
            self._idle[self._next] = (cache, list(keys))
            self._next += 1
            while len(self._idle) > self.entries or (
                self.max_bytes is not None and len(self._idle) > 1 and self.nbytes() > self.max_bytes
            ):
                self._idle.popitem(last=False)

    def nbytes(self) -> int:
        return sum(c.nbytes() for c, _ in self._idle.values())

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()


class Engine:
    """Runs generation requests on one loaded model, one at a time (the caller serialises)."""

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        eos_ids: set[int],
        context: int,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        images=None,  # images.ImageReader, when the model reads images
        cache_entries: int = 4,
        cache_bytes: int | None = None,
        reply_option: str = "max_tokens",  # what the front end calls the reply length, for errors
    ):
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        self.context, self.prefill_chunk, self.images = context, prefill_chunk, images
        self.reply_option = reply_option
        keep = cache_entries > 0  # a cache that may be rewound keeps its previous attention block
        self.prefix = PrefixCache(lambda: model.new_cache(context, keep_previous=keep), cache_entries, cache_bytes)
        self._features: OrderedDict[str, torch.Tensor] = OrderedDict()  # image digest -> tower output

    def keys(self, req: GenerationRequest) -> list:
        """One key per prompt position: the token id, or (token id, image digest) inside an image."""
        keys: list = list(req.prompt)
        if not req.images:
            return keys
        start, it, i = self.images.tokens.start, iter(req.images), 0
        while i < len(keys):
            if keys[i] == start:
                image = next(it)
                n = self.images.tokens_for(image.prepared)
                keys[i : i + n] = [(k, image.digest) for k in keys[i : i + n]]
                i += n
            else:
                i += 1
        return keys

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        check_context(self.model.cfg, prompt_tokens, max_tokens, self.context, option=self.reply_option)

    def _image_features(self, req: GenerationRequest, keys: list, start: int, usage: Usage | None):
        """Tower features for the <|patch|> tokens at positions >= start (earlier ones are cached)."""
        patch = self.model.image_token_id
        rows = []
        for image in req.images:
            where = [i for i, k in enumerate(keys) if isinstance(k, tuple) and k[1] == image.digest and k[0] == patch]
            needed = [j for j, i in enumerate(where) if i >= start]
            if not needed:
                continue
            feats = self._features.get(image.digest)
            if feats is None:
                t0 = time.perf_counter()
                feats = self.model.encode_images(image.prepared.pixels)
                if usage is not None:
                    usage.vision_s += time.perf_counter() - t0
                self._features[image.digest] = feats
                while len(self._features) > 8:
                    self._features.popitem(last=False)
            rows.append(feats[needed[0] :])  # the needed rows are always a suffix of the image's
        return torch.cat(rows) if rows else None

    def generate(self, req: GenerationRequest, usage: Usage | None = None) -> Iterator[Response]:
        """Stream the reply to `req`; `usage` (filled in as it goes) says what was cached."""
        self.check(len(req.prompt), req.max_tokens)
        if req.images and (self.images is None or self.model.vision is None):
            raise UserError("this server's model cannot read images (a text-only checkpoint, or started --no-vision)")
        keys = self.keys(req)
        cache, reused = self.prefix.take(keys)
        if usage is not None:
            usage.prompt_tokens, usage.cached_tokens = len(req.prompt), reused
        features = self._image_features(req, keys, reused, usage) if req.images else None
        stream = stream_generate(
            self.model,
            self.tokenizer,
            req.prompt[reused:],
            req.params,
            req.max_tokens,
            self.eos_ids,
            stop=req.stop,
            ignore_eos=req.ignore_eos,
            prefill_chunk=self.prefill_chunk,
            cache=cache,
            context=self.context - reused,
            image_features=features,
            processors=req.processors,
            logprobs=req.logprobs,
            history=req.prompt,
        )
        generated: list[int] = []
        try:
            for r in stream:
                if r.token is not None:
                    generated.append(r.token)
                    if usage is not None:
                        usage.completion_tokens = len(generated)
                yield r
        except GeneratorExit:  # the caller stopped between tokens: the cache is whole
            pass
        except BaseException:  # a failure inside a forward may leave layers at different lengths
            stream.close()
            raise
        stream.close()
        # Every generated token but the last went through the model.
        held = keys + generated[:-1]
        if all(kv.length == len(held) for kv in cache.layers):
            self.prefix.give(cache, held)
