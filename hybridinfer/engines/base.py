"""The small interface a running engine offers the server.

A running engine is an async context manager with:
  state          starting | loading | ready | down | stopped
  restarts       how many times it was restarted after dying
  started_at / ready_at   monotonic seconds (load time = ready_at - started_at)
  command()      what it runs, for the banner (argv list)
  wait_ready(timeout) -> bool
  complete(path, body) -> dict                     one OpenAI-shaped response
  stream(path, body)   -> async iterator of dict   OpenAI-shaped chunks, the last one carrying `usage`
  tokenize(text) -> list[int]                      the model's tokenizer (no BOS)
  metrics_text() -> str                            the engine's own Prometheus text ("" if none)
`path` is "/v1/chat/completions" or "/v1/completions"; `body` is the OpenAI request body.
"""

from __future__ import annotations

import asyncio


class EngineRejected(Exception):
    """The engine answered the request with an error (bad request, context exceeded, ...)."""

    def __init__(self, status: int, message: str, type_: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")


class EngineFailed(Exception):
    """The engine broke during the request (died, connection lost)."""


class EngineTimeout(EngineFailed):
    """The engine did not answer within the request timeout (it is still running; the request was dropped)."""


class Running:
    """What every running engine shares: async-context-manager lifecycle and waiting for readiness.
    Subclasses define start(), stop() and set `self._ready` (an asyncio.Event) when loaded."""

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc):
        await self.stop()

    async def wait_ready(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
