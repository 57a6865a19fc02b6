"""A real `hybridinfer serve` child process for tests (shared by the serve, bench and Open-WebUI tests)."""

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai

EXE = str(Path(sys.executable).parent / "hybridinfer")


class Served:
    def __init__(self, args, tmp_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"engine-{self.port}.log"
        self.lines: list[str] = []
        self.proc = subprocess.Popen([EXE, "serve", "--port", str(self.port), "--engine-log", str(self.log), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self):
        wait_healthy(self.url, self.proc, 60, "serve", lambda: "\n".join(self.lines))
        # The engine's private address (a Unix socket where the build takes one); None for the in-process engine.
        text = "\n".join(self.lines)
        m = re.search(r"llama-server .*?--host (\S+\.sock)", text)
        t = re.search(r"llama-server .*?--host (\S+) --port (\d+)", text)
        self.engine_address = m.group(1) if m else (f"{t.group(1)} --port {t.group(2)}" if t else None)
        if m:
            self.engine = httpx.Client(transport=httpx.HTTPTransport(uds=m.group(1)), base_url="http://engine")
        elif t:
            self.engine = httpx.Client(base_url=f"http://{t.group(1)}:{t.group(2)}")
        else:
            self.engine = None

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def engine_pid(self) -> int:
        out = subprocess.run(["pgrep", "-f", f"llama-server.*--host {self.engine_address}"],
                             capture_output=True, text=True).stdout.split()
        return int(out[0])

    def kill_engine_mid_stream(self, body: dict) -> list[dict]:
        """Stream a long chat answer, SIGKILL the engine once the first chunk has arrived (a crash before it is an
        HTTP error instead, by design), -> the error events the client received."""
        import json
        import os
        errors, streaming = [], threading.Event()

        def stream():
            with httpx.stream("POST", self.url + "/v1/chat/completions", timeout=30,
                              json={**body, "stream": True, "max_tokens": 3000, "ignore_eos": True}) as r:
                for line in r.iter_lines():
                    streaming.set()
                    if '"error"' in line:
                        errors.append(json.loads(line[6:]))
        t = threading.Thread(target=stream)
        t.start()
        assert streaming.wait(20)
        os.kill(self.engine_pid(), signal.SIGKILL)
        t.join(20)
        return errors

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def wait_healthy(url: str, proc, timeout: float, what: str, log) -> None:
    """Poll url/health until 200; fail with the process's log if it exits or the time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited:\n" + log())
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not become healthy:\n" + log())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_stream(chunks) -> tuple[str, str, str | None, object]:
    """An openai-client chat stream -> (reasoning, content, finish_reason, usage), joined as a client would."""
    reasoning, content, finish, usage = "", "", None, None
    for ch in chunks:
        usage = ch.usage or usage
        for choice in ch.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return reasoning, content, finish, usage
