"""`lorachat serve`: the FastAPI app (routes, errors in OpenAI's shape, the API key, the static page) on uvicorn.

    lorachat serve adapters/faq-en adapters/faq-sv                  # http://127.0.0.1:8000/v1
    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \
         -d '{"model": "auto", "messages": [{"role": "user", "content": "Vad är bygglov?"}]}'

The port is bound before the model loads, so a port in use fails in a second, not after the weights.
SIGTERM or SIGINT drains (`shutdown`): new completion requests get 503 with Retry-After, running ones finish
within `drain_timeout`, what is still open then ends with an error (an error event on a stream), exit 0.
Operators' routes: /health (the process answers), /ready (loaded and not draining), /metrics (`metrics`).
"""

from __future__ import annotations

import errno
import hmac
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import LorachatError, Where
from ..runtime.capacity import default_max_running
from .api_router import router
from .batcher import Batcher, Continuous
from .feedback_router import router as feedback_router
from .metrics import ServeMetrics
from .protocol import ErrorInfo, ErrorResponse
from .recording import Recording
from .serving import SHUTTING_DOWN, ServeError, ServingChat, ServingCompletion, ServingModels
from .shutdown import DrainingServer, Stopping, drain, force_exit

STATIC_MAX_BATCH = 8  # the gather-then-run batcher's rows, as serve ran it before the continuous scheduler
STATIC = Path(__file__).parent / "static"  # a web page, when one is installed there, served at /


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int | None = None  # rows decoded at once; None: runtime.capacity's default from memory
    allow_runtime_loading: bool = False
    max_queue: int = 256  # requests waiting beyond the running rows; more get 429
    request_timeout: float | None = 600.0  # seconds a request may take, queueing included; None: no limit
    drain_timeout: float = 30.0  # seconds running requests get to finish after SIGTERM
    chunk_tokens: int = 128  # prompt tokens prefilled per decode step (continuous batching)
    scheduler: str = "continuous"  # or "static": the gather-then-run batcher, kept as the benchmarks' baseline
    record: Path | None = None  # --record DIR: store each exchange and its feedback there

    def __post_init__(self) -> None:
        check_limits(self.max_queue, self.request_timeout, self.drain_timeout)


def check_limits(max_queue: int, request_timeout: float | None, drain_timeout: float) -> None:
    """The admission and shutdown flags, each refused in one line (exit 2) before anything loads."""
    if max_queue < 1:
        raise LorachatError(f"must be at least 1, not {max_queue} (requests beyond it get 429)",
                            Where(field="--max-queue"))
    if request_timeout is not None and request_timeout <= 0:
        raise LorachatError(f"must be more than 0 seconds, not {request_timeout:g}", Where(field="--request-timeout"))
    if drain_timeout < 0:
        raise LorachatError(f"must be 0 seconds or more, not {drain_timeout:g}", Where(field="--drain-timeout"))


def build_app(rt: Any, options: ServeOptions) -> FastAPI:
    """The app for a loaded `runtime.AdapterSet`; its batcher runs while the app does (lifespan)."""
    batcher: Batcher | Continuous
    if options.scheduler == "static":
        batcher = Batcher(rt, max_batch=options.max_batch or STATIC_MAX_BATCH, timeout=options.request_timeout)
        metrics = ServeMetrics(queue_depth=lambda: batcher._queue.qsize(), running=lambda: 0)
    else:
        metrics = ServeMetrics(queue_depth=lambda: batcher.scheduler.waiting, running=lambda: batcher.scheduler.running)

        def observe(job, completion) -> None:
            ticket = job.ticket
            metrics.finished(job.request.model, completion, ticket.submitted, ticket.first_token, ticket.finished)

        batcher = Continuous(rt, max_batch=options.max_batch or default_max_running(rt), max_queue=options.max_queue,
                             chunk_tokens=options.chunk_tokens, timeout=options.request_timeout,
                             on_step=metrics.batch_size.observe, observe=observe)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()
        if app.state.recording:
            app.state.recording.close()

    app = FastAPI(title="lorachat", lifespan=lifespan, docs_url=None, redoc_url=None)
    models = ServingModels(rt, allow_runtime_loading=options.allow_runtime_loading)
    app.state.models = models
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.draining = False  # set by the drain on SIGTERM: /ready says 503, completion requests get 503
    app.state.recording = Recording(options.record, models) if options.record else None
    app.state.chat = ServingChat(models, batcher, recorder=app.state.recording)
    app.state.completion = ServingCompletion(models, batcher)
    app.include_router(router)
    app.include_router(feedback_router)
    _add_error_handlers(app)
    _refuse_while_draining(app)
    if options.api_key:
        _require_key(app, options.api_key)
    if STATIC.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=STATIC, html=True), name="static")  # after the API: /v1 wins
    return app


def _error(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(_: Request, err: ServeError) -> JSONResponse:
        return JSONResponse(err.response.model_dump(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, err: RequestValidationError) -> JSONResponse:
        problems, params = [], []
        for e in err.errors():
            loc = [str(p) for p in e.get("loc", ()) if p != "body"]
            if e.get("type") == "json_invalid":
                return _error(400, f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}",
                              code="invalid_json")
            params.append(".".join(loc) or None)
            problems.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
        return _error(400, "; ".join(problems), param=params[0] if params else None)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return _error(err.status_code, str(err.detail), type=kind)

    @app.exception_handler(Exception)
    async def crash(_: Request, err: Exception) -> JSONResponse:
        logging.getLogger("lora_chat.serve").exception("request failed")
        return _error(500, f"{type(err).__name__}: {err}", type="server_error")


def _refuse_while_draining(app: FastAPI) -> None:
    @app.middleware("http")
    async def draining(request: Request, call_next: Callable):
        if app.state.draining and request.method == "POST" and request.url.path.startswith("/v1"):
            return _error(503, "the server is shutting down; retry shortly", type="server_error",
                          code="shutting_down", headers=SHUTTING_DOWN)
        return await call_next(request)


def _require_key(app: FastAPI, key: str) -> None:
    expected = f"Bearer {key}".encode()

    @app.middleware("http")
    async def check_key(request: Request, call_next: Callable):
        if request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):  # constant time: no key guessing by timing
                return _error(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'",
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (uvicorn listens on it); a port in use is one line, exit 2."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise LorachatError(f"cannot resolve {host}: {err.strerror}", Where(field="--host")) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise LorachatError(f"port {port} on {host} is in use; pick another with --port",
                                Where(field="--port")) from None
        raise LorachatError(f"cannot listen on {host}:{port}: {err.strerror}", Where(field="--host")) from None
    return sock


def serve(adapters: Sequence[str], options: ServeOptions, *, base: str | None = None, force: bool = False,
          say: Callable[[str], None] = print) -> None:
    """Bind, load the base and adapters once, and serve until interrupted."""
    import uvicorn

    from ..runtime import AdapterSet

    sock = bind(options.host, options.port)
    try:
        rt = AdapterSet.open(adapters, base=base, force=force, say=say)
        app = build_app(rt, options)
        for note in app.state.models.router.notes:
            say(f"note: {note}")
        host = f"[{options.host}]" if ":" in options.host else options.host
        say(f"serving {', '.join(app.state.models.names())} on http://{host}:{options.port}/v1 "
            f"(up to {app.state.batcher.max_batch} requests decoding at once, {options.max_queue} waiting)")
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        server = DrainingServer(config, stopping(app, options.drain_timeout, lambda: server, say))
        server.run(sockets=[sock])
    finally:
        sock.close()


def stopping(app: FastAPI, drain_timeout: float, server: Callable[[], Any], say: Callable[[str], None]) -> Stopping:
    """SIGTERM/SIGINT for lorachat's engine: drain the app's scheduler, then let uvicorn end; twice: at once."""
    batcher = app.state.batcher

    def begin() -> None:
        app.state.draining = True

    def finish() -> None:
        server().should_exit = True

    return Stopping(on_first=lambda: drain(begin=begin, idle=batcher.idle, abort=batcher.scheduler.abort,
                                           finish=finish, timeout=drain_timeout, say=say),
                    on_again=lambda: force_exit(server())())


class BackgroundServer:
    """uvicorn serving `app` on a free loopback port in a daemon thread (tests, benchmarks); `stop()` ends it."""

    def __init__(self, app: FastAPI):
        import uvicorn

        self.app = app
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start within 60 s")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
