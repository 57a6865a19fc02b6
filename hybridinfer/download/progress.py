"""Download progress: bytes, speed and time left for the current file and for the whole quant.

On a terminal it is a two-line live bar (rich); elsewhere (a log, `screen -L`, CI) one line every few seconds.
Speed counts only bytes fetched in this run, so a resumed download does not report the bytes it already had.
"""

from __future__ import annotations

import sys
import time
from collections import deque

from ..util import GIB, MIB


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Meter:
    def __init__(self, total: int, done: int, files: int, out=None, interval: float = 5.0):
        self.out = out or sys.stderr  # kept: the hub clients' own bars are silenced by redirecting sys.stderr
        self.total, self.base, self.files = total, done, files
        self.interval = interval
        self.file_size = self.file_have = self.file_pos = 0
        self.fetched = 0  # bytes received in this run
        self.samples: deque[tuple[float, int]] = deque()
        self.name = ""
        self.index = 0
        self._last_line = 0.0
        self._rich = None
        if getattr(self.out, "isatty", lambda: False)():
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self._rich = Progress(TextColumn("{task.description}"), BarColumn(bar_width=20), DownloadColumn(binary_units=True),
                                  TransferSpeedColumn(), TimeRemainingColumn(), console=Console(file=self.out),
                                  redirect_stdout=False, redirect_stderr=False)
            self._rich.start()
            self._total_task = self._rich.add_task("total", total=total, completed=done)
            self._file_task = None

    def start(self, index: int, name: str, size: int, have: int) -> None:
        self.index, self.name, self.file_size, self.file_have, self.file_pos = index, name, size, have, have
        if self._rich:
            if self._file_task is not None:
                self._rich.remove_task(self._file_task)
            short = name if len(name) <= 32 else "…" + name[-31:]
            self._file_task = self._rich.add_task(f"[{index}/{self.files}] {short}", total=size, completed=have)
        else:
            resumed = f", resuming at {_size(have)}" if have else ""
            print(f"  [{index}/{self.files}] {name} ({_size(size)}{resumed})", file=self.out, flush=True)
            self._last_line = time.monotonic()

    def position(self, pos: int) -> None:
        """The client reports how far into the current file it is (bytes already on disk included)."""
        pos = max(pos, self.file_have)  # a resumed client first reports the bytes it found on disk
        delta = pos - self.file_pos
        if not delta:
            return
        self.file_pos = pos
        self.fetched += delta
        now = time.monotonic()
        self.samples.append((now, self.fetched))
        while len(self.samples) > 2 and now - self.samples[0][0] > 30:
            self.samples.popleft()
        if self._rich:
            self._rich.update(self._file_task, completed=pos)
            self._rich.update(self._total_task, advance=delta)
        elif now - self._last_line >= self.interval:
            self._last_line = now
            self._line()

    def speed(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else None

    def _line(self) -> None:
        sp = self.speed()
        left = lambda n: n / sp if sp else None  # noqa: E731
        done = self.base + self.fetched
        print(f"  [{self.index}/{self.files}] {self.name} {_size(self.file_pos)}/{_size(self.file_size)} "
              f"{(sp or 0) / MIB:.1f} MiB/s ETA {_eta(left(self.file_size - self.file_pos))} | "
              f"total {_size(done)}/{_size(self.total)} ETA {_eta(left(self.total - done))}", file=self.out, flush=True)

    def end_file(self) -> None:
        if not self._rich:
            self._line()

    def close(self) -> None:
        if self._rich:
            self._rich.stop()
            self._rich = None
