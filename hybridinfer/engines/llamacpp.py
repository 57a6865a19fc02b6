"""llama.cpp's `llama-server`: the plan as its exact command line (flags checked against the build), and a
supervisor that runs it."""

from __future__ import annotations

import asyncio
import collections
import ctypes
import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import anyio
import httpx
import orjson

from ..plan import Plan, maps_weights
from ..probe import find_llama_binary
from .base import EngineFailed, EngineRejected, Running
from .llamacpp_args import buffer_name, compile_placement

name = "llama.cpp"
serves_openai = True
supports_placement = True


@functools.lru_cache(maxsize=4)
def help_text(binary: str) -> str:
    """The installed build's `--help`: flags differ between llama.cpp versions, so never assume one."""
    try:
        out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30)
        return out.stdout + out.stderr
    except (OSError, subprocess.SubprocessError):
        return ""


def has_flag(binary: str | None, flag: str) -> bool:
    if not binary:
        return True  # no binary to ask (planning another box): write the current flag set
    text = help_text(binary)
    return f"{flag} " in text or f"{flag}," in text or f"{flag}\n" in text


def placement_args(plan: Plan) -> list[str]:
    return compile_placement(plan.device_of, plan.n_layer).args()


def command(plan: Plan, host: str = "127.0.0.1", port: int = 8080, binary: str | None = None,
            extra: list[str] | None = None) -> list[str]:
    binary = binary or (find_llama_binary("llama-server") if plan.hardware else None)
    exe = binary or "llama-server"
    cmd = [exe, "-m", plan.model_path, "-c", str(plan.ctx), "-np", str(plan.parallel),
           "-t", str(plan.threads), "-tb", str(plan.threads)]
    cmd += placement_args(plan)
    if plan.numa:
        cmd += ["--numa", plan.numa]
    if plan.kv_type != "f16":
        cmd += ["-ctk", plan.kv_type, "-ctv", plan.kv_type, "-fa", "on"]
    cmd += _batch_args(plan)
    cmd += _load_args(plan, binary)
    if has_flag(binary, "--metrics"):
        cmd += ["--metrics"]
    if has_flag(binary, "--jinja"):
        cmd += ["--jinja"]
    if has_flag(binary, "--reasoning-format"):
        cmd += ["--reasoning-format", "none"]  # hybridinfer's server splits <think> itself, for any engine
    cmd += ["--host", host, "--port", str(port)]
    return cmd + list(extra or [])


def _batch_args(plan: Plan) -> list[str]:
    return (["-b", str(plan.batch)] if plan.batch else []) + (["-ub", str(plan.ubatch)] if plan.ubatch else [])


def _into_ram(plan: Plan) -> bool:
    """Weights read into RAM rather than mapped (plan.maps_weights decides, for the memory figure too)."""
    mixed = any(d == "cpu" for d in plan.device_of.values()) and any(d != "cpu" for d in plan.device_of.values())
    return not maps_weights(plan.load_mode, plan.streaming, mixed)


def _load_args(plan: Plan, binary: str | None) -> list[str]:
    ram = _into_ram(plan)
    mmap = plan.streaming or plan.load_mode == "mmap"
    if has_flag(binary, "--load-mode"):
        return ["--load-mode", "mmap"] if mmap else ["--load-mode", "none"] if ram else []
    return ["--no-mmap"] if ram and has_flag(binary, "--no-mmap") else []


# --- supervision --------------------------------------------------------------------------------------

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

    def __init__(self, plan: Plan, binary: str | None = None, extra: list[str] | None = None,
                 log_file: str | None = None, restart: bool = True, on_line=None):
        self.plan = plan
        self.binary = binary or find_llama_binary("llama-server")
        if not self.binary:
            from ..errors import HybridError
            raise HybridError("llama-server not found", "run ./install.sh (it builds llama.cpp), or set HYBRIDINFER_LLAMA_SERVER")
        self.port = free_port()
        # A private Unix socket where the build takes one (`--host x.sock`): no TCP Nagle/delayed-ACK stalls on the
        # streamed tokens (llama-server leaves Nagle on) and no port another local user could reach.
        self.sock: str | None = None
        if "UNIX socket" in help_text(self.binary):
            self._sockdir = tempfile.mkdtemp(prefix="hybridinfer-")  # 0700
            self.sock = os.path.join(self._sockdir, "engine.sock")
        self.extra = list(extra or [])
        self.log_file = log_file
        self.restart = restart
        self.on_line = on_line
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
        self.request_timeout = 600.0
        self.max_connections = 64

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
        return command(self.plan, host=self.sock or "127.0.0.1", port=self.port, binary=self.binary, extra=self.extra)

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
        log.error("llama-server exited with status %s (last line: %s)", rc, last)
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
                        log.info("llama-server ready in %.1f s", self.ready_at - self.started_at)
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


# --- llama-bench ---------------------------------------------------------------------------------------

def bench_command(plan: Plan, binary: str | None = None, n_prompt: int = 512, n_gen: int = 128,
                  repetitions: int = 3) -> list[str]:
    """`llama-bench` with the plan's placement (pp{n_prompt} / tg{n_gen}); JSON on stdout."""
    exe = binary or find_llama_binary("llama-bench") or "llama-bench"
    c = compile_placement(plan.device_of, plan.n_layer)
    cmd = [exe, "-m", plan.model_path, "-p", str(n_prompt), "-n", str(n_gen), "-r", str(repetitions),
           "-t", str(plan.threads), "-ngl", str(c.ngl), "-o", "json"]
    if c.overrides:  # llama-bench has no --cpu-moe: the same regexes, ';'-joined
        cmd += ["-ot", ";".join(f"{rx}={buffer_name(d)}" for rx, d in c.overrides)]
    if plan.numa:
        cmd += ["--numa", plan.numa]
    if plan.kv_type != "f16":
        cmd += ["-ctk", plan.kv_type, "-ctv", plan.kv_type, "-fa", "on"]
    cmd += _batch_args(plan)
    if plan.streaming or plan.load_mode == "mmap":
        cmd += ["-lm", "mmap"] if has_flag(exe, "--load-mode") else []
    elif _into_ram(plan):  # loaded as the server would load it
        cmd += ["-lm", "none"] if has_flag(exe, "--load-mode") else ["-mmp", "0"]
    return cmd


def parse_bench(stdout: str) -> list[dict]:
    """llama-bench -o json -> [{"test": "pp512"|"tg128", "tokens_per_s": mean, "stddev": s}, ...]."""
    rows = json.loads(stdout[stdout.index("["):])
    out = []
    for r in rows:
        test = f"pp{r['n_prompt']}" if r.get("n_gen", 0) == 0 else f"tg{r['n_gen']}"
        out.append({"test": test, "tokens_per_s": r["avg_ts"], "stddev": r.get("stddev_ts", 0.0),
                    "n_threads": r.get("n_threads"), "backends": r.get("backends")})
    return out
