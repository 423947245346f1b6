"""One-shot prompt: load a checkpoint, build the prompt, generate, report.

Library code for the CLI's `prompt` command (and anything else that wants one reply).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .generate import DEFAULT_PREFILL_CHUNK, Stats, generate
from .loader import check_model_dir, load_model
from .sampling import end_token_ids, read_generation_config
from .tokenizer import Tokenizer

DEFAULT_MAX_TOKENS = 512


@dataclass
class PromptRequest:
    model: Path
    text: str
    system: str | None = None
    raw: bool = False
    max_tokens: int | None = None
    sampling: dict = field(default_factory=dict)  # overrides; None values keep the defaults
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    dtype: str = "bfloat16"
    device: str = "auto"
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    offload: object | None = None  # offload.setup.OffloadOptions
    context: int | None = None  # tokens the memory plan reserves KV cache for
    record_routing: Path | None = None
    images: list[Path] = field(default_factory=list)  # image files, in the order they go into the prompt


@dataclass
class PromptResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    stats: Stats

    def as_json(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "finish_reason": self.finish_reason,
            "stats": self.stats.as_dict(),
        }


def build_prompt(tokenizer: Tokenizer, text: str, system: str | None, raw: bool, images: int = 0) -> list[int]:
    """Prompt ids; with images, one <|image|> placeholder per image (ImageReader.expand fills them).

    Chat: the images come first in the user message, then the text. Raw: where the text writes
    <|image|>, or, if it writes none, right after BOS.
    """
    if raw:
        ids = tokenizer.encode(text, add_special_tokens=True)
        placeholder = tokenizer.token_id("<|image|>")
        if images and placeholder not in ids:
            at = 1 if ids and ids[0] == tokenizer.bos_id else 0
            ids = ids[:at] + [placeholder] * images + ids[at:]
        return ids
    user = text if not images else [{"type": "image"}] * images + [{"type": "text", "text": text}]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.encode_chat(messages, add_generation_prompt=True)


def run_prompt(req: PromptRequest, on_text: Callable[[str], None] | None = None) -> PromptResult:
    model_dir = check_model_dir(req.model)
    # Cheap checks first: config and tokenizer before gigabytes of weights.
    tokenizer = Tokenizer(model_dir)
    defaults = read_generation_config(model_dir)
    params = defaults.sampling.merged(**req.sampling).validate()
    images, reader = [], None
    if req.images:
        from .images import ImageReader

        reader = ImageReader(model_dir, tokenizer)
        images = [reader.load(p) for p in req.images]
    prompt = build_prompt(tokenizer, req.text, req.system, req.raw, len(images))
    if images:
        prompt = reader.expand(prompt, images)
    max_tokens = req.max_tokens if req.max_tokens is not None else (defaults.max_new_tokens or DEFAULT_MAX_TOKENS)
    context = req.context or len(prompt) + max_tokens
    if req.record_routing is not None:
        from offload.trace import check_trace_path

        check_trace_path(req.record_routing)
    model, cfg = load_model(
        model_dir, req.dtype, req.device, req.offload, context, req.prefill_chunk, vision=bool(images)
    )
    features, vision_s = None, 0.0
    if images:
        t0 = time.perf_counter()
        features = model.encode_images(torch.cat([im.pixels for im in images]))
        vision_s = time.perf_counter() - t0
    eos = end_token_ids(cfg, defaults, tokenizer)
    recorder = None
    if req.record_routing is not None:
        from offload.trace import RoutingRecorder

        recorder = RoutingRecorder(req.record_routing, model)
    try:
        done = _generate(model, tokenizer, prompt, params, max_tokens, eos, on_text, req, features)
    except BaseException:
        if recorder:
            recorder.abort()
        raise
    if recorder:
        recorder.close()
    if model.offload is not None:
        done.stats.cache = model.offload.totals().as_dict()
    done.stats.vision_s, done.stats.images = vision_s, len(images)
    return PromptResult(done.text, done.token_ids, len(prompt), done.finish_reason, done.stats)


def _generate(model, tokenizer, prompt, params, max_tokens, eos, on_text, req, features=None):
    return generate(
        model,
        tokenizer,
        prompt,
        params,
        max_tokens,
        eos,
        on_text=on_text,
        stop=req.stop,
        ignore_eos=req.ignore_eos,
        prefill_chunk=req.prefill_chunk,
        image_features=features,
    )
