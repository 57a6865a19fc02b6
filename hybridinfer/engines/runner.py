"""The running engine (engines/base.py `Running`) of every engine served as its own HTTP server: exactly
plan.command plus the engine's runtime flags, on a private Unix socket or loopback port, supervised
(engines/supervisor.py) and driven over HTTP (engines/client.py), both speaking the engine's `Dialect`."""

from __future__ import annotations

import logging
import os
import shutil
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable

from ..errors import HybridError
from .base import EngineRejected, RunningBase, RunSettings
from .client import EngineClient
from .sockdir import free_port, new_sockdir
from .supervisor import Supervisor

log = logging.getLogger("hybridinfer.engine")

if TYPE_CHECKING:
    from ..plan import Plan
    from .dialect import Dialect


class ServerRunner(RunningBase):
    """`plan`'s engine server, spoken to in `dialect`. Also the supervisor's `Launchable`."""

    def __init__(self, dialect: "Dialect", plan: "Plan", settings: RunSettings, restart: bool = True):
        self.dialect = dialect
        self.plan = plan
        self.settings = settings
        engine = dialect.engine
        argv0 = plan.command[0]
        self.binary = dialect.binary(argv0)
        if not self.binary or not os.access(self.binary, os.X_OK):
            raise HybridError(f"{argv0} not found (engine {engine.name})", engine.install_hint)
        self.label = os.path.basename(self.binary)
        self.failure_hint = dialect.failure_hint
        self.port = free_port()
        self.sock: str | None = None
        self._sockdir: str | None = None
        if dialect.unix_socket(self.binary):
            self._sockdir, self.sock = new_sockdir()
        self.notes = dialect.notes(self.label, self.sock, self.port)
        self.client = EngineClient(dialect, self.sock, self.port, settings.request_timeout, settings.max_connections)
        self.supervisor = Supervisor(self, plan, settings, restart)
        self._ready = self.supervisor.ready
        self.before_stop: list[Callable[[], Awaitable[None]]] = []  # awaited, in order, while the engine still runs

    # --- what the server reads (the supervisor keeps it) ---------------------------------------------------
    @property
    def state(self) -> str:
        return self.supervisor.state

    @property
    def restarts(self) -> int:
        return self.supervisor.restarts

    @property
    def fatal(self) -> str | None:
        return self.supervisor.fatal

    @property
    def started_at(self) -> float:
        return self.supervisor.started_at

    @property
    def ready_at(self) -> float:
        return self.supervisor.ready_at

    @property
    def address(self) -> str:
        """Where the engine listens, for people: a socket path or host:port."""
        return self.sock or f"127.0.0.1:{self.port}"

    # --- Launchable ----------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        """plan.command, run as planned: only the engine's runtime flags differ."""
        cmd = self.dialect.argv(self.plan.command, self.sock or "127.0.0.1", self.port, self.settings)
        return [self.binary] + cmd[1:]

    def before_start(self) -> None:
        if self.plan.prompt_cache_dir:  # --slot-save-path must name an existing directory (serve checked it can)
            os.makedirs(self.plan.prompt_cache_dir, exist_ok=True)
        if self.sock and os.path.exists(self.sock):
            os.unlink(self.sock)  # left by a crashed engine

    async def wait_healthy(self, alive: Callable[[], bool]) -> bool:
        return await self.client.wait_healthy(alive)

    @property
    def progress_field(self) -> str | None:
        return self.dialect.progress_field

    async def engine_busy(self) -> int | None:
        """Requests the engine itself is working on (its own count), None where it does not say."""
        return await self.client.busy()

    # --- requests: the client's ----------------------------------------------------------------------------
    async def complete(self, path: str, body: dict) -> dict:
        return await self.client.complete(path, body)

    def stream(self, path: str, body: dict) -> AsyncIterator[dict]:
        return self.client.stream(path, body)

    async def tokenize(self, text: str) -> list[int]:
        return await self.client.tokenize(text)

    async def metrics_text(self) -> str:
        return await self.client.metrics_text()

    @property
    def takes_slot_ids(self) -> bool:
        """Whether requests may name their slot (`id_slot`) and slots be saved and restored: llama-server's family."""
        return bool(getattr(self.dialect.engine, "saves_slots", False))

    async def slot_action(self, slot: int, action: str, filename: str) -> dict:
        """llama-server's POST /slots/{id}?action=save|restore (files in its --slot-save-path): the prompt cache on
        disk (server/prompt_cache.py). Only the llama-server family has it (`Engine.saves_slots`)."""
        if not self.takes_slot_ids:
            raise EngineRejected(501, f"{self.dialect.engine.name} has no slot save/restore")
        return await self.client.post(f"/slots/{slot}?action={action}", {"filename": filename},
                                      timeout=self.settings.request_timeout)

    # --- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.client.open()
        await self.supervisor.start()

    async def stop(self, timeout: float = 10.0) -> None:
        for hook in self.before_stop:  # e.g. the prompt cache saving its slots while the engine still runs
            if self.state == "ready":
                try:
                    await hook()
                except Exception as e:  # noqa: BLE001 — stopping goes on whatever a hook does
                    log.warning("before stopping the engine: %s", e)
        await self.supervisor.stop(timeout)
        await self.client.close()
        if self._sockdir:
            shutil.rmtree(self._sockdir, ignore_errors=True)
