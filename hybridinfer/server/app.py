"""Wiring only: the FastAPI app, auth, CORS, OpenAI-shaped errors, and a lifespan that owns the engine."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json

import anyio
from fastapi import FastAPI, Request
from pydantic import ValidationError
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engines.base import EngineFailed, EngineRejected
from ..metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, error_body
from .serving import Err, Serving, Settings


class _CancellingStream(StreamingResponse):
    """Streams while listening for the client's disconnect, and cancels the stream when it comes. (Starlette
    relies on `send` failing under ASGI 2.4, which uvicorn does not do, so a vanished client would keep the
    engine generating to max_tokens.)"""

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as tg:
                async def stream():
                    await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        tg.cancel_scope.cancel()
                        break
        finally:
            # A cancel that lands while the generator waits at a `yield` leaves it suspended; close it now so its
            # cleanup (closing the engine connection, freeing the slot) runs at once, not at garbage collection.
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


class _BearerAuth:
    """Requires 'Authorization: Bearer KEY' on /v1 and /tokenize. Plain ASGI: Starlette's BaseHTTPMiddleware would
    re-stream every response chunk through an extra task and queue."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and \
                (scope["path"].startswith("/v1") or scope["path"] == "/tokenize"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                resp = JSONResponse(error_body("invalid or missing API key (Authorization: Bearer …)",
                                               "authentication_error", "invalid_api_key"), status_code=401)
                return await resp(scope, receive, send)
        await self.app(scope, receive, send)


async def _report_loading(engine, say, on_fatal) -> None:
    """Says how loading goes (every 5 s, then once ready); a load failure no restart can fix ends the server."""
    t = 0
    while not await engine.wait_ready(timeout=1.0):
        t += 1
        if getattr(engine, "fatal", None):
            on_fatal(engine.fatal)
            return
        if engine.state == "loading" and t % 5 == 0:
            say(f"  loading model… {t} s")
    say(f"  ready: engine loaded in {engine.ready_at - engine.started_at:.1f} s")


def create_app(settings: Settings, engine, api_key: str | None = None, cors_origins: list[str] | None = None,
               say=None, on_fatal=None) -> FastAPI:
    """`engine`: a running engine as described in engines/base.py (engine.runner(plan, ...)). With `say` (a
    print-like callable) the lifespan reports loading progress; `on_fatal(message)` is called on a load failure."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        metrics = ServerMetrics()
        async with engine:
            app.state.serving = Serving(settings, engine, metrics)
            report = asyncio.create_task(_report_loading(engine, say, on_fatal or (lambda m: None))) if say else None
            try:
                yield
            finally:
                if report:
                    report.cancel()
                    say("  stopping engine…")

    app = FastAPI(title="hybridinfer", lifespan=lifespan, docs_url=None, redoc_url=None)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])

    if api_key:
        app.add_middleware(_BearerAuth, api_key=api_key)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        e = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "__root__"))
        if e.get("type") in ("json_invalid", "json_type"):
            msg = "request body is not valid JSON"
        else:
            msg = f"{loc or 'body'}: {e.get('msg', 'invalid value')}"
        return JSONResponse(error_body(msg, "invalid_request_error", param=loc or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {exc.__class__.__name__}", "server_error"), status_code=500)

    def respond(result):
        if isinstance(result, Err):
            return JSONResponse(result.body, status_code=result.status, headers=result.headers)
        if isinstance(result, dict):
            return JSONResponse(result)
        return _CancellingStream(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health(request: Request):
        status, body = request.app.state.serving.health()
        return JSONResponse(body, status_code=status, headers={} if status == 200 else {"Retry-After": "2"})

    @app.get("/metrics")
    async def metrics(request: Request):
        s: Serving = request.app.state.serving
        text = s.metrics.render(s.engine.state, s.engine.restarts)
        engine_text = await s.engine_metrics()
        if engine_text:
            text += "# engine metrics\n" + engine_text
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        return request.app.state.serving.models()

    async def parse(request: Request, model):
        # Parse JSON whatever the Content-Type (curl -d sends form-encoded by default).
        raw = await request.body()
        try:
            return model.model_validate_json(raw or b"null")
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None

    @app.post("/tokenize")
    async def tokenize(request: Request):
        # llama-server's shape ({"content": str} -> {"tokens": [...]}), so clients such as `bench` size prompts exactly.
        try:
            content = json.loads(await request.body() or b"null").get("content")
        except (ValueError, AttributeError):
            content = None
        if not isinstance(content, str):
            return JSONResponse(error_body('body must be {"content": "text"}', "invalid_request_error", param="content"),
                                status_code=400)
        s: Serving = request.app.state.serving
        if s.engine.state != "ready":
            return JSONResponse(error_body("the engine is not ready; retry shortly", "server_error", "engine_unavailable"),
                                status_code=503, headers={"Retry-After": "2"})
        try:
            return {"tokens": await s.engine.tokenize(content)}
        except (EngineFailed, EngineRejected) as e:
            return JSONResponse(error_body(f"tokenize failed: {e}", "server_error"), status_code=502)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return respond(await request.app.state.serving.chat(await parse(request, ChatCompletionRequest)))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return respond(await request.app.state.serving.completions(await parse(request, CompletionRequest)))

    return app
