"""OpenAI requests into engine work, engine output into OpenAI responses.

`Serving.chat` / `Serving.completion` check and prepare a request (template, images, sampling,
grammar) into a `Prepared` job without touching the model; `Prepared.run` is what the worker
thread runs; `ReplyBuilder` turns its records into response bodies or stream chunks.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..engine import Engine, GenerationRequest, ImageInput, Usage
from ..errors import UserError
from ..generate import LogitBias, OutputPenalties, Response
from ..sampling import GenerationDefaults, SamplingParams
from .protocol import APIError, ChatCompletionRequest, ChatMessage, CompletionRequest
from .tools import might_be_tool_call, parse_tool_calls, required_schema

MAX_STOPS = 16


@dataclass
class Prepared:
    """A checked request, ready for the worker."""

    kind: str  # "chat" or "text"
    gen: GenerationRequest
    engine: Engine
    stream: bool = False
    include_usage: bool = False
    tool_names: set[str] | None = None  # parse the reply for calls to these
    echo: str = ""  # completions: the prompt text, sent back before the reply
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))
    usage: Usage = field(default_factory=lambda: Usage(0, 0))

    @property
    def logprobs(self) -> bool:
        return self.gen.logprobs is not None

    def run(self):
        return self.engine.generate(self.gen, self.usage)


class Serving:
    def __init__(
        self,
        engine: Engine,
        defaults: GenerationDefaults,
        model_id: str,
        model_dir: Path,
        max_tokens: int | None = None,
        max_image_bytes: int = 20 * 2**20,
    ):
        self.engine, self.defaults, self.model_id, self.model_dir = engine, defaults, model_id, model_dir
        self.tokenizer = engine.tokenizer
        self.max_tokens = max_tokens
        self.max_image_bytes = max_image_bytes
        self._grammar = None

    # -- shared checks ----------------------------------------------------------------------------
    def _common(self, req) -> tuple[SamplingParams, list[str], list]:
        if req.n != 1:
            raise APIError(400, f"n must be 1 (this server generates one choice per request), got {req.n}", "n")
        top_k = None if req.top_k is None else max(req.top_k, 0)  # vLLM's -1 means off
        try:
            params = self.defaults.sampling.merged(
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=top_k,
                min_p=req.min_p,
                repetition_penalty=req.repetition_penalty,
                seed=req.seed,
            ).validate()
        except UserError as e:
            raise APIError(400, str(e).replace("--", "").replace("-", "_")) from None
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOPS:
            raise APIError(400, f"stop takes at most {MAX_STOPS} strings, got {len(stop)}", "stop")
        processors = []
        device = self.engine.model.device
        vocab = self.engine.model.cfg.vocab_size
        if req.presence_penalty or req.frequency_penalty:
            processors.append(OutputPenalties(req.presence_penalty, req.frequency_penalty, vocab, device))
        if req.logit_bias:
            bias = {}
            for key, value in req.logit_bias.items():
                if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab:
                    raise APIError(400, f"logit_bias keys are token ids below {vocab}, not {key!r}", "logit_bias")
                bias[int(key)] = value
            processors.append(LogitBias(bias, device))
        return params, stop, processors

    def _max_tokens(self, requested: int | None, prompt_tokens: int) -> int:
        if requested is not None:
            return requested
        room = self.engine.context - prompt_tokens
        return min(self.max_tokens, room) if self.max_tokens else room

    def grammar(self):
        if self._grammar is None:
            from ..grammar import GrammarCompiler

            self._grammar = GrammarCompiler(self.model_dir, self.engine.model.cfg.vocab_size, self.engine.eos_ids)
        return self._grammar

    def _json_constraint(self, schema):
        try:
            return self.grammar().json_schema(schema)
        except UserError as e:
            raise APIError(400, " ".join(str(e).split()), "response_format") from None

    # -- chat ---------------------------------------------------------------------------------------
    def _image(self, url: str) -> ImageInput:
        if url.startswith(("http://", "https://")):
            raise APIError(
                400,
                "image URLs are not fetched (this server never reaches the network); send the image's bytes "
                "as a data URL: data:image/png;base64,...",
                "messages",
            )
        head, sep, payload = url.partition(",")
        if not (sep and head.startswith("data:image/") and head.endswith(";base64")):
            raise APIError(400, "an image_url must be a data URL: data:image/<type>;base64,<bytes>", "messages")
        if len(payload) * 3 // 4 > self.max_image_bytes:
            raise APIError(413, f"an image is over {self.max_image_bytes // 2**20} MiB; shrink it", "messages")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "an image's data URL is not valid base64", "messages") from None
        if self.engine.images is None:
            raise APIError(400, "this model cannot read images (a text-only checkpoint, or --no-vision)", "messages")
        return ImageInput.of(self.engine.images.load_bytes(data, "the image"), data)

    def _messages(self, messages: list[ChatMessage], images: list[ImageInput]) -> list[dict]:
        out = []
        for m in messages:
            d: dict = {"role": "system" if m.role == "developer" else m.role}
            if isinstance(m.content, list):
                parts = []
                for p in m.content:
                    if p.type == "text":
                        parts.append({"type": "text", "text": p.text or ""})
                    else:
                        url = p.image_url if isinstance(p.image_url, str) else (p.image_url.url if p.image_url else "")
                        images.append(self._image(url))
                        parts.append({"type": "image"})
                d["content"] = parts
            else:
                d["content"] = m.content or ""
            if m.tool_calls:
                calls = []
                for c in m.tool_calls:
                    try:
                        args = json.loads(c.function.arguments or "{}")
                    except json.JSONDecodeError:
                        raise APIError(400, "a tool call's arguments must be a JSON object", "messages") from None
                    fn = {"name": c.function.name, "arguments": args}
                    calls.append({"id": c.id, "type": "function", "function": fn})
                d["tool_calls"] = calls
            if m.tool_call_id:
                d["tool_call_id"] = m.tool_call_id
            if m.name:
                d["name"] = m.name
            out.append(d)
        return out

    def chat(self, req: ChatCompletionRequest) -> Prepared:
        params, stop, processors = self._common(req)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
        if choice != "none" and not tools:
            raise APIError(400, "tool_choice needs tools", "tool_choice")
        names = {t["function"]["name"] for t in tools} if tools else set()
        forced = None
        if not isinstance(choice, str):
            if choice.function.name not in names:
                msg = f"tool_choice names {choice.function.name!r}, which is not among tools"
                raise APIError(400, msg, "tool_choice")
            forced = choice.function.name
        fmt = req.response_format
        if fmt is not None and fmt.type != "text" and choice not in ("none", "auto"):
            raise APIError(400, "response_format cannot be combined with a required tool call", "response_format")
        images: list[ImageInput] = []
        messages = self._messages(req.messages, images)
        extra = {"tools": tools} if tools and choice != "none" else {}
        text = self.tokenizer.render_chat(messages, add_generation_prompt=True, **extra)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if images:
            ids = self.engine.images.expand(ids, [im.prepared for im in images])
        if fmt is not None and fmt.type == "json_object":
            processors.append(self._json_constraint({"type": "object"}))
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise APIError(400, "response_format json_schema needs json_schema.schema", "response_format")
            processors.append(self._json_constraint(fmt.json_schema.schema_))
        if choice == "required" or forced:
            processors.append(self._json_constraint(required_schema(tools, forced)))
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = self._max_tokens(requested, len(ids))
        self.engine.check(len(ids), max_tokens)
        gen = GenerationRequest(
            ids, params, max_tokens, images, stop, req.ignore_eos, processors,
            (req.top_logprobs or 0) if req.logprobs else None,
        )  # fmt: skip
        return self._prepared("chat", req, gen, tool_names=names if choice != "none" else None)

    # -- completions --------------------------------------------------------------------------------
    def completion(self, req: CompletionRequest) -> Prepared:
        params, stop, processors = self._common(req)
        if isinstance(req.prompt, str):
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=True)
            echo = req.prompt if req.echo else ""
        else:  # token ids, as OpenAI's API allows: no BOS added, the client's tokens exactly
            ids = self.check_token_ids(req.prompt, "prompt")
            echo = self.tokenizer.decode(ids, skip_special_tokens=False) if req.echo else ""
        max_tokens = self._max_tokens(req.max_tokens, len(ids))
        self.engine.check(len(ids), max_tokens)
        gen = GenerationRequest(ids, params, max_tokens, [], stop, req.ignore_eos, processors, req.logprobs)
        return self._prepared("text", req, gen, echo=echo)

    def check_token_ids(self, ids: list[int], param: str) -> list[int]:
        """ids as a list, or a 400 naming `param` where one is outside the vocabulary."""
        vocab = self.engine.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"token ids must be in [0, {vocab})", param)
        return list(ids)

    def _prepared(self, kind: str, req, gen: GenerationRequest, **kw) -> Prepared:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return Prepared(kind, gen, self.engine, stream=req.stream, include_usage=usage, **kw)


class ReplyBuilder:
    """Accumulates a job's records into OpenAI's shapes (whole bodies or stream chunks)."""

    def __init__(self, job: Prepared, model_id: str, tokenizer):
        self.job, self.model_id, self.tok = job, model_id, tokenizer
        self.text: list[str] = []
        self.logprobs: list = []
        self.finish: str | None = None
        self.held = ""  # reply text held back while it may still be a tool call
        self.streaming_text = job.tool_names is None  # once True, text goes out as it comes

    @property
    def object_id(self) -> str:
        return ("chatcmpl-" if self.job.kind == "chat" else "cmpl-") + self.job.id

    def usage(self) -> dict:
        u = self.job.usage
        return {
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        }

    def _token_text(self, token: int) -> str:
        return self.tok.decode([token], skip_special_tokens=False)

    def _chat_logprob(self, lp) -> dict:
        def entry(t, v):
            s = self._token_text(t)
            return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}

        return {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}

    def _text_logprobs(self, lps: list, offset: int) -> dict:
        tokens, values, tops, offsets = [], [], [], []
        for lp in lps:
            s = self._token_text(lp.token)
            tokens.append(s)
            values.append(lp.logprob)
            tops.append({self._token_text(t): v for t, v in lp.top} if lp.top else None)
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def add(self, r: Response) -> None:
        self.text.append(r.text)
        if r.logprob is not None:
            self.logprobs.append(r.logprob)
        if r.finish_reason:
            self.finish = r.finish_reason

    # -- whole replies --------------------------------------------------------------------------
    def body(self) -> dict:
        job, text = self.job, "".join(self.text)
        base = {"id": self.object_id, "created": job.created, "model": self.model_id}
        if job.kind == "text":
            choice = {
                "index": 0,
                "text": job.echo + text,
                "logprobs": self._text_logprobs(self.logprobs, len(job.echo)) if job.logprobs else None,
                "finish_reason": self.finish,
            }
            return {**base, "object": "text_completion", "choices": [choice], "usage": self.usage()}
        calls = parse_tool_calls(text, job.tool_names) if job.tool_names is not None else None
        message = {"role": "assistant", "content": None if calls else text}
        if calls:
            message["tool_calls"] = [c.as_openai() for c in calls]
        logprobs = {"content": [self._chat_logprob(lp) for lp in self.logprobs]} if job.logprobs else None
        choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": self._finish(calls)}
        return {**base, "object": "chat.completion", "choices": [choice], "usage": self.usage()}

    def _finish(self, calls) -> str | None:
        return "tool_calls" if calls else self.finish

    # -- streams ----------------------------------------------------------------------------------
    def _chunk(self, choice: dict | None) -> dict:
        kind = "chat.completion.chunk" if self.job.kind == "chat" else "text_completion"
        out = {"id": self.object_id, "object": kind, "created": self.job.created, "model": self.model_id}
        out["choices"] = [choice] if choice is not None else []
        if self.job.include_usage:
            out["usage"] = None
        return out

    def first_chunks(self) -> list[dict]:
        if self.job.kind == "chat":
            delta = {"role": "assistant", "content": ""}
            return [self._chunk({"index": 0, "delta": delta, "logprobs": None, "finish_reason": None})]
        if self.job.echo:
            return [self._chunk({"index": 0, "text": self.job.echo, "logprobs": None, "finish_reason": None})]
        return []

    def chunks(self, r: Response) -> list[dict]:
        """The chunks one record gives (none while text is held back)."""
        self.add(r)
        piece, lps = r.text, [r.logprob] if r.logprob is not None else []
        out = []
        if not self.streaming_text:
            self.held += piece
            if might_be_tool_call(self.held) and not r.finish_reason:
                return []
            if r.finish_reason and parse_tool_calls(self.held, self.job.tool_names):
                return self._tool_call_chunks()
            self.streaming_text = True
            piece, lps = self.held, self.logprobs  # everything held back goes out now
        if piece or lps:
            out.append(self._piece_chunk(piece, lps))
        if r.finish_reason:
            out.append(self._final_chunk(self.finish))
        return out

    def _piece_chunk(self, piece: str, lps: list) -> dict:
        if self.job.kind == "chat":
            logprobs = {"content": [self._chat_logprob(lp) for lp in lps]} if self.job.logprobs else None
            return self._chunk({"index": 0, "delta": {"content": piece}, "logprobs": logprobs, "finish_reason": None})
        done = sum(len(t) for t in self.text) - len(piece)
        logprobs = self._text_logprobs(lps, len(self.job.echo) + done) if self.job.logprobs else None
        return self._chunk({"index": 0, "text": piece, "logprobs": logprobs, "finish_reason": None})

    def _final_chunk(self, finish: str | None) -> dict:
        if self.job.kind == "chat":
            return self._chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish})
        return self._chunk({"index": 0, "text": "", "logprobs": None, "finish_reason": finish})

    def _tool_call_chunks(self) -> list[dict]:
        calls = parse_tool_calls(self.held, self.job.tool_names)
        out = []
        for i, c in enumerate(calls):
            delta = {"tool_calls": [c.as_openai(i)]}
            out.append(self._chunk({"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}))
        out.append(self._final_chunk("tool_calls"))
        return out

    def usage_chunk(self) -> dict:
        return {**self._chunk(None), "usage": self.usage()}
