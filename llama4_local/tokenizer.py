"""Tokenizer (`tokenizers`), chat template (`jinja2`, sandboxed) and streaming detokenization.

The chat template is the checkpoint's own (`chat_template.jinja`, or `chat_template` in
`tokenizer_config.json`), rendered with the variables transformers' `apply_chat_template`
passes, in a sandbox: a template can format text but cannot reach Python.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .config import read_json
from .errors import UserError


def _token_text(tok) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as AddedToken dicts."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class Tokenizer:
    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{model_dir} has no tokenizer.json; copy it from the original checkpoint")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise UserError(f"{path} is not a valid tokenizer.json ({e}); re-download it") from None
        cfg_path = model_dir / "tokenizer_config.json"
        tcfg = read_json(cfg_path) if cfg_path.is_file() else {}
        self.special = {key: _token_text(tcfg.get(key)) for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.bos_id = self.token_id(self.special["bos_token"])
        self.eos_id = self.token_id(self.special["eos_token"])
        template = None
        jinja_path = model_dir / "chat_template.jinja"
        if jinja_path.is_file():
            template = jinja_path.read_text(encoding="utf-8")
        elif isinstance(tcfg.get("chat_template"), str):
            template = tcfg["chat_template"]
        elif isinstance(tcfg.get("chat_template"), list):  # named templates: use "default"
            named = {t.get("name"): t.get("template") for t in tcfg["chat_template"] if isinstance(t, dict)}
            template = named.get("default")
        self.chat_template = template
        self._compiled = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self._tok.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            # A tokenizer.json without a BOS post-processor: add the BOS the checkpoint names.
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The chat prompt as text, rendered by the checkpoint's template."""
        if self.chat_template is None:
            raise UserError("this checkpoint has no chat template; use --raw to send the text as is")
        import jinja2

        if self._compiled is None:
            self._compiled = _compile(self.chat_template)
        kwargs = {k: v for k, v in self.special.items() if v is not None}
        kwargs.update(extra)
        kwargs.setdefault("tools", None)
        try:
            return self._compiled.render(
                messages=messages, documents=None, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except jinja2.TemplateError as e:
            raise UserError(f"the checkpoint's chat template failed: {_one_line(e)}") from None
        except (RecursionError, MemoryError, OverflowError, ArithmeticError, LookupError, TypeError, ValueError) as e:
            # A template is the checkpoint's code: any failure inside it is the checkpoint's, not ours.
            raise UserError(f"the checkpoint's chat template failed ({type(e).__name__}: {_one_line(e)})") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template writes the BOS text itself: tokenize without adding another.
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def _compile(source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML; templates expect plain JSON (as transformers does).
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"the checkpoint's chat template does not parse ({e}); use --raw") from None


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces, never splitting a UTF-8 character.

    Decodes a short window of recent ids and emits only the part past what was already emitted;
    while the window ends in an incomplete byte sequence (decoded as U+FFFD) it waits for more.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: decoding from here gives stable text
        self.read = 0  # ids up to here have been emitted

    def add(self, token: int) -> str:
        self.ids.append(token)
        prev = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        if len(text) > len(prev) and not text.endswith("\ufffd"):
            piece = text[len(prev) :]
            self.prefix, self.read = self.read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (a dangling partial character comes out as U+FFFD)."""
        prev = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(prev) :]
