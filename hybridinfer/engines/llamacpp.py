"""llama.cpp's `llama-server` as an engine: the plan as its exact command line (flags checked against the installed
build's --help), a supervisor that runs it, and `llama-bench` with the same placement.

A sibling engine built from a llama.cpp fork (ik_llama.cpp) subclasses `LlamaCpp` and differs only in its binary
names, flags and capabilities.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import TYPE_CHECKING

import anyio
import httpx
import orjson

from ..errors import HybridError
from ..predict import PredictionParams
from ..probe import EngineInfo, binary_has_cuda, find_llama_binary
from .base import Engine, EngineFailed, EngineRejected, NumaPolicy, Running, RunSettings
from .llamacpp_args import Compiled, buffer_name, compile_placement

if TYPE_CHECKING:
    from ..inspect_gguf import ModelInfo
    from ..plan import Plan
    from ..probe import HardwareProfile

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8080  # in the printed command; `serve` injects its own


@functools.lru_cache(maxsize=8)
def help_text(binary: str) -> str:
    """The installed build's `--help`: flags differ between llama.cpp versions, so never assume one."""
    try:
        out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30)
        return out.stdout + out.stderr
    except (OSError, subprocess.SubprocessError):
        return ""


@functools.lru_cache(maxsize=8)
def help_flags(binary: str) -> frozenset[str]:
    """Every flag the build's --help names (`-fa, --flash-attn [on|off]` -> {-fa, --flash-attn})."""
    return frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", help_text(binary)))


def compiled_of(plan: "Plan") -> Compiled:
    """The plan's placement in llama.cpp's form (computed once at plan time, stored in plan.compiled)."""
    c = plan.compiled
    if c and "ngl" in c:
        return Compiled(ngl=c["ngl"], overrides=[tuple(x) for x in c["overrides"]], cpu_moe=c["cpu_moe"])
    return compile_placement(plan.device_of, plan.n_layer)


def placement_args(plan: "Plan") -> list[str]:
    return compiled_of(plan).args()


class LlamaCpp(Engine):
    name = "llama.cpp"
    summary = "llama.cpp's llama-server: every GGUF type on CPU and CUDA, -ot tensor placement, concurrent slots"
    kind = "server"
    server_binary = "llama-server"  # looked up by probe.find_llama_binary (HYBRIDINFER_LLAMA_SERVER, the venv, PATH)
    bench_binary = "llama-bench"
    install_hint = "run ./install.sh (it builds llama.cpp), or set HYBRIDINFER_LLAMA_SERVER to a llama-server binary"
    # ggml's CPU kernels are about 15 % slower than KTransformers' on CPU-resident experts; with a GPU it uploads
    # CPU-resident weights per 512-token ubatch for prefill when that beats computing them on the CPU.
    prediction_params = PredictionParams(cpu_eff=0.85, prefill_uploads_weights=True)
    # What `serve` adds to or replaces in plan.command, and nothing else (value-taking flags map to True).
    runtime_flags = {"--host": True, "--port": True, "--alias": True, "-v": False}

    # --- this box ---------------------------------------------------------------------------------------
    def binary(self) -> str | None:
        return find_llama_binary(self.server_binary)

    def probe(self) -> EngineInfo:
        path = self.binary()
        if not path:
            return EngineInfo(name=self.name, installed=False, detail=f"{self.server_binary} not found: {self.install_hint}")
        version = ""
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
            text = out.stdout + out.stderr
            m = re.search(r"version: (\S+(?: \([^)]*\))?)", text)
            version = m.group(1) if m else text.strip().splitlines()[0] if text.strip() else ""
        except (OSError, subprocess.SubprocessError) as e:
            return EngineInfo(name=self.name, installed=False, path=path, detail=f"{self.server_binary} does not run: {e}")
        return EngineInfo(name=self.name, installed=True, version=version, path=path, gpu=binary_has_cuda(path))

    def flags(self, binary: str | None) -> set[str]:
        return set(help_flags(binary)) if binary else set()

    def has_flag(self, binary: str | None, flag: str) -> bool:
        # No binary to ask (planning where none is installed): write the current flag set.
        return not binary or flag in self.flags(binary)

    def numa_policy(self, nodes: int) -> NumaPolicy:
        return NumaPolicy("distribute", f"NUMA: {nodes} nodes; {self.name} --numa distribute spreads threads and pages")

    def chosen_because(self, model, hw) -> str:
        return "runs every GGUF quant type on CPU and CUDA"

    # --- the command ------------------------------------------------------------------------------------
    def compile(self, plan: "Plan") -> dict:
        c = compile_placement(plan.device_of, plan.n_layer)
        return {"ngl": c.ngl, "overrides": [list(o) for o in c.overrides], "cpu_moe": c.cpu_moe}

    def command(self, plan: "Plan") -> list[str]:
        binary = self.binary()
        return [binary or self.server_binary, "-m", plan.model_path] + self.model_args(plan, binary) + \
            self.endpoint_args(DEFAULT_HOST, DEFAULT_PORT)

    def model_args(self, plan: "Plan", binary: str | None) -> list[str]:
        cmd = ["-c", str(plan.ctx), "-np", str(plan.parallel), "-t", str(plan.threads), "-tb", str(plan.threads)]
        cmd += placement_args(plan)
        if plan.numa:
            cmd += ["--numa", plan.numa]
        cmd += self.kv_args(plan, binary)
        cmd += self.load_args(plan, binary)
        if self.has_flag(binary, "--metrics"):
            cmd += ["--metrics"]
        if self.has_flag(binary, "--jinja"):
            cmd += ["--jinja"]
        if self.has_flag(binary, "--reasoning-format"):
            cmd += ["--reasoning-format", "none"]  # hybridinfer's server splits <think> itself, for any engine
        return cmd

    def kv_args(self, plan: "Plan", binary: str | None) -> list[str]:
        if plan.kv_type == "f16":
            return []
        return ["-ctk", plan.kv_type, "-ctv", plan.kv_type, "-fa", "on"]

    def load_args(self, plan: "Plan", binary: str | None) -> list[str]:
        # Weights read into RAM run faster than mmap'd ones when experts stay on the CPU; streaming needs mmap.
        devs = set(plan.device_of.values()) if plan.device_of else {d.device for d in plan.devices}
        cpu_experts = "cpu" in devs and len(devs) > 1
        if self.has_flag(binary, "--load-mode"):
            if plan.streaming:
                return ["--load-mode", "mmap"]
            if cpu_experts:
                return ["--load-mode", "none"]
        elif cpu_experts and not plan.streaming and self.has_flag(binary, "--no-mmap"):
            return ["--no-mmap"]
        return []

    def endpoint_args(self, host: str, port: int | str) -> list[str]:
        return ["--host", host, "--port", str(port)]

    def strip_runtime(self, argv: list[str]) -> list[str]:
        """argv without the flags `serve` injects (runtime_flags): what must equal plan.command stripped alike."""
        out, i = [], 0
        while i < len(argv):
            if argv[i] in self.runtime_flags:
                i += 2 if self.runtime_flags[argv[i]] else 1
                continue
            out.append(argv[i])
            i += 1
        return out

    def launch_argv(self, command: list[str], host: str, port: int, settings: RunSettings) -> list[str]:
        """plan.command with the server's endpoint, model id and verbosity: the only differences allowed."""
        argv = self.strip_runtime(command) + self.endpoint_args(host, port) + ["--alias", settings.model_id]
        return argv + (["-v"] if settings.verbose else [])

    def runner(self, plan: "Plan", settings: RunSettings) -> "Supervisor":
        return Supervisor(self, plan, settings)

    # --- llama-bench ------------------------------------------------------------------------------------
    def bench_command(self, plan: "Plan", n_prompt: int = 512, n_gen: int = 128, repetitions: int = 3) -> list[str]:
        """`llama-bench` with the plan's placement (pp{n_prompt} / tg{n_gen}); JSON on stdout."""
        exe = find_llama_binary(self.bench_binary) or self.bench_binary
        c = compiled_of(plan)
        cmd = [exe, "-m", plan.model_path, "-p", str(n_prompt), "-n", str(n_gen), "-r", str(repetitions),
               "-t", str(plan.threads), "-ngl", str(c.ngl), "-o", "json"]
        if c.overrides:  # llama-bench has no --cpu-moe: the same regexes, ';'-joined
            cmd += ["-ot", ";".join(f"{rx}={buffer_name(d)}" for rx, d in c.overrides)]
        if plan.numa:
            cmd += ["--numa", plan.numa]
        if plan.kv_type != "f16":
            cmd += ["-ctk", plan.kv_type, "-ctv", plan.kv_type, "-fa", "on"]
        return cmd


ENGINE = LlamaCpp()


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
        if "UNIX socket" in help_text(self.binary):
            self._sockdir = tempfile.mkdtemp(prefix="hybridinfer-")  # 0700
            self.sock = os.path.join(self._sockdir, "engine.sock")
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


# --- llama-bench output ---------------------------------------------------------------------------

def parse_bench(stdout: str) -> list[dict]:
    """llama-bench -o json -> [{"test": "pp512"|"tg128", "tokens_per_s": mean, "stddev": s}, ...]."""
    rows = json.loads(stdout[stdout.index("["):])
    out = []
    for r in rows:
        test = f"pp{r['n_prompt']}" if r.get("n_gen", 0) == 0 else f"tg{r['n_gen']}"
        out.append({"test": test, "tokens_per_s": r["avg_ts"], "stddev": r.get("stddev_ts", 0.0),
                    "n_threads": r.get("n_threads"), "backends": r.get("backends")})
    return out
