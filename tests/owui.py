"""A real Open-WebUI for the `openwebui` tests: a lite install into its own cached venv (outside the checkout, never
the project's venv), started offline on loopback with slim settings. Recipe: ../shared/reference/open-webui-offline.md."""

import base64
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx

from served import wait_healthy

VERSION = "0.12.4"
# Heavy or optional requirements chat + functions never touch (RAG, audio, OCR, documents, search, cloud, DB drivers).
SKIP = re.compile(r"^(accelerate|sentence-transformers|transformers|faster-whisper|onnxruntime|opencv-python-headless|"
                  r"rapidocr|chromadb|einops|pandas|pyarrow|docx2txt|pypdf|python-docx|python-pptx|openpyxl|xlrd|pyxlsb|"
                  r"msoffcrypto-tool|pypandoc|pydub|soundfile|ddgs|youtube-transcript-api|azure-.*|"
                  r"google-cloud-storage|opensearch-py|psycopg|pymysql|colbert-ai|playwright|sentencepiece|"
                  r"rank-bm25|ftfy|fake-useragent|brotlicffi)$", re.I)
EXTRA = ["typer", "python-dotenv", "numpy", "langchain-classic==1.0.7", "python-dateutil"]


def cache_root() -> Path:
    return Path(os.environ.get("HYBRIDINFER_OWUI_CACHE", Path.home() / ".cache" / "hybridinfer" / f"open-webui-{VERSION}"))


def ensure_openwebui(log=print) -> Path:
    """-> the `open-webui` executable of a cached lite install (built once, ~1 min; marker file = complete)."""
    root = cache_root()
    exe = root / "venv" / "bin" / "open-webui"
    if (root / ".complete").is_file() and exe.is_file():
        return exe
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    log(f"installing Open-WebUI {VERSION} (lite) into {root}")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    pip = [str(root / "venv" / "bin" / "python"), "-m", "pip", "install", "-q"]
    dl = root / "dl"
    subprocess.run([str(root / "venv" / "bin" / "python"), "-m", "pip", "download", "-q", "--no-deps",
                    f"open-webui=={VERSION}", "-d", str(dl)], check=True)
    wheel = next(dl.glob("open_webui-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(f"open_webui-{VERSION}.dist-info/METADATA").decode()
    reqs = [ln.split(":", 1)[1].strip() for ln in meta.splitlines() if ln.startswith("Requires-Dist:")]
    keep = [r for r in reqs if "extra ==" not in r and not SKIP.match(re.split(r"[\[=<>;! ]", r)[0])]
    subprocess.run(pip + ["--no-deps", str(wheel)], check=True)
    subprocess.run(pip + keep + EXTRA, check=True)
    shutil.rmtree(dl)
    (root / ".complete").write_text(VERSION + "\n")
    return exe


class OpenWebUI:
    """`open-webui serve` on loopback, offline, with a throwaway data dir."""

    def __init__(self, exe: Path, data_dir: Path, port: int):
        self.url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, DATA_DIR=str(data_dir), WEBUI_SECRET_KEY=base64.urlsafe_b64encode(b"hybridinfer-open-webui-test-key!").decode(),
                   OFFLINE_MODE="true", HF_HUB_OFFLINE="1", ENABLE_OLLAMA_API="false", ENABLE_OPENAI_API="false",
                   OLLAMA_BASE_URL="http://127.0.0.1:11434", RAG_EMBEDDING_MODEL_AUTO_UPDATE="false",
                   RAG_RERANKING_MODEL_AUTO_UPDATE="false", WHISPER_MODEL_AUTO_UPDATE="false",
                   ENABLE_VERSION_UPDATE_CHECK="false", ANONYMIZED_TELEMETRY="false", USE_SLIM_DOCKER="true",
                   ENABLE_TITLE_GENERATION="false", ENABLE_TAGS_GENERATION="false",
                   ENABLE_FOLLOW_UP_GENERATION="false", ENABLE_AUTOCOMPLETE_GENERATION="false")
        env.pop("VIRTUAL_ENV", None)
        self.log = data_dir / "open-webui.log"
        self._log_f = open(self.log, "w")
        self.proc = subprocess.Popen([str(exe), "serve", "--host", "127.0.0.1", "--port", str(port)], env=env,
                                     stdout=self._log_f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(self.url, self.proc, 180, "open-webui", lambda: self.log.read_text()[-3000:])
        except RuntimeError:
            self.stop()
            raise

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log_f.close()


def ensure_chromium() -> str:
    """Debian's chromium (installed with apt when missing and we are root)."""
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, capture_output=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        return shutil.which("chromium")
    raise RuntimeError("chromium is not installed: apt-get install chromium")


def screenshot(origin: str, token: str, path: Path, page: str, expand: str | None = None,
               size=(1280, 860), settle: float = 6.0) -> None:
    """Log into Open-WebUI in headless Chromium (token in localStorage, over the DevTools protocol), open `page`,
    optionally click the element whose text starts with `expand`, and save a PNG."""
    import socket
    import tempfile

    from websockets.sync.client import connect

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    profile = tempfile.mkdtemp(prefix="hybridinfer-chromium-")
    proc = subprocess.Popen([ensure_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--disable-background-networking", "--disable-component-update",
                             "--disable-sync", "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
                             f"--window-size={size[0]},{size[1]}", f"--remote-debugging-port={port}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        targets = []
        while time.time() < deadline and not targets:
            try:
                targets = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                           if t.get("type") == "page"]
            except httpx.HTTPError:
                time.sleep(0.3)
        with connect(targets[0]["webSocketDebuggerUrl"], max_size=64 * 2**20) as ws:
            _drive(ws, origin, token, path, page, expand, size, settle)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def _drive(ws, origin, token, path, page, expand, size, settle):
    import base64 as b64
    import json

    n = [0]

    def call(method, **params):
        n[0] += 1
        ws.send(json.dumps({"id": n[0], "method": method, "params": params}))
        while True:
            msg = json.loads(ws.recv())
            if msg.get("id") == n[0]:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    call("Page.enable")
    call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1, mobile=False)
    call("Page.navigate", url=origin + "/auth")
    time.sleep(2)
    call("Runtime.evaluate", expression=f"localStorage.setItem('token', {json.dumps(token)})")
    call("Page.navigate", url=origin + page)
    time.sleep(settle)
    if expand:
        call("Runtime.evaluate", expression=(
            "(() => { const els = [...document.querySelectorAll('button, div, span')]"
            f".filter(e => e.children.length < 4 && (e.innerText || '').trim().startsWith({json.dumps(expand)}));"
            " if (els.length) { els[els.length - 1].click(); return true } return false })()"))
        time.sleep(1.5)
    shot = call("Page.captureScreenshot", format="png")
    path.write_bytes(b64.b64decode(shot["data"]))
