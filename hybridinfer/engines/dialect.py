"""What differs between the HTTP servers hybridinfer supervises, as hooks of one `Dialect`: how the process is
launched (binary, argv, socket or port, readiness endpoint), the transport, and how requests and answers are
spoken (request body, SSE events, error events, usage, finish reasons, tokenizer, metrics).

The base class speaks llama-server's API (llama.cpp and forks sharing it); other servers override what differs.
engines/runner.py runs any of them through one process supervisor and one HTTP client."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, AsyncGenerator, Protocol

import anyio
import httpx
import orjson

from .base import EngineRejected, EngineTimeout, RunSettings, strip_flags
from .chunks import assemble

if TYPE_CHECKING:
    from .base import Engine
    from .client import EngineClient

FAILURE_HINT = ("update the engine (./install.sh rebuilds it) if the model is newer than the build, "
                "or use another GGUF")


class ServerEngine(Protocol):
    """What the default launch hooks ask of the engine: llama-server's family (engines/llamacpp.py) has it all;
    a dialect for another server overrides those hooks instead."""

    name: str
    missing_metrics: tuple[str, ...]  # llamacpp:* metrics mainline reports and this build's server does not

    def binary(self) -> str | None: ...

    def unix_socket(self, binary: str) -> bool: ...

    def launch_argv(self, command: list[str], host: str, port: int, settings: RunSettings) -> list[str]: ...


class Dialect:
    """llama-server's API. `engine` is the engine object (engines/base.py Engine) the plan names."""

    ready_path = "/health"  # answers 200 once the model is loaded
    ready_poll_s = 0.1
    metrics_path: str | None = "/metrics"
    failure_hint = FAILURE_HINT  # said with the engine's own reason when it dies before it is ready
    # The request field that makes a streamed answer report the prefill's progress: llama-server sends chunks
    # with `prompt_progress` {total, cache, processed, time_ms} after each batch of the prompt
    # (tools/server/server-context.cpp, `return_progress`, llama.cpp as vendored by llama-cpp-python 0.3.36).
    progress_field: str | None = "return_progress"
    # Where the engine says how many requests it is working on (llama-server's Prometheus text); read by /health.
    busy_metric: str | None = "llamacpp:requests_processing"

    def __init__(self, engine: "Engine"):
        self.engine = engine

    @property
    def server(self) -> ServerEngine:
        return self.engine  # type: ignore[return-value] — the default hooks run only for llama-server's family

    # --- launch -----------------------------------------------------------------------------------------
    def binary(self, argv0: str) -> str | None:
        """The planned binary; a bare name (planned where none was installed) is looked up here."""
        return argv0 if os.sep in argv0 else self.server.binary()

    def unix_socket(self, binary: str) -> bool:
        """Whether it can listen on a private Unix socket (no TCP Nagle/delayed-ACK stalls on the streamed tokens,
        no port another local user could reach)."""
        return self.server.unix_socket(binary)

    def argv(self, command: list[str], host: str, port: int, settings: RunSettings) -> list[str]:
        """plan.command as planned: only the engine's runtime flags (endpoint, model id, verbosity) differ."""
        return self.server.launch_argv(command, host, port, settings)

    def notes(self, label: str, sock: str | None, port: int) -> tuple[str, ...]:
        notes = []
        if not sock:
            notes.append(f"{label} cannot listen on a Unix socket: the engine runs on 127.0.0.1:{port} "
                         "(loopback only; hybridinfer opens a fresh no-delay connection per request)")
        missing = self.server.missing_metrics
        if missing:
            notes.append(f"{self.server.name}'s /metrics does not report " + ", ".join(missing) +
                         "; hybridinfer's own hybridinfer_* metrics count requests, tokens and latency for it")
        return tuple(notes)

    def transport(self, sock: str | None, max_connections: int = 10) -> httpx.AsyncHTTPTransport:
        if sock:
            # No keep-alive: llama-server mishandles a connection reused after a streamed answer (the next request
            # is dropped, and a cancelled request on it is never noticed); a Unix-socket connect costs microseconds.
            return httpx.AsyncHTTPTransport(uds=sock, limits=httpx.Limits(max_connections=max_connections,
                                                                           max_keepalive_connections=0))
        # TCP fallback: a fresh loopback connection per request, since on a reused one the kernel's delayed ACKs
        # and llama-server's Nagle hold the first streamed tokens back by tens of ms.
        return httpx.AsyncHTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                                        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=0))

    # --- requests and answers -------------------------------------------------------------------------------
    async def complete(self, client: "EngineClient", path: str, body: dict) -> dict:
        """One answer, read from the engine as a stream: llama-server stops a streamed request on the next token
        once its connection closes, while a non-streamed one it may keep generating for nobody (seen under load)."""
        body = dict(body, stream=True, stream_options={"include_usage": True})
        try:
            with anyio.fail_after(client.request_timeout):  # the whole answer, as a non-streamed client expects
                return assemble(path, [c async for c in client.stream(path, body)])
        except TimeoutError:
            raise EngineTimeout(f"no complete answer within {client.request_timeout:g} s") from None

    def stream_request(self, path: str, body: dict) -> dict:
        """The body sent for a streamed request."""
        return body

    def event(self, payload: str):
        """One SSE `data:` payload -> its JSON value."""
        return orjson.loads(payload)

    def error_event(self, e: dict) -> EngineRejected:
        """An error sent inside the stream: llama-server puts the HTTP status in `code`."""
        code = str(e.get("code", ""))
        return EngineRejected(int(code) if code.isdigit() else 500, e.get("message") or str(e), e.get("type"))

    def chunks(self, client: "EngineClient", path: str, body: dict,
               events: AsyncGenerator[dict, None]) -> AsyncGenerator[dict, None]:
        """The engine's events -> OpenAI chunks (finish reasons, usage once at the end). llama-server's already are."""
        return events

    async def tokenize(self, client: "EngineClient", text: str) -> list[int]:
        return (await client.post("/tokenize", {"content": text}, timeout=30)).get("tokens", [])
