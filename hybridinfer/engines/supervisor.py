"""Runs a llama-server-family engine (llama.cpp, and forks sharing its HTTP API) as a supervised child: exactly
plan.command plus the engine's runtime flags, on a private Unix socket or loopback port, restarted if it dies, and
driven through the interface of engines/base.py."""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from typing import TYPE_CHECKING

import anyio
import httpx
import orjson

from ..errors import HybridError
from .base import EngineFailed, EngineRejected, Running, RunSettings

if TYPE_CHECKING:
    from ..plan import Plan
    from .llamacpp import LlamaCpp

log = logging.getLogger("hybridinfer.engine")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():  # runs in the child before exec: no orphan engine if hybridinfer is killed
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Supervisor(Running):
    """Runs llama-server as a child on a private loopback port, streams its log, restarts it if it dies.

    Used as an async context manager by the server's lifespan. `state`: starting | loading | ready | down | stopped.
    """

    def __init__(self, engine: LlamaCpp, plan: "Plan", settings: RunSettings, restart: bool = True):
        self.engine = engine
        self.plan = plan
        self.settings = settings
        argv0 = plan.command[0]
        # The planned binary; a bare name (planned where none was installed) is looked up here.
        self.binary = argv0 if os.sep in argv0 else engine.binary()
        if not self.binary or not os.access(self.binary, os.X_OK):
            raise HybridError(f"{argv0} not found (engine {engine.name})", engine.install_hint)
        self.label = os.path.basename(self.binary)
        self.port = free_port()
        # A private Unix socket where the build takes one (`--host x.sock`): no TCP Nagle/delayed-ACK stalls on the
        # streamed tokens (llama-server leaves Nagle on) and no port another local user could reach.
        self.sock: str | None = None
        if engine.unix_socket(self.binary):
            self._sockdir = tempfile.mkdtemp(prefix="hybridinfer-")  # 0700
            self.sock = os.path.join(self._sockdir, "engine.sock")
        notes = []
        if not self.sock:
            notes.append(f"{self.label} cannot listen on a Unix socket: the engine runs on 127.0.0.1:{self.port} "
                         "(loopback only; hybridinfer opens a fresh no-delay connection per request)")
        if engine.missing_metrics:
            notes.append(f"{engine.name}'s /metrics does not report " + ", ".join(engine.missing_metrics) +
                         "; hybridinfer's own hybridinfer_* metrics count requests, tokens and latency for it")
        self.notes = tuple(notes)
        self.log_file = settings.log_file
        self.restart = restart
        self.on_line = settings.on_line
        self.state = "starting"
        self.proc: asyncio.subprocess.Process | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=200)
        self.restarts = 0
        self.started_at = 0.0
        self.ready_at = 0.0
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self._ready = asyncio.Event()
        self._client: httpx.AsyncClient | None = None
        self.request_timeout = settings.request_timeout
        self.max_connections = settings.max_connections

    @property
    def base_url(self) -> str:
        return "http://engine" if self.sock else f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """Where the engine listens, for people: a socket path or host:port."""
        return self.sock or f"127.0.0.1:{self.port}"

    def _transport(self, max_connections: int = 10) -> httpx.AsyncHTTPTransport:
        if self.sock:
            return httpx.AsyncHTTPTransport(uds=self.sock, limits=httpx.Limits(max_connections=max_connections))
        # TCP fallback: a fresh loopback connection per request, since on a reused one the kernel's delayed ACKs
        # and llama-server's Nagle hold the first streamed tokens back by tens of ms.
        return httpx.AsyncHTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                                        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=0))

    def command(self) -> list[str]:
        """plan.command, run as planned: only the engine's runtime flags (endpoint, model id, verbosity) differ."""
        cmd = self.engine.launch_argv(self.plan.command, self.sock or "127.0.0.1", self.port, self.settings)
        return [self.binary] + cmd[1:]

    async def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.request_timeout, connect=5.0),
                                             transport=self._transport(self.max_connections))
        cmd = self.command()
        if self.sock and os.path.exists(self.sock):
            os.unlink(self.sock)  # left by a crashed engine
        log.info("starting: %s", " ".join(cmd))
        self.state = "loading"
        self._ready.clear()
        self.started_at = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent)
        self._tasks = [asyncio.create_task(self._pump_log(self.proc)), asyncio.create_task(self._watch(self.proc))]

    async def _pump_log(self, proc) -> None:
        f = open(self.log_file, "a") if self.log_file else None
        try:
            async for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                self.tail.append(line)
                if f:
                    f.write(line + "\n")
                    f.flush()
                if self.on_line:
                    self.on_line(line)
                else:
                    log.debug("%s", line)
        finally:
            if f:
                f.close()

    async def _watch(self, proc) -> None:
        health = asyncio.create_task(self._wait_healthy(proc))
        rc = await proc.wait()
        health.cancel()
        if self._stopping:
            return
        self.state = "down"
        self._ready.clear()
        last = next((ln for ln in reversed(self.tail) if ln.strip()), "")
        log.error("%s exited with status %s (last line: %s)", self.label, rc, last)
        if self.restart:
            delay = min(30.0, 1.0 * 2 ** min(self.restarts, 5))
            await asyncio.sleep(delay)
            if not self._stopping:
                self.restarts += 1
                await self.start()

    async def _wait_healthy(self, proc) -> None:
        async with httpx.AsyncClient(timeout=2.0, transport=self._transport()) as c:
            while proc.returncode is None:
                try:
                    r = await c.get(self.base_url + "/health")
                    if r.status_code == 200:
                        self.state = "ready"
                        self.ready_at = time.monotonic()
                        self._ready.set()
                        log.info("%s ready in %.1f s", self.label, self.ready_at - self.started_at)
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self.state = "stopped"
        proc = self.proc
        if proc and proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except asyncio.TimeoutError:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await proc.wait()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self.sock:
            shutil.rmtree(self._sockdir, ignore_errors=True)

    # --- the engine interface the server uses (see engines/base.py) ----------------------------------
    async def complete(self, path: str, body: dict) -> dict:
        try:
            r = await self._client.post(self.base_url + path, json=body)
        except httpx.HTTPError as e:
            raise EngineFailed(e.__class__.__name__) from None
        if r.status_code >= 400:
            raise _rejected(r)
        return r.json()

    async def stream(self, path: str, body: dict):
        r = None
        try:
            r = await self._client.send(self._client.build_request("POST", self.base_url + path, json=body), stream=True)
            if r.status_code >= 400:
                await r.aread()
                raise _rejected(r)
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:].strip()
                if payload == "[DONE]":
                    return
                chunk = orjson.loads(payload)
                if "error" in chunk:
                    e = chunk["error"]
                    code = str(e.get("code", ""))
                    raise EngineRejected(int(code) if code.isdigit() else 500, e.get("message") or str(e), e.get("type"))
                yield chunk
        except httpx.HTTPError as e:
            raise EngineFailed(e.__class__.__name__) from None
        finally:
            if r is not None:
                # The engine stops generating only when this socket closes. Starlette cancels through anyio,
                # whose cancellation would also cancel an unshielded close and leak the connection.
                with anyio.CancelScope(shield=True):
                    await r.aclose()

    async def tokenize(self, text: str) -> list[int]:
        try:
            r = await self._client.post(self.base_url + "/tokenize", json={"content": text}, timeout=30)
        except httpx.HTTPError as e:
            raise EngineFailed(e.__class__.__name__) from None
        if r.status_code >= 400:
            raise _rejected(r)
        return r.json().get("tokens", [])

    async def metrics_text(self) -> str:
        try:
            r = await self._client.get(self.base_url + "/metrics", timeout=1.0)
            return r.text if r.status_code == 200 else ""
        except (httpx.HTTPError, AttributeError):
            return ""


def _rejected(r: httpx.Response) -> EngineRejected:
    try:
        e = r.json().get("error", {})
        return EngineRejected(r.status_code, e.get("message") or r.text, e.get("type"))
    except (ValueError, AttributeError):
        return EngineRejected(r.status_code, r.text or f"engine returned HTTP {r.status_code}")
