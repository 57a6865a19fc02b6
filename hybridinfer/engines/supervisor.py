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
from .base import EngineFailed, EngineRejected, EngineTimeout, RunningBase, RunSettings

if TYPE_CHECKING:
    from ..plan import Plan
    from .llamacpp import LlamaCpp

log = logging.getLogger("hybridinfer.engine")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_env(plan: "Plan") -> dict | None:
    """None (inherit), or with an RPC worker on this machine, OpenMP threads that do not spin (rpc.passive_env)."""
    from .rpc import passive_env, shares_cores

    return passive_env() if plan.rpc_servers and shares_cores(plan.rpc_servers) else None


def _die_with_parent():  # runs in the child before exec: no orphan engine if hybridinfer is killed
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


SOCKDIR_PREFIX = "hybridinfer-"
HEALTHY_RESET_S = 60.0  # serving this long resets the restart backoff: one crash now and then never compounds
MAX_BACKOFF_S = 30.0


def clean_stale_sockdirs(tmp: str | None = None) -> list[str]:
    """Remove private socket directories left by a serve that was killed (-9): ours, owned by us, whose owner
    process is gone. Returns what was removed."""
    tmp = tmp or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(tmp)
    except OSError:
        return removed
    for n in names:
        d = os.path.join(tmp, n)
        if not n.startswith(SOCKDIR_PREFIX):
            continue
        try:
            st = os.lstat(d)
            if not os.path.isdir(d) or os.path.islink(d) or st.st_uid != os.getuid():
                continue
            with open(os.path.join(d, "owner.pid")) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            # No owner file: only a directory holding nothing but a dead socket is ours to remove.
            try:
                entries = os.listdir(d)
            except OSError:
                continue
            if entries != ["engine.sock"] or _listening(os.path.join(d, "engine.sock")):
                continue
            pid = 0
        if pid and _alive(pid):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(0.2)
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def load_error(tail) -> str:
    """The engine's own reason for failing to start, from the end of its log."""
    lines = [ln.strip() for ln in tail if ln.strip()]
    for key in ("error loading model", "failed to load model", "error:", "error", "exception", "failed"):
        for ln in reversed(lines):
            if key in ln.lower():
                return ln
    return lines[-1] if lines else "no output"


class Supervisor(RunningBase):
    """Runs llama-server as a child on a private loopback port, streams its log, restarts it if it dies.

    Used as an async context manager by the server's lifespan. `state`: starting | loading | ready | down | stopped.
    An engine that never became ready is not restarted (it would fail the same way): `fatal` says why. One that was
    serving is restarted with a backoff (1, 2, 4 … 30 s) that resets once it has served HEALTHY_RESET_S again.
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
            clean_stale_sockdirs()
            self._sockdir = tempfile.mkdtemp(prefix=SOCKDIR_PREFIX)  # 0700
            with open(os.path.join(self._sockdir, "owner.pid"), "w") as f:
                f.write(str(os.getpid()))  # lets a later serve remove this directory if we are killed
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
        self.failures = 0  # consecutive deaths since the engine last served healthy_reset_s: sets the backoff
        self.healthy_reset_s = float(os.environ.get("HYBRIDINFER_RESTART_RESET_S", HEALTHY_RESET_S))
        self.fatal: str | None = None  # the engine could not start: serving cannot go on
        self.served = False  # became ready at least once
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
            # No keep-alive: llama-server mishandles a connection reused after a streamed answer (the next request
            # is dropped, and a cancelled request on it is never noticed); a Unix-socket connect costs microseconds.
            return httpx.AsyncHTTPTransport(uds=self.sock, limits=httpx.Limits(max_connections=max_connections,
                                                                                max_keepalive_connections=0))
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
            start_new_session=True, preexec_fn=_die_with_parent, env=engine_env(self.plan))
        self._tasks = [asyncio.create_task(self._pump_log(self.proc)), asyncio.create_task(self._watch(self.proc))]
        if self.plan.rpc_servers:
            self._tasks.append(asyncio.create_task(self._watch_workers(self.proc)))

    async def _watch_workers(self, proc, every: float = 1.0) -> None:
        """An engine whose RPC worker is gone cannot compute (llama.cpp aborts at its next use of it): stop it as
        soon as its connection to a worker drops, so /health says engine_down now and the restart waits for the
        worker. Only once the engine is ready: it connects to the workers while loading."""
        from .rpc import dead_links

        await self._ready.wait()
        while proc.returncode is None and not self._stopping:
            dead = await asyncio.to_thread(dead_links, proc.pid, self.plan.rpc_servers)
            if dead and proc.returncode is None and not self._stopping:
                log.error("RPC worker %s dropped its connection: stopping %s", ", ".join(dead), self.label)
                self.state = "down"
                self._ready.clear()
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return
            await asyncio.sleep(every)

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
        was_ready = self.ready_at > self.started_at  # this run served (the RPC watch clears _ready before a kill)
        self.state = "down"
        self._ready.clear()
        if not self.served and not await self._worker_gone():
            await asyncio.wait(self._tasks[:1], timeout=2.0)  # the log's last lines carry the reason
            why = load_error(self.tail)
            self.fatal = (f"{self.label} could not start ({why}) — update the engine (./install.sh rebuilds it) if the "
                          f"model is newer than the build, or use another GGUF")
            log.error("%s exited with status %s before it was ready: %s", self.label, rc, why)
            return
        last = next((ln for ln in reversed(self.tail) if ln.strip()), "")
        if was_ready and time.monotonic() - self.ready_at >= self.healthy_reset_s:
            self.failures = 0
        delay = min(MAX_BACKOFF_S, 1.0 * 2 ** min(self.failures, 5))
        log.error("%s exited with status %s (last line: %s)%s", self.label, rc, last,
                  f"; restarting in {delay:g} s" if self.restart else "")
        if self.restart:
            self.failures += 1
            await asyncio.sleep(delay)
            await self._wait_workers()
            if not self._stopping:
                self.restarts += 1
                await self.start()

    async def _worker_gone(self) -> bool:
        """An RPC worker unreachable now: the engine failed for want of it, not for the model; wait and restart."""
        from .rpc import check_reachable

        if not self.plan.rpc_servers:
            return False
        try:
            await asyncio.to_thread(check_reachable, self.plan.rpc_servers)
            return False
        except HybridError:
            return True

    async def _wait_workers(self) -> None:
        """With RPC workers, restart only once every one is back (llama.cpp aborts on an unreachable worker)."""
        from .rpc import check_reachable

        said = None
        while self.plan.rpc_servers and not self._stopping:
            try:
                await asyncio.to_thread(check_reachable, self.plan.rpc_servers)
                return
            except HybridError as e:
                if e.problem != said:
                    log.error("%s; restarting %s when it is back", e.problem, self.label)
                    said = e.problem
                await asyncio.sleep(2.0)

    async def _wait_healthy(self, proc) -> None:
        async with httpx.AsyncClient(timeout=2.0, transport=self._transport()) as c:
            while proc.returncode is None:
                try:
                    r = await c.get(self.base_url + "/health")
                    if r.status_code == 200:
                        self.state = "ready"
                        self.served = True
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
        """One answer, read from the engine as a stream: llama-server stops a streamed request on the next token
        once its connection closes, while a non-streamed one it may keep generating for nobody (seen under load)."""
        body = dict(body, stream=True, stream_options={"include_usage": True})
        try:
            with anyio.fail_after(self.request_timeout):  # the whole answer, as a non-streamed client expects
                return assemble(path, [c async for c in self.stream(path, body)])
        except TimeoutError:
            raise EngineTimeout(f"no complete answer within {self.request_timeout:g} s") from None

    async def stream(self, path: str, body: dict):
        r = None
        try:
            r = await self._client.send(self._client.build_request("POST", self.base_url + path, json=body), stream=True)
            if r.status_code >= 400:
                await r.aread()
                raise rejected(r)
            async for payload in sse_payloads(r.aiter_lines()):
                if payload == "[DONE]":
                    return
                chunk = orjson.loads(payload)
                if chunk is None:
                    continue  # `data: null` separates the prompts of a multi-prompt request
                if "error" in chunk:
                    e = chunk["error"]
                    code = str(e.get("code", ""))
                    raise EngineRejected(int(code) if code.isdigit() else 500, e.get("message") or str(e), e.get("type"))
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

    async def tokenize(self, text: str) -> list[int]:
        try:
            r = await self._client.post(self.base_url + "/tokenize", json={"content": text}, timeout=30)
        except httpx.TimeoutException as e:
            raise _timeout(e) from None
        except httpx.HTTPError as e:
            raise EngineFailed(e.__class__.__name__) from None
        if r.status_code >= 400:
            raise rejected(r)
        return r.json().get("tokens", [])

    async def metrics_text(self) -> str:
        try:
            r = await self._client.get(self.base_url + "/metrics", timeout=1.0)
            return r.text if r.status_code == 200 else ""
        except (httpx.HTTPError, AttributeError):
            return ""


def assemble(path: str, chunks: list[dict]) -> dict:
    """Streamed chunks -> the non-streamed OpenAI answer (choices by index; content, reasoning, tool calls and
    logprobs joined; usage summed over the prompts of a multi-prompt request; the engine's timings kept)."""
    chat = path.endswith("chat/completions")
    out: dict = {"object": "chat.completion" if chat else "text_completion"}
    choices: dict[int, dict] = {}
    usage: dict = {}
    for ch in chunks:
        for k in ("id", "created", "model", "system_fingerprint"):
            if k in ch and k not in out:
                out[k] = ch[k]
        if ch.get("timings"):
            out["timings"] = ch["timings"]
        u = ch.get("usage")
        if u:
            for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
                usage[k] = usage.get(k, 0) + (u.get(k) or 0)
            cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
            if cached is not None:
                d = usage.setdefault("prompt_tokens_details", {"cached_tokens": 0})
                d["cached_tokens"] += cached
        for c in ch.get("choices") or []:
            i = c.get("index", 0)
            acc = choices.setdefault(i, {"index": i, "finish_reason": None, "logprobs": None})
            if c.get("finish_reason"):
                acc["finish_reason"] = c["finish_reason"]
            lp = c.get("logprobs")
            if isinstance(lp, dict) and isinstance(lp.get("content"), list):
                acc["logprobs"] = acc["logprobs"] or {"content": []}
                acc["logprobs"]["content"] += lp["content"]
            if not chat:
                acc["text"] = acc.get("text", "") + (c.get("text") or "")
                continue
            msg = acc.setdefault("message", {"role": "assistant", "content": None})
            delta = c.get("delta") or {}
            for k in ("content", "reasoning_content"):
                if delta.get(k):
                    msg[k] = (msg.get(k) or "") + delta[k]
            for tc in delta.get("tool_calls") or []:
                calls = msg.setdefault("tool_calls", [])
                j = tc.get("index", len(calls))
                while len(calls) <= j:
                    calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                call = calls[j]
                if tc.get("id"):
                    call["id"] = tc["id"]
                fn = tc.get("function") or {}
                call["function"]["name"] += fn.get("name") or ""
                call["function"]["arguments"] += fn.get("arguments") or ""
    out["choices"] = [choices[i] for i in sorted(choices)]
    out["usage"] = usage
    return out


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