"""Wiring only: the FastAPI app, auth and body limit, CORS, OpenAI-shaped errors, the OpenAPI description, client
disconnect watching, and a lifespan that owns the engine."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import (ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, ErrorResponse, Health,
                       ModelList, TokenizeRequest, Tokens, error_body)
from .serving import Err, Serving, Settings, Stream

log = logging.getLogger("hybridinfer.server")

DEFAULT_MAX_BODY = 4 * 2**20


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


def _reply(scope, receive, send, status: int, message: str, type_: str, code: str, headers: dict | None = None):
    return JSONResponse(error_body(message, type_, code), status_code=status, headers=headers)(scope, receive, send)


class _Guard:
    """Plain ASGI (Starlette's BaseHTTPMiddleware would re-stream every response chunk through an extra task):
    - 'Authorization: Bearer KEY' on everything but /health (and /metrics with metrics_public), 401 otherwise;
    - a request body larger than max_body is refused with 413 before it is read into memory or parsed."""

    def __init__(self, app, api_key: str | None, metrics_public: bool, max_body: int):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.open = {"/health"} | ({"/metrics"} if metrics_public else set())
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected and scope["method"] != "OPTIONS" and scope["path"] not in self.open:
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return await _reply(scope, receive, send, 401, "invalid or missing API key (Authorization: Bearer …)",
                                    "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = (f"the request body is larger than this server's limit of {self.max_body:,} bytes; "
                   f"send a shorter prompt (or restart serve with a larger --max-body-mb)")
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.max_body:
            return await _reply(scope, receive, send, 413, too_big, "invalid_request_error", "request_too_large")
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_body:
                return await _reply(scope, receive, send, 413, too_big, "invalid_request_error", "request_too_large")
            chunks.append(body)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: the client's disconnect

        await self.app(scope, replay, send)


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


async def _watching(request: Request, work):
    """Runs `work()` while watching the client connection; a client that leaves cancels it (-> None)."""
    result = None
    async with anyio.create_task_group() as tg:
        async def watch():
            while True:
                if (await request.receive())["type"] == "http.disconnect":
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch)
        result = await work()
        tg.cancel_scope.cancel()
    return result


_ERRORS = {s: {"model": ErrorResponse, "description": d} for s, d in (
    (400, "bad request: malformed JSON, wrong types, prompt longer than the context, unsupported content"),
    (401, "missing or wrong API key (with --api-key)"), (404, "unknown model"),
    (413, "request body over the size limit"), (429, "all slots and queue places taken; see Retry-After"),
    (500, "internal error"), (502, "the engine failed during the request"),
    (503, "the engine is loading or restarting; see Retry-After"), (504, "the engine did not answer in time"))}


def _post_doc(request_model: type[BaseModel], response_model: type[BaseModel], streams: bool) -> dict:
    ok: dict = {"model": response_model, "description": "the answer" + (" (text/event-stream with stream: true)" if streams else "")}
    if streams:
        # One schema per server-sent event (its fields, as OpenAPI 3.2's itemSchema has them): data is a JSON chunk
        # of the answer, an {"error": …} object, or [DONE].
        ok["content"] = {"text/event-stream": {"schema": {
            "type": "object", "required": ["data"],
            "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}}}}}
    return {"responses": {200: ok, **_ERRORS},
            "openapi_extra": {"requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{request_model.__name__}"}}}}}}


def _lifespan(settings: Settings, engine, say, on_fatal):
    """The app's lifespan: it owns the engine, and with `say` reports loading progress."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        asyncio.get_running_loop().set_exception_handler(_quiet_late_wakeups)
        async with engine:
            app.state.serving = Serving(settings, engine)
            report = asyncio.create_task(_report_loading(engine, say, on_fatal or (lambda m: None))) if say else None
            try:
                yield
            finally:
                if report:
                    report.cancel()
                    say("  stopping engine…")

    return lifespan


def _quiet_late_wakeups(loop, context: dict) -> None:
    """The loop's exception handler, minus one benign race: anyio waits for an engine socket with
    `loop.add_reader(sock, future.set_result, None)`, and when the waiting request is ended (a client gone, the
    drain at shutdown) just as the socket turns readable, the queued wake-up finds its future cancelled and the loop
    would log "Exception in callback … InvalidStateError" with a traceback. Nothing is lost: that is dropped."""
    handle = context.get("handle")
    if isinstance(context.get("exception"), asyncio.InvalidStateError) and "set_result" in repr(handle):
        log.debug("late wake-up of a cancelled waiter ignored: %r", handle)
        return
    loop.default_exception_handler(context)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, FastAPI's own included, answered in OpenAI's error shape."""

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
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))  # e.g. 405's Allow

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {exc.__class__.__name__}", "server_error"), status_code=500)


def _respond(result):
    """The HTTP response for what Serving returned: an answer, an error, a stream, or None (the client left)."""
    if result is None:  # the client left; nobody reads this
        return Response(status_code=499)
    if isinstance(result, Err):
        return JSONResponse(result.body, status_code=result.status, headers=result.headers)
    if isinstance(result, Stream):
        return _CancellingStream(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return JSONResponse(result)


async def _parse(request: Request, model):
    # Parse JSON whatever the Content-Type (curl -d sends form-encoded by default).
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


def _add_status_routes(app: FastAPI) -> None:
    """GET /health, /metrics and /v1/models."""

    @app.get("/health", response_model=Health, responses={503: {"model": Health, "description": "engine not ready"}})
    async def health(request: Request):
        status, body = await request.app.state.serving.health()
        return JSONResponse(body, status_code=status, headers={} if status == 200 else {"Retry-After": "2"})

    @app.get("/metrics", responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                          "description": "Prometheus text: hybridinfer_* then the engine's own"},
                                    401: _ERRORS[401]})
    async def metrics(request: Request):
        s: Serving = request.app.state.serving
        text = s.metrics.render()
        engine_text = await s.engine_metrics()
        if engine_text:
            text += b"# engine metrics\n" + engine_text.encode()
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=ModelList, responses={401: _ERRORS[401]})
    async def models(request: Request):
        return request.app.state.serving.models()


def _add_generation_routes(app: FastAPI) -> None:
    """POST /tokenize, /v1/chat/completions and /v1/completions, each cancelled if the client leaves."""

    @app.post("/tokenize", **_post_doc(TokenizeRequest, Tokens, streams=False))
    async def tokenize(request: Request):
        # llama-server's shape ({"content": str} -> {"tokens": [...]}), so clients such as `bench` size prompts exactly.
        req = await _parse(request, TokenizeRequest)
        return _respond(await _watching(request, lambda: request.app.state.serving.tokenize(req.content)))

    @app.post("/v1/chat/completions", **_post_doc(ChatCompletionRequest, ChatCompletion, streams=True))
    async def chat(request: Request):
        req = await _parse(request, ChatCompletionRequest)
        return _respond(await _watching(request, lambda: request.app.state.serving.chat(req)))

    @app.post("/v1/completions", **_post_doc(CompletionRequest, Completion, streams=True))
    async def completions(request: Request):
        req = await _parse(request, CompletionRequest)
        return _respond(await _watching(request, lambda: request.app.state.serving.completions(req)))


def _openapi(app: FastAPI, api_key: str | None):
    """app.openapi: the generated description plus the request schemas (the routes read raw bodies) and, with an
    API key, the bearer security scheme."""

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version="1", summary=app.summary, routes=app.routes)
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for m in (ChatCompletionRequest, CompletionRequest, TokenizeRequest):
                s = m.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(s.pop("$defs", {}))
                comps[m.__name__] = s
            if api_key:
                schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def create_app(settings: Settings, engine, api_key: str | None = None, cors_origins: list[str] | None = None,
               metrics_public: bool = False, max_body: int = DEFAULT_MAX_BODY, say=None, on_fatal=None) -> FastAPI:
    """`engine`: a running engine as described in engines/base.py (engine.runner(plan, ...)). With `say` (a
    print-like callable) the lifespan reports loading progress; `on_fatal(message)` is called on a load failure."""
    app = FastAPI(title="hybridinfer", summary="OpenAI-compatible API of hybridinfer serve",
                  lifespan=_lifespan(settings, engine, say, on_fatal), redoc_url=None)
    app.add_middleware(_Guard, api_key=api_key, metrics_public=metrics_public, max_body=max_body)
    if cors_origins:  # outermost, so that 401/413 answers carry the CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])
    _add_error_handlers(app)
    _add_status_routes(app)
    _add_generation_routes(app)
    app.openapi = _openapi(app, api_key)
    return app
