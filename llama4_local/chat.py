"""A multi-turn conversation that keeps its KV cache between turns.

`ChatSession` owns the messages and the exact token ids the conversation stands for (replies as
generated, not re-tokenized); the engine (`engine.Engine`, the one `prompt` and `serve` run on)
keeps their KV cache. A new turn renders the whole conversation with the chat template, checks
that the text those ids stand for is a prefix of it, and sends those ids plus the new text's; the
engine finds them in its cache and prefills only the rest: the reply's end token and the new
user turn, never the conversation again. When the template would render the past differently
(or the context would overflow, which drops the oldest turns but keeps the system message),
the conversation is tokenized and prefilled once more.

`run_chat` is the terminal front end: readline line editing and history, multi-line input,
slash commands, streaming replies, Ctrl-C to stop a reply.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from .engine import Engine, GenerationRequest, ImageInput, Usage
from .errors import UserError
from .generate import Stats
from .sampling import SamplingParams
from .tokenizer import Tokenizer

HELP = """commands:
  /help                      this list
  /image FILE                attach an image (JPEG, PNG, WebP) to your next message; repeatable
  /system TEXT               set the system message (starts the conversation over)
  /reset                     forget the conversation (keeps the system message)
  /save FILE                 save the conversation as JSON
  /load FILE                 load a conversation saved with /save
  /set NAME VALUE            temperature, top_p, top_k, min_p, repetition_penalty, max_tokens, seed
  /stats                     speed of the last reply, context used, expert cache
  /exit                      leave (Ctrl-D does too)
multi-line input: end a line with \\ to continue it, or wrap the text in lines of three quotes (\"\"\")
Ctrl-C stops a reply and keeps what was written."""

SETTABLE = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repetition_penalty": float,
    "seed": int,
    "max_tokens": int,
}


@dataclass
class TurnResult:
    text: str
    finish_reason: str  # "stop", "length" or "interrupted"
    stats: Stats
    prefilled: int  # tokens run through the model before the first reply token
    token_ids: list[int] = field(default_factory=list)  # the reply's tokens (with its end token)
    dropped_turns: int = 0  # oldest turns dropped to fit the context


@dataclass
class ChatSession:
    engine: Engine  # keeps the conversation's KV cache (one prefix-cache entry is enough)
    params: SamplingParams
    max_tokens: int
    system: str | None = None
    messages: list[dict] = field(default_factory=list)  # user/assistant turns, no system

    def __post_init__(self):
        self.attached: list[str] = []  # image files for the next user message
        self._inputs: dict[str, ImageInput] = {}  # path -> the image, read once
        self.tokens: list[int] = []  # the conversation's ids so far: prompts, and replies as generated
        self.token_images: list[ImageInput] = []  # the images among those ids, in order
        self.known_text = ""  # the conversation text those ids stand for, as the template writes it
        self.last: TurnResult | None = None

    @property
    def model(self):
        return self.engine.model

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def images(self):
        return self.engine.images

    @property
    def context(self) -> int:
        return self.engine.context

    # -- conversation state ------------------------------------------------------------------
    def all_messages(self) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.messages

    def reset(self, keep_messages: bool = False) -> None:
        if not keep_messages:
            self.messages = []
            self.attached = []
        self.tokens, self.token_images, self.known_text = [], [], ""

    def set_system(self, text: str | None) -> None:
        self.system = text or None
        self.reset()

    def context_used(self) -> int:
        return len(self.tokens)

    def as_json(self) -> dict:
        p = self.params
        return {
            "format": "llama4-local chat",
            "version": 1,
            "system": self.system,
            "messages": self.messages,
            "settings": {
                "temperature": p.temperature,
                "top_p": p.top_p,
                "top_k": p.top_k,
                "min_p": p.min_p,
                "repetition_penalty": p.repetition_penalty,
                "seed": p.seed,
                "max_tokens": self.max_tokens,
            },
        }

    def save(self, path: Path) -> None:
        path = Path(path).expanduser()
        if path.is_dir():
            raise UserError(f"{path} is a directory; give a file name")
        if not path.parent.is_dir():
            raise UserError(f"directory {path.parent} does not exist")
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(json.dumps(self.as_json(), ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(tmp, path)

    def load(self, path: Path) -> None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"{path} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not a saved conversation: {e}") from None
        msgs = data.get("messages") if isinstance(data, dict) else None
        ok = isinstance(msgs, list) and all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant") and _valid_content(m.get("content"))
            for m in msgs
        )
        if not ok:
            raise UserError(f"{path} is not a saved conversation (no list of user/assistant messages)")
        settings = data.get("settings") or {}
        params = self.params
        for name, value in settings.items():
            if name in SETTABLE and value is not None and name != "max_tokens":
                params = replace(params, **{name: SETTABLE[name](value)})
        self.params = params.validate()
        if settings.get("max_tokens"):
            self.max_tokens = int(settings["max_tokens"])
        self.system = data.get("system") or None
        self.messages = msgs
        self.reset(keep_messages=True)

    def set(self, name: str, value: str) -> None:
        if name not in SETTABLE:
            raise UserError(f"/set takes one of {', '.join(SETTABLE)}, not {name!r}")
        try:
            v = SETTABLE[name](value)
        except ValueError:
            raise UserError(f"/set {name} needs a {SETTABLE[name].__name__}, not {value!r}") from None
        if name == "max_tokens":
            if v < 1:
                raise UserError("max_tokens must be at least 1")
            self.max_tokens = v
        else:
            self.params = replace(self.params, **{name: v}).validate()

    # -- images -----------------------------------------------------------------------------------
    def attach(self, path: str | Path):
        """Read an image now (errors at once) and send it with the next message; its PreparedImage."""
        if self.images is None:
            raise UserError("this model cannot read images (a text-only checkpoint, or chat was started --no-vision)")
        key = str(Path(path).expanduser().resolve())
        image = self._image(key)
        self.attached.append(key)
        return image.prepared

    def _image(self, key: str) -> ImageInput:
        image = self._inputs.get(key)
        if image is None:
            image = self._inputs[key] = ImageInput.from_file(self.images, key)
        return image

    def _images_in(self, messages: list[dict]) -> list[str]:
        return [
            part["path"]
            for m in messages
            if isinstance(m["content"], list)
            for part in m["content"]
            if part.get("type") == "image"
        ]

    # -- one turn ---------------------------------------------------------------------------------
    def _plan_prompt(self, messages: list[dict]) -> tuple[list[int], list[ImageInput], str]:
        """(the conversation's ids, the images among them, the rendered text).

        The ids the model generated are kept (not a re-tokenization of the reply), so the engine
        finds them in its cache: the new text is found by comparing the rendering with the text
        those ids stand for. The template writes one <|image|> per image; those in the new text
        are the conversation's last ones. When the template renders the past differently, the
        whole conversation is tokenized again.
        """
        text = self.tokenizer.render_chat(messages, add_generation_prompt=True)
        reuse = bool(self.known_text) and text.startswith(self.known_text)
        ids = self.tokenizer.encode(text[len(self.known_text) :] if reuse else text, add_special_tokens=False)
        keys = self._images_in(messages)
        if keys and self.images is None:
            raise UserError("the conversation has images, but this model cannot read them; /reset to drop them")
        inputs: list[ImageInput] = []
        if self.images is not None:
            n = sum(1 for i in ids if i == self.images.tokens.image)
            inputs = [self._image(k) for k in (keys[-n:] if n else [])]
            ids = self.images.expand(ids, [im.prepared for im in inputs])
        if reuse:
            return self.tokens + ids, self.token_images + inputs, text
        return ids, inputs, text

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> TurnResult:
        """Answer `text`; Ctrl-C (KeyboardInterrupt) ends the reply early and keeps it."""
        content = text
        if self.attached:
            content = [{"type": "image", "path": k} for k in self.attached] + [{"type": "text", "text": text}]
        user = {"role": "user", "content": content}
        dropped = 0
        ids, inputs, text_now = self._plan_prompt(self.all_messages() + [user])
        while len(ids) + self.max_tokens > self.context:
            if not self.messages:
                raise UserError(
                    f"this message ({len(ids)} tokens) plus max_tokens {self.max_tokens} does not fit the "
                    f"context of {self.context} tokens; shorten it, lower max_tokens (/set max_tokens N) "
                    "or start with a larger --context"
                )
            self.messages = self.messages[2:] if len(self.messages) >= 2 else []  # oldest user+assistant pair
            dropped += 1
            self.reset(keep_messages=True)
            ids, inputs, text_now = self._plan_prompt(self.all_messages() + [user])
        self.attached = []
        usage = Usage(len(ids), 0)
        request = GenerationRequest(ids, self.params, self.max_tokens, images=inputs)
        pieces, generated, finish, stats = [], [], "interrupted", None
        t0 = time.perf_counter()
        stream = self.engine.generate(request, usage)
        try:
            for r in stream:
                stats = r.stats
                if r.token is not None:
                    generated.append(r.token)
                if r.text:
                    pieces.append(r.text)
                    if on_text:
                        on_text(r.text)
                if r.finish_reason:
                    finish = r.finish_reason
        except KeyboardInterrupt:
            finish = "interrupted"
        finally:
            stream.close()
        prefilled = len(ids) - usage.cached_tokens
        if stats is None:  # nothing generated (interrupted in the prefill)
            stats = Stats(prompt_tokens=prefilled, prefill_s=time.perf_counter() - t0)
        stats.images, stats.vision_s = len(inputs), usage.vision_s
        if generated:
            self.tokens, self.token_images = ids + generated, inputs
            ended = generated[-1] in self.engine.eos_ids and finish == "stop"
            end_text = self.tokenizer.decode(generated[-1:], skip_special_tokens=False) if ended else ""
            self.known_text = text_now + "".join(pieces) + end_text
        else:
            self.reset(keep_messages=True)
        reply_text = "".join(pieces)  # without the end token: the template writes it
        self.messages = self.messages + [user, {"role": "assistant", "content": reply_text}]
        self.last = TurnResult(reply_text, finish, stats, prefilled, generated, dropped)
        return self.last


def _valid_content(content) -> bool:
    """A message's content: a string, or a list of {"type": "text", "text"} / {"type": "image", "path"} parts."""
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(p, dict)
        and (
            (p.get("type") == "text" and isinstance(p.get("text"), str))
            or (p.get("type") == "image" and isinstance(p.get("path"), str))
        )
        for p in content
    )


# -- terminal front end ---------------------------------------------------------------------------


def _read_input(prompt: str) -> str:
    """One message: a line, lines continued with a trailing backslash, or a triple-quoted block."""
    line = input(prompt)
    if line.strip() == '"""':
        lines = []
        while True:
            nxt = input("... ")
            if nxt.strip() == '"""':
                return "\n".join(lines)
            lines.append(nxt)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = input("... ")
    lines.append(line)
    return "\n".join(lines)


def _setup_readline() -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # Windows without pyreadline: plain input
        return
    hist = Path(os.environ.get("LLAMA4_LOCAL_HISTORY", Path.home() / ".llama4_local_history"))
    try:
        import readline

        readline.set_history_length(1000)
        if hist.is_file():
            readline.read_history_file(hist)
        import atexit

        atexit.register(lambda: _save_history(readline, hist))
    except OSError:
        pass


def _save_history(readline, path: Path) -> None:
    try:
        readline.write_history_file(path)
    except OSError:
        pass


def stats_text(session: ChatSession, offload) -> str:
    lines = []
    r = session.last
    if r is None:
        lines.append("no reply yet")
    else:
        s = r.stats
        lines.append(
            f"last reply: {s.generated_tokens} tokens, decode {s.decode_tps:.1f} tok/s, "
            f"prefill {r.prefilled} tokens at {s.prefill_tps:.1f} tok/s ({r.finish_reason})"
        )
    lines.append(f"context: {session.context_used()} of {session.context} tokens, {len(session.messages)} messages")
    if offload is not None:
        t = offload.totals()
        rate = f"{t.hit_rate:.1%}" if t.uses else "-"
        lines.append(
            f"expert cache: {offload.cache.slots} slots, hit rate {rate}, {t.cpu} misses on CPU, "
            f"{t.bytes_moved / 2**20:.0f} MiB moved"
        )
    return "\n".join(lines)


def run_chat(session: ChatSession, out=None, err=None) -> int:
    """The read-reply loop; returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    _setup_readline()
    offload = getattr(session.model, "offload", None)
    err.write("llama4-local chat: /help for commands, Ctrl-D or /exit to leave\n")
    err.flush()
    while True:
        try:
            text = _read_input(">>> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        if not text.strip():
            continue
        if text.startswith("/"):
            cmd, _, arg = text[1:].partition(" ")
            arg = arg.strip()
            try:
                if cmd in ("exit", "quit", "bye"):
                    return 0
                elif cmd == "help":
                    out.write(HELP + "\n")
                elif cmd == "system":
                    session.set_system(arg)
                    out.write("system message set; conversation started over\n" if arg else "system message cleared\n")
                elif cmd == "reset":
                    session.reset()
                    out.write("conversation reset\n")
                elif cmd == "save":
                    if not arg:
                        raise UserError("/save needs a file name")
                    session.save(Path(arg))
                    out.write(f"saved {len(session.messages)} messages to {arg}\n")
                elif cmd == "load":
                    if not arg:
                        raise UserError("/load needs a file name")
                    session.load(Path(arg))
                    out.write(f"loaded {len(session.messages)} messages from {arg}\n")
                elif cmd == "set":
                    name, _, value = arg.partition(" ")
                    session.set(name, value.strip())
                    out.write(f"{name} = {value.strip()}\n")
                elif cmd == "image":
                    if not arg:
                        raise UserError("/image needs a file name")
                    im = session.attach(arg)
                    h, w = im.size
                    out.write(
                        f"attached {Path(arg).name} ({w}x{h}, {im.tiles} tile(s), "
                        f"{session.images.tokens_for(im)} tokens); it goes with your next message\n"
                    )
                elif cmd == "stats":
                    out.write(stats_text(session, offload) + "\n")
                else:
                    raise UserError(f"unknown command /{cmd}; /help lists them")
            except UserError as e:
                err.write(f"error: {e}\n")
            out.flush()
            continue
        try:
            r = session.reply(text, on_text=lambda s: (out.write(s), out.flush()))
        except UserError as e:
            err.write(f"error: {e}\n")
            continue
        out.write("\n")
        if r.dropped_turns:
            err.write(f"[context full: dropped the {r.dropped_turns} oldest exchange(s)]\n")
        if r.finish_reason == "interrupted":
            err.write("[interrupted]\n")
        elif r.finish_reason == "length":
            err.write(f"[stopped at max_tokens {session.max_tokens}]\n")
        out.flush()
        err.flush()
