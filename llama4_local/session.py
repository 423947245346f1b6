"""What every front end does before it generates: check the checkpoint cheaply, then load one engine.

`prompt`, `chat` and `serve` all start the same way: the checkpoint directory, its tokenizer and
chat template, its generation defaults merged with the command line's sampling options, the
context, and the image reader when the model reads images; all checked before gigabytes of
weights are read. `ModelSetup.load` then loads the model and wraps it in the `Engine` that runs
every request (prefix reuse, images, sampling, stop handling) for all three.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .errors import UserError
from .sampling import GenerationDefaults, read_generation_config
from .tokenizer import Tokenizer

DEFAULT_CONTEXT = 8192  # tokens a chat or server session holds when --context is not given


@dataclass
class ModelSetup:
    path: Path
    tokenizer: Tokenizer
    defaults: GenerationDefaults  # the checkpoint's, its sampling overridden by the command line's
    images: object | None  # images.ImageReader when the model will read images
    context: int | None  # --context, when given

    @classmethod
    def check(
        cls,
        model: Path,
        sampling: dict | None = None,
        context: int | None = None,
        vision: bool = True,
        template: bool = True,
    ) -> ModelSetup:
        """The cheap checks, in the order a user fixes them; `vision`: read images if the checkpoint can."""
        from .loader import check_model_dir, has_vision

        path = check_model_dir(model)
        tok = Tokenizer(path)
        if template:
            tok.render_chat([{"role": "user", "content": "x"}])  # no chat template: say so before loading
        defaults = read_generation_config(path)
        defaults = replace(defaults, sampling=defaults.sampling.merged(**(sampling or {})).validate())
        if context is not None and context < 16:
            raise UserError(f"--context must be at least 16 tokens, not {context}")
        if context is not None:
            from .config import load_config

            limit = load_config(path).max_position_embeddings
            if context > limit:
                raise UserError(f"--context {context} is past this model's {limit} positions; pass at most {limit}")
        images = None
        if vision and has_vision(path):
            from .images import ImageReader

            images = ImageReader(path, tok)
        return cls(path, tok, defaults, images, context)

    def load(
        self,
        dtype: str = "bfloat16",
        device: str = "auto",
        offload=None,
        prefill_chunk: int = 512,
        context: int | None = None,
        cache_entries: int = 1,
        cache_bytes: int | None = None,
        reply_option: str = "max_tokens",
        int8_attention: bool = False,
        mmap: bool | None = True,
    ):
        """Load the weights; the Engine over them. `context` overrides the session's (a one-shot
        prompt sizes it to the prompt and reply)."""
        from .engine import Engine
        from .loader import load_model
        from .sampling import end_token_ids

        ctx = context or self.context
        vision = self.images is not None
        model, cfg = load_model(self.path, dtype, device, offload, ctx, prefill_chunk, vision, int8_attention, mmap)
        ctx = min(ctx or DEFAULT_CONTEXT, cfg.max_position_embeddings)
        eos = end_token_ids(cfg, self.defaults, self.tokenizer)
        return Engine(
            model, self.tokenizer, eos, ctx, prefill_chunk, self.images, cache_entries, cache_bytes, reply_option
        )
