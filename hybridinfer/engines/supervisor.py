"""Runs one engine process as a supervised child: start it, stream its log, notice when it is ready, restart it
with a backoff if it dies, stop it with hybridinfer. Engine-agnostic: what it runs and how readiness is checked come
from a `Launchable` (engines/runner.py gives one per served engine)."""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Callable, Protocol

from ..errors import HybridError
from .base import RunSettings
from .sockdir import free_port  # noqa: F401 — where engines/llamacpp_log.py and tests import it from
from .binaries import rpc_of, rpc_used

if TYPE_CHECKING:
    from ..plan import Plan

log = logging.getLogger("hybridinfer.engine")

HEALTHY_RESET_S = 60.0  # serving this long resets the restart backoff: one crash now and then never compounds
MAX_BACKOFF_S = 30.0


class Launchable(Protocol):
    """What the supervisor needs to know of an engine process."""

    label: str  # the engine's name in log lines and messages
    failure_hint: str  # what to do when it dies before it is ready (after its own reason)

    def command(self) -> list[str]: ...

    def before_start(self) -> None:
        """Clear what a crashed run left (a stale socket)."""
        ...

    async def wait_healthy(self, alive: Callable[[], bool]) -> bool:
        """Poll until it serves (True) or `alive()` turns False."""
        ...


def engine_env(plan: "Plan") -> dict | None:
    """None (inherit), or with an RPC worker on this machine, OpenMP threads that do not spin (rpc.passive_env)."""
    from .rpc import passive_env, shares_cores

    return passive_env() if rpc_of(plan) and shares_cores(rpc_of(plan)) else None


def _die_with_parent():  # runs in the child before exec: no orphan engine if hybridinfer is killed
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def load_error(tail) -> str:
    """The engine's own reason for failing to start, from the end of its log."""
    lines = [ln.strip() for ln in tail if ln.strip()]
    for key in ("error loading model", "failed to load model", "error:", "error", "exception", "failed"):
        for ln in reversed(lines):
            if key in ln.lower():
                return ln
    return lines[-1] if lines else "no output"


class Supervisor:
    """One engine process, restarted if it dies. `state`: starting | loading | ready | down | stopped.

    An engine that never became ready is not restarted (it would fail the same way): `fatal` says why. One that was
    serving is restarted with a backoff (1, 2, 4 … 30 s) that resets once it has served HEALTHY_RESET_S again.
    With RPC workers (the compiled plan's rpc_servers) it also stops the engine when a worker drops and restarts it once back.
    """

    def __init__(self, launch: Launchable, plan: "Plan", settings: RunSettings, restart: bool = True):
        self.launch = launch
        self.plan = plan
        self.label = launch.label
        self.log_file = settings.log_file
        self.on_line = settings.on_line
        self.restart = restart
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
        self.ready = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    async def start(self) -> None:
        cmd = self.launch.command()
        self.launch.before_start()
        log.info("starting: %s", " ".join(cmd))
        self.state = "loading"
        self.ready.clear()
        self.started_at = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent, env=engine_env(self.plan))
        self._tasks = [asyncio.create_task(self._pump_log(self.proc)), asyncio.create_task(self._watch(self.proc))]
        if rpc_of(self.plan):
            self._tasks.append(asyncio.create_task(self._watch_workers(self.proc)))

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

    async def _wait_healthy(self, proc) -> None:
        if await self.launch.wait_healthy(lambda: proc.returncode is None):
            self.state = "ready"
            self.served = True
            self.ready_at = time.monotonic()
            self.ready.set()
            log.info("%s ready in %.1f s", self.label, self.ready_at - self.started_at)

    async def _watch(self, proc) -> None:
        health = asyncio.create_task(self._wait_healthy(proc))
        rc = await proc.wait()
        health.cancel()
        if self._stopping:
            return
        was_ready = self.ready_at > self.started_at  # this run served (the RPC watch clears `ready` before a kill)
        self.state = "down"
        self.ready.clear()
        if not self.served and not await self._worker_gone():
            await self._fail(rc)
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

    async def _fail(self, rc) -> None:
        """It died before it ever served: no restart, `fatal` carries its own reason."""
        await asyncio.wait(self._tasks[:1], timeout=2.0)  # the log's last lines carry the reason
        why = load_error(self.tail)
        self.fatal = f"{self.label} could not start ({why}) — {self.launch.failure_hint}"
        log.error("%s exited with status %s before it was ready: %s", self.label, rc, why)

    # --- RPC workers ---------------------------------------------------------------------------------------
    async def _watch_workers(self, proc, every: float = 1.0) -> None:
        """An engine whose RPC worker is gone cannot compute (llama.cpp aborts at its next use of it): stop it as
        soon as its connection to a worker drops, so /health says engine_down now and the restart waits for the
        worker. Only once the engine is ready: it connects to the workers while loading."""
        from .rpc import dead_links

        watched = rpc_used(self.plan)  # an unused worker's connection is closed by llama.cpp after loading
        await self.ready.wait()
        while watched and proc.returncode is None and not self._stopping:
            dead = await asyncio.to_thread(dead_links, proc.pid, watched)
            if dead and proc.returncode is None and not self._stopping:
                log.error("RPC worker %s dropped its connection: stopping %s", ", ".join(dead), self.label)
                self.state = "down"
                self.ready.clear()
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return
            await asyncio.sleep(every)

    async def _worker_gone(self) -> bool:
        """An RPC worker unreachable now: the engine failed for want of it, not for the model; wait and restart."""
        from .rpc import check_reachable

        if not rpc_of(self.plan):
            return False
        try:
            await asyncio.to_thread(check_reachable, rpc_of(self.plan))
            return False
        except HybridError:
            return True

    async def _wait_workers(self) -> None:
        """With RPC workers, restart only once every one is back (llama.cpp aborts on an unreachable worker)."""
        from .rpc import check_reachable

        said = None
        while rpc_of(self.plan) and not self._stopping:
            try:
                await asyncio.to_thread(check_reachable, rpc_of(self.plan))
                return
            except HybridError as e:
                if e.problem != said:
                    log.error("%s; restarting %s when it is back", e.problem, self.label)
                    said = e.problem
                await asyncio.sleep(2.0)

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self.state = "stopped"
        proc = self.proc
        if proc and proc.returncode is None:
            _signal(proc, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except asyncio.TimeoutError:
                _signal(proc, signal.SIGKILL)
                await proc.wait()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _signal(proc, sig) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
