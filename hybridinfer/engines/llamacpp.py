"""llama.cpp's `llama-server`: the plan as its exact command line (flags checked against the build), and a
supervisor that runs it."""

from __future__ import annotations

import asyncio
import collections
import ctypes
import functools
import logging
import os
import signal
import socket
import subprocess
import time

import httpx

from ..plan import Plan
from ..probe import find_llama_binary
from .llamacpp_args import compile_placement

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
    cpu_experts = any(d == "cpu" for d in plan.device_of.values()) and any(d != "cpu" for d in plan.device_of.values())
    # Weights read into RAM run faster than mmap'd ones when experts stay on the CPU; streaming needs mmap.
    if has_flag(binary, "--load-mode"):
        if plan.streaming:
            cmd += ["--load-mode", "mmap"]
        elif cpu_experts:
            cmd += ["--load-mode", "none"]
    elif cpu_experts and not plan.streaming and has_flag(binary, "--no-mmap"):
        cmd += ["--no-mmap"]
    if has_flag(binary, "--metrics"):
        cmd += ["--metrics"]
    if has_flag(binary, "--jinja"):
        cmd += ["--jinja"]
    if has_flag(binary, "--reasoning-format"):
        cmd += ["--reasoning-format", "none"]  # hybridinfer's server splits <think> itself, for any engine
    cmd += ["--host", host, "--port", str(port)]
    return cmd + list(extra or [])


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


class Supervisor:
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

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return command(self.plan, host="127.0.0.1", port=self.port, binary=self.binary, extra=self.extra)

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc):
        await self.stop()

    async def start(self) -> None:
        cmd = self.command()
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
        async with httpx.AsyncClient(timeout=2.0) as c:
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

    async def wait_ready(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

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
