"""Start the server: check the checkpoint, bind the port, load the model in the background, serve."""

from __future__ import annotations

import ipaddress
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .app import Server, ServerOptions, build_app, log


@dataclass
class ServeConfig:
    model: Path
    model_id: str
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_queue: int = 16
    dtype: str = "bfloat16"
    device: str = "auto"
    prefill_chunk: int = 512
    offload: object | None = None  # offload.setup.OffloadOptions
    context: int | None = None
    max_tokens: int | None = None  # default reply length when a request names none
    sampling: dict = field(default_factory=dict)  # server-wide sampling defaults (None keeps the checkpoint's)
    vision: bool = True
    cache_entries: int = 4  # idle KV caches kept for prefix reuse
    cache_bytes: int | None = None
    int8_attention: bool = False  # CPU bf16 runs: attention rounded to INT8 at load
    mmap: bool | None = True  # False/None: CPU weights copied out of the mapped files (loader.load_model)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def prepare_loader(cfg: ServeConfig):
    """Check what is cheap to check now; return the function that loads the model (in the worker)."""
    from ..session import ModelSetup

    # The server's sampling defaults: the checkpoint's, overridden by the command line's.
    setup = ModelSetup.check(cfg.model, cfg.sampling, cfg.context, cfg.vision)
    if cfg.max_queue < 0:
        raise UserError(f"--max-queue must be >= 0, not {cfg.max_queue}")
    if cfg.cache_entries < 0:
        raise UserError(f"--prompt-cache must be >= 0 (0: off), not {cfg.cache_entries}")
    if cfg.api_key is not None and not cfg.api_key.strip():
        # An empty key would let in any client that sends 'Authorization: Bearer ' with nothing after it.
        raise UserError("--api-key is empty (or LLAMA4_LOCAL_API_KEY is set to nothing); give a key or leave it out")

    def load():
        from .serving import Serving

        engine = setup.load(
            cfg.dtype,
            cfg.device,
            cfg.offload,
            cfg.prefill_chunk,
            None,
            cfg.cache_entries,
            cfg.cache_bytes,
            int8_attention=cfg.int8_attention,
            mmap=cfg.mmap,
        )
        return Serving(engine, setup.defaults, cfg.model_id, setup.path, cfg.max_tokens)

    return load


def _uvicorn_class():
    import uvicorn

    class Quiet(uvicorn.Server):
        """Stops on Ctrl-C or SIGTERM and returns (uvicorn would re-raise the signal afterwards)."""

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    return Quiet


def serve(cfg: ServeConfig) -> int:
    """Run until Ctrl-C or SIGTERM; the exit status."""
    import uvicorn

    load = prepare_loader(cfg)
    sock = bind(cfg.host, cfg.port)  # first: an address that cannot be bound is the only line printed
    if not is_loopback(cfg.host) and not cfg.api_key:
        log(f"warning: listening on {cfg.host} without --api-key: anyone who can reach this port can use the model")
    host, port = sock.getsockname()[:2]
    server = Server(ServerOptions(cfg.model_id, cfg.api_key, cfg.max_queue), load)
    app = build_app(server)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3, lifespan="off")
    web = _uvicorn_class()(config)
    status = {"code": 0}

    def fatal(message: str) -> None:
        log(f"error: {message}")
        status["code"] = 2
        web.should_exit = True

    server.on_fatal = fatal
    threading.Thread(target=server.worker, name="llama4-worker", daemon=True).start()
    shown = f"[{host}]" if ":" in host else host
    log(f"listening on http://{shown}:{port} (model {cfg.model_id!r} loading; GET /health says when it is ready)")
    try:
        web.run(sockets=[sock])
    finally:
        server.scheduler.stop()
        sock.close()
    if status["code"] == 0:
        log("server stopped")
    return status["code"]
