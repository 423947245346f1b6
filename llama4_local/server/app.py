"""The HTTP layer: routes, the request queue, errors in OpenAI's shape, one log line per request.

One worker thread owns the model: it loads it (while /health says 503), then runs queued jobs
one at a time, in arrival order. Handlers prepare a job (template, images, checks) in a
thread pool, queue it, and relay what the worker yields: whole bodies, or Server-Sent Events.
A client that goes away cancels its job, waiting or running; the worker stops it between two
tokens.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import UserError
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
)
from .serving import Prepared, ReplyBuilder, Serving

_DONE = object()


def log(line: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} {line}\n")
    sys.stderr.flush()


@dataclass
class ServerOptions:
    model_id: str
    api_key: str | None = None
    max_queue: int = 16
    max_body_bytes: int = 64 * 2**20


class Job:
    def __init__(self, prepared: Prepared, loop: asyncio.AbstractEventLoop):
        self.prepared = prepared
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def push(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop has closed (shutdown)
            pass


class Scheduler:
    """FIFO of jobs for the one worker thread; at most `max_queue` wait behind the running one."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self.running: Job | None = None
        self.stopping = False
        self.seconds_per_job = 5.0  # a running estimate, for Retry-After

    def submit(self, job: Job) -> None:
        with self._cv:
            self._waiting = deque(j for j in self._waiting if not j.cancelled.is_set())
            # With no job running, the first in line is the idle worker's next (it may not have
            # woken to take it yet): it waits behind nothing.
            behind = len(self._waiting) - (self.running is None and bool(self._waiting))
            if behind >= self.max_queue:
                wait = max(1, round(self.seconds_per_job * (behind + 1)))
                raise APIError(
                    429,
                    f"the server is busy ({behind} requests waiting); retry in about {wait} s",
                    code="queue_full",
                    headers={"Retry-After": str(wait)},
                )
            self._waiting.append(job)
            self._cv.notify()

    def next(self) -> Job | None:
        with self._cv:
            while not self.stopping:
                while self._waiting:
                    job = self._waiting.popleft()
                    if not job.cancelled.is_set():
                        self.running = job
                        return job
                self._cv.wait()
            return None

    def stop(self) -> None:
        with self._cv:
            self.stopping = True
            for job in self._waiting:
                job.cancelled.set()
            if self.running is not None:
                self.running.cancelled.set()
            self._cv.notify_all()

    def run(self, job: Job) -> None:
        """Run one job in the worker thread, relaying its records until it ends or is cancelled."""
        t0 = time.perf_counter()
        stream = None
        try:
            stream = job.prepared.run()
            for record in stream:
                job.push(record)
                if job.cancelled.is_set():
                    break
            job.push(_DONE)
        except UserError as e:
            job.push(APIError(400, " ".join(str(e).split())))
        except Exception as e:  # a bug: keep serving, tell the client, log the traceback here
            log("error in generation:\n" + traceback.format_exc().rstrip())
            job.push(APIError(500, f"generation failed ({type(e).__name__}); the server log has the details"))
        finally:
            if stream is not None:
                stream.close()
            self.running = None
            self.seconds_per_job = 0.7 * self.seconds_per_job + 0.3 * (time.perf_counter() - t0)


class Server:
    """The app's state: loading or ready, the serving layer, the scheduler."""

    def __init__(self, opts: ServerOptions, load):
        self.opts = opts
        self.load = load  # () -> serving.Serving; runs in the worker thread
        self.serving = None
        self.load_error: str | None = None
        self.scheduler = Scheduler(opts.max_queue)
        self.on_fatal = None  # called with the message when loading fails

    def worker(self) -> None:
        t0 = time.perf_counter()
        try:
            self.serving = self.load()
        except UserError as e:
            self.load_error = str(e)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log("loading failed:\n" + traceback.format_exc().rstrip())
        if self.load_error is not None:
            if self.on_fatal:
                self.on_fatal(self.load_error)
            return
        log(f"model loaded in {time.perf_counter() - t0:.1f} s; ready")
        while (job := self.scheduler.next()) is not None:
            self.scheduler.run(job)

    # -- helpers ----------------------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        key = self.opts.api_key
        if key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")  # fmt: skip

    def ready(self):
        if self.serving is None:
            raise APIError(503, "the model is still loading; retry when GET /health says ok", code="loading")
        return self.serving

    async def body(self, request: Request, model):
        size = int(request.headers.get("content-length") or 0)
        limit = self.opts.max_body_bytes
        if size > limit:
            raise APIError(413, f"the request body is over {limit // 2**20} MiB")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise APIError(413, f"the request body is over {limit // 2**20} MiB")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(p) for p in err["loc"]) or None
            raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param) from None


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def build_app(server: Server) -> Starlette:
    async def health(request: Request):
        if server.serving is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(request: Request):
        server.check_key(request)
        s = server.ready()
        card = {
            "id": server.opts.model_id,
            "object": "model",
            "created": int(START),
            "owned_by": "llama4-local",
            "max_model_len": s.engine.context,
        }
        if "model" in request.path_params:
            if request.path_params["model"] != card["id"]:
                raise APIError(404, f"no model {request.path_params['model']!r}; this server serves {card['id']!r}")
            return JSONResponse(card)
        return JSONResponse({"object": "list", "data": [card]})

    async def run_job(request: Request, model, prepare):
        """Check, prepare (in a thread), queue and relay one generation request."""
        server.check_key(request)
        s = server.ready()
        body = await server.body(request, model)
        try:
            prepared = await run_in_threadpool(prepare, s, body)
        except UserError as e:
            raise APIError(400, " ".join(str(e).split())) from None
        request.scope.setdefault("state", {})["usage"] = prepared.usage
        job = Job(prepared, asyncio.get_running_loop())
        server.scheduler.submit(job)
        builder = ReplyBuilder(prepared, server.opts.model_id, s.tokenizer)
        if prepared.stream:
            return StreamingResponse(
                _sse(job, builder),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        while True:
            try:
                item = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return Response(status_code=499)
                continue
            if item is _DONE:
                return JSONResponse(builder.body())
            if isinstance(item, APIError):
                raise item
            builder.add(item)

    async def _sse(job: Job, builder: ReplyBuilder):
        def event(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"

        try:
            for c in builder.first_chunks():
                yield event(c)
            ended = False
            while not ended:
                # Whatever the worker has queued goes out in one write: a client that reads
                # slower than the model writes gets the tokens in fewer, larger sends.
                items, out = [await job.events.get()], []
                while not job.events.empty():
                    items.append(job.events.get_nowait())
                for item in items:
                    if item is _DONE:
                        ended = True
                        break
                    if isinstance(item, APIError):
                        out.append(event(item.body()))
                        ended = True
                        break
                    out.extend(event(c) for c in builder.chunks(item))
                if out:
                    yield "".join(out)
            if job.prepared.include_usage:
                yield event(builder.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # a no-op when finished; stops the worker when the client left

    async def chat(request: Request):
        return await run_job(request, ChatCompletionRequest, Serving.chat)

    async def completions(request: Request):
        return await run_job(request, CompletionRequest, Serving.completion)

    async def tokenize(request: Request):
        server.check_key(request)
        s = server.ready()
        body = await server.body(request, TokenizeRequest)

        def work():
            if (body.prompt is None) == (body.messages is None):
                raise APIError(400, "give either prompt or messages", "prompt")
            if body.prompt is not None:
                return s.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
            images = []
            messages = s._messages(body.messages, images)
            text = s.tokenizer.render_chat(messages, add_generation_prompt=body.add_generation_prompt)
            ids = s.tokenizer.encode(text, add_special_tokens=False)
            return s.engine.images.expand(ids, [im.prepared for im in images]) if images else ids

        try:
            ids = await run_in_threadpool(work)
        except UserError as e:
            raise APIError(400, " ".join(str(e).split())) from None
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": s.engine.context})

    async def detokenize(request: Request):
        server.check_key(request)
        s = server.ready()
        body = await server.body(request, DetokenizeRequest)
        ids = s.check_token_ids(body.tokens, "tokens")
        return JSONResponse({"prompt": s.tokenizer.decode(ids, skip_special_tokens=False)})

    async def api_error(request: Request, exc: APIError):
        return _error(exc)

    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            return _error(APIError(404, f"no route {request.method} {request.url.path}"))
        if exc.status_code == 405:
            return _error(APIError(405, f"{request.method} is not allowed on {request.url.path}"))
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)

    async def crash(request: Request, exc: Exception):
        log("error handling a request:\n" + "".join(traceback.format_exception(exc)).rstrip())
        return JSONResponse(error_body("internal error; the server log has the details", "server_error"), 500)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", models, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
    ]
    handlers = {APIError: api_error, HTTPException: http_error, Exception: crash}
    app = Starlette(routes=routes, exception_handlers=handlers)
    return RequestLog(app)


START = time.time()


class RequestLog:
    """ASGI middleware: one line per request (client, method, path, status, tokens, seconds)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]
        state = scope.setdefault("state", {})

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            usage = state.get("usage")
            tokens = ""
            if usage is not None:
                tokens = f" in={usage.prompt_tokens} cached={usage.cached_tokens} out={usage.completion_tokens}"
            client = scope.get("client") or ("-", 0)
            log(
                f"{client[0]} {scope['method']} {scope['path']} {status[0] or 499}{tokens} "
                f"{time.perf_counter() - t0:.2f}s"
            )
