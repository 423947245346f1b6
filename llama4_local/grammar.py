"""Constrained decoding: a JSON schema turned into a token mask by llguidance.

Why llguidance: it reads the checkpoint's own tokenizer.json (no transformers at run time),
builds masks lazily from the grammar as decoding goes (no per-vocabulary precomputation, tens
of microseconds a token on a 200k vocabulary), and compiles JSON schemas itself; llama.cpp and
vLLM use it for the same job. xgrammar needs transformers to read a tokenizer; outlines-core
builds an index over the whole vocabulary up front, seconds to minutes per schema at Scout's
202k tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import UserError


class GrammarCompiler:
    """Compiles schemas against one tokenizer; the masks span the model's vocabulary."""

    def __init__(self, model_dir: Path, vocab_size: int, eos_ids: set[int]):
        import llguidance

        text = (Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8")
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=sorted(eos_ids))

    def json_schema(self, schema: dict | bool) -> JsonConstraint:
        """A fresh constraint for one reply; a UserError when the schema cannot be compiled."""
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": False}
            )
        except (ValueError, TypeError) as e:
            raise UserError(f"the JSON schema cannot be used: {e}") from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise UserError(f"the JSON schema cannot be compiled: {messages[0] if messages else 'unknown error'}")
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise UserError(f"the JSON schema cannot be compiled: {matcher.get_error()}")
        return JsonConstraint(matcher, self.vocab_size)


class JsonConstraint:
    """A logits processor (generate.LogitsProcessor) that allows only tokens the grammar accepts."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size

    def allowed(self) -> torch.Tensor:
        """Bool [V]: which tokens may come next."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return torch.from_numpy(np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        allowed = self.allowed().to(logits.device)
        return logits.masked_fill(~allowed, float("-inf"))

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    def is_accepting(self) -> bool:
        return self.matcher.is_accepting()
