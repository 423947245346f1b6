"""One-shot prompt: load a checkpoint, build the prompt, generate, report.

Library code for the CLI's `prompt` command (and anything else that wants one reply).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .engine import GenerationRequest, ImageInput, Usage
from .generate import DEFAULT_PREFILL_CHUNK, Stats, collect
from .loader import text_only
from .session import ModelSetup
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
    int8_attention: bool = False  # CPU bf16 runs: attention rounded to INT8 at load
    mmap: bool | None = True  # False/None: CPU weights copied out of the mapped files (loader.load_model)


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
    # Cheap checks first: config, tokenizer and images before gigabytes of weights.
    setup = ModelSetup.check(req.model, req.sampling, req.context, vision=bool(req.images), template=False)
    tokenizer, defaults = setup.tokenizer, setup.defaults
    if req.images and setup.images is None:
        raise text_only(setup.path)
    images = [ImageInput.from_file(setup.images, p) for p in req.images]
    prompt = build_prompt(tokenizer, req.text, req.system, req.raw, len(images))
    if images:
        prompt = setup.images.expand(prompt, [im.prepared for im in images])
    max_tokens = req.max_tokens if req.max_tokens is not None else (defaults.max_new_tokens or DEFAULT_MAX_TOKENS)
    context = req.context or len(prompt) + max(max_tokens, 0)
    if req.record_routing is not None:
        from offload.trace import check_trace_path

        check_trace_path(req.record_routing)
    engine = setup.load(
        req.dtype, req.device, req.offload, req.prefill_chunk, context,
        cache_entries=0, reply_option="--max-tokens", int8_attention=req.int8_attention, mmap=req.mmap,
    )  # fmt: skip
    model = engine.model
    recorder = None
    if req.record_routing is not None:
        from offload.trace import RoutingRecorder

        recorder = RoutingRecorder(req.record_routing, model)
    request = GenerationRequest(prompt, defaults.sampling, max_tokens, images, stop=req.stop, ignore_eos=req.ignore_eos)
    usage = Usage(len(prompt), 0)
    try:
        done = collect(engine.generate(request, usage), on_text)
    except BaseException:
        if recorder:
            recorder.abort()
        raise
    if recorder:
        recorder.close()
    if model.offload is not None:
        done.stats.cache = model.offload.totals().as_dict()
    done.stats.vision_s, done.stats.images = usage.vision_s, len(images)
    return PromptResult(done.text, done.token_ids, len(prompt), done.finish_reason, done.stats)
