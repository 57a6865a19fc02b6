"""The HTTP client hybridinfer drives a supervised engine server with: requests, SSE reading, and the mapping of
what goes wrong to EngineRejected / EngineFailed / EngineTimeout. Where servers differ (request form, stream form,
usage, finish reasons, tokenizer, transport) it asks the engine's `Dialect` (engines/dialect.py)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, AsyncGenerator, AsyncIterator, Callable

import anyio
import httpx
import orjson

from .base import EngineFailed, EngineRejected, EngineTimeout

if TYPE_CHECKING:
    from .dialect import Dialect


class EngineClient:
    """One engine server's API at `sock` (a Unix socket) or 127.0.0.1:`port`, spoken in `dialect`."""

    def __init__(self, dialect: "Dialect", sock: str | None, port: int, request_timeout: float, max_connections: int):
        self.dialect = dialect
        self.sock = sock
        self.port = port
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self._client: httpx.AsyncClient | None = None

    @property
    def base_url(self) -> str:
        return "http://engine" if self.sock else f"http://127.0.0.1:{self.port}"

    def open(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.request_timeout, connect=5.0),
                                             transport=self.dialect.transport(self.sock, self.max_connections))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def wait_healthy(self, alive: Callable[[], bool]) -> bool:
        """Poll the dialect's readiness endpoint while `alive()`; True once it answers 200."""
        d = self.dialect
        async with httpx.AsyncClient(timeout=2.0, transport=d.transport(self.sock)) as c:
            while alive():
                try:
                    r = await c.get(self.base_url + d.ready_path)
                    if r.status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(d.ready_poll_s)
        return False

    # --- the engine interface (engines/base.py Running) ------------------------------------------------------
    async def complete(self, path: str, body: dict) -> dict:
        return await self.dialect.complete(self, path, body)

    async def stream(self, path: str, body: dict) -> AsyncIterator[dict]:
        events = self.events(path, self.dialect.stream_request(path, body))
        chunks = self.dialect.chunks(self, path, body, events)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            with anyio.CancelScope(shield=True):  # closing the engine connection is what stops its generation
                await chunks.aclose()
                await events.aclose()

    async def tokenize(self, text: str) -> list[int]:
        return await self.dialect.tokenize(self, text)

    async def metrics_text(self) -> str:
        if not self.dialect.metrics_path:
            return ""
        try:
            r = await self._client.get(self.base_url + self.dialect.metrics_path, timeout=1.0)
            return r.text if r.status_code == 200 else ""
        except (httpx.HTTPError, AttributeError):
            return ""

    async def busy(self, timeout: float = 0.5) -> int | None:
        """The engine's own count of requests it is processing (prompt or generation), from its /metrics. None if
        it does not say, or does not answer within `timeout` (llama-server answers /metrics between two batches)."""
        name = self.dialect.busy_metric
        if not (name and self.dialect.metrics_path and self._client):
            return None
        try:
            r = await self._client.get(self.base_url + self.dialect.metrics_path, timeout=timeout)
        except httpx.HTTPError:
            return None
        for line in r.text.splitlines() if r.status_code == 200 else []:
            if line.startswith(name + " "):
                return int(float(line.split()[1]))
        return None

    # --- transport ------------------------------------------------------------------------------------------
    async def post(self, path: str, body: dict, timeout: float | None = None) -> dict:
        """One non-streamed request -> its JSON answer."""
        kw = {} if timeout is None else {"timeout": timeout}
        try:
            r = await self._client.post(self.base_url + path, json=body, **kw)
        except httpx.TimeoutException as e:
            raise _timeout(e) from None
        except httpx.HTTPError as e:
            raise EngineFailed(e.__class__.__name__) from None
        if r.status_code >= 400:
            raise rejected(r)
        return r.json()

    async def events(self, path: str, body: dict) -> AsyncGenerator[dict, None]:
        """The engine's stream as it sends it: one dict per `data:` event, up to `[DONE]`."""
        r = None
        try:
            r = await self._client.send(self._client.build_request("POST", self.base_url + path, json=body), stream=True)
            if r.status_code >= 400:
                await r.aread()
                raise rejected(r)
            async for payload in sse_payloads(r.aiter_lines()):
                if payload == "[DONE]":
                    return
                chunk = self.dialect.event(payload)
                if chunk is None:
                    continue  # `data: null` separates the prompts of a multi-prompt request
                if "error" in chunk:
                    raise self.dialect.error_event(chunk["error"])
                yield chunk
        except httpx.TimeoutException as e:
            raise _timeout(e) from None
        except httpx.HTTPError as e:
            raise EngineFailed(e.__class__.__name__) from None
        finally:
            if r is not None:
                # The engine stops generating only when this socket closes. Starlette cancels through anyio,
                # whose cancellation would also cancel an unshielded close and leak the connection.
                with anyio.CancelScope(shield=True):
                    await r.aclose()


def _timeout(e: httpx.TimeoutException) -> EngineFailed:
    # Not connecting in time means the engine is not there; a read that waited too long is the request's timeout.
    return EngineFailed(e.__class__.__name__) if isinstance(e, httpx.ConnectTimeout) else EngineTimeout(e.__class__.__name__)


def rejected(r: httpx.Response) -> EngineRejected:
    """An engine's 4xx/5xx as EngineRejected: llama.cpp's {"error": {message, type}}, FastAPI's {"detail": ...}
    (KTransformers), or plain text."""
    try:
        data = r.json()
    except ValueError:
        return EngineRejected(r.status_code, r.text or f"engine returned HTTP {r.status_code}")
    if not isinstance(data, dict):
        return EngineRejected(r.status_code, r.text)
    e = data.get("error") if isinstance(data.get("error"), dict) else data
    msg = e.get("message") or e.get("detail") or r.text
    return EngineRejected(r.status_code, msg if isinstance(msg, str) else orjson.dumps(msg).decode(), e.get("type"))


async def sse_payloads(lines):
    """The payloads of an SSE stream's `data:` lines (with or without the space older servers omit)."""
    async for line in lines:
        if line.startswith("data:"):
            yield line[5:].strip()
