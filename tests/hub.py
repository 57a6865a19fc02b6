"""A loopback model hub for the download tests — the one stand-in, since no hub is reachable from here.

It answers exactly the calls the real clients make (read from modelscope-hub 0.5 / huggingface_hub 2.4 source):
ModelScope `GET /api/v1/models/{repo}/repo/files` (listing) and `GET /api/v1/models/{repo}/repo?FilePath=…`
(file, with Range); Hugging Face `GET /api/models/{repo}/revision/main`, `GET /api/models/{repo}/tree/{sha}`,
`HEAD /{repo}/resolve/{sha}/{path}` (302 to storage with X-Linked-Size, like an LFS file) and the storage GET
(with Range). Errors use each hub's shapes (ModelScope JSON `Code`/`Message`, Hugging Face `X-Error-Code`).
Faults for the tests: a throttle, a download held mid-body until the test releases it, a connection dropped once
mid-file, a listed file that 404s, a size that differs from the listing, a replica that serves damaged bytes to
downloads only. Every request is logged with the bytes it was sent.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HASH_LIMIT = 256 << 20  # sparse real-shaped headers (131 GB apparent) get no SHA-256, like a listing without one


class Hub:
    def __init__(self):
        self.repos: dict[str, dict[str, Path]] = {}
        self.log: list[dict] = []
        self.rate = 0  # bytes/s per response (0: unthrottled)
        self.missing: set[str] = set()  # listed, but downloading it answers 404
        self.size_lie: dict[str, int] = {}  # path -> size the listing claims
        self.drop_once: dict[str, int] = {}  # path -> close the connection after this many body bytes, once
        # path -> hold a download's body after this many bytes (once) until release(): an interruption then lands
        # mid-file however fast this machine is; `held` is set once those bytes are sent
        self.hold_once: dict[str, int] = {}
        self.held = threading.Event()
        self._release = threading.Event()
        self.no_sha: set[str] = set()
        self.flaky: set[str] = set()  # header reads get the true bytes, downloads a damaged copy (a bad replica)
        self._sha: dict[Path, str] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, repo: str, root: Path) -> None:
        """Serve every file under root as repository `repo` (paths relative to root)."""
        self.repos[repo] = {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}

    def release(self) -> None:
        """Let a held download go on (to a client still reading it)."""
        self._release.set()

    def close(self):
        self.release()
        self.server.shutdown()
        self.server.server_close()

    # --- what a listing says about a file ---
    def size(self, path: str, p: Path) -> int:
        return self.size_lie.get(path, p.stat().st_size)

    def sha(self, path: str, p: Path) -> str | None:
        if path in self.no_sha or p.stat().st_size > HASH_LIMIT:
            return None
        if p not in self._sha:
            self._sha[p] = hashlib.sha256(p.read_bytes()).hexdigest()
        return self._sha[p]


def _handler(hub: Hub):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _json(self, code, obj, headers=()):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _ms_error(self, code, msg):
            self._json(code, {"Code": code, "Message": msg, "RequestId": "loopback", "Success": False})

        def _hf_error(self, code, error_code, msg):
            self._json(code, {"error": msg}, [("X-Error-Code", error_code), ("X-Error-Message", msg)])

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            u = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(u.query).items()}
            path = unquote(u.path)
            entry = {"method": self.command, "path": path, "range": self.headers.get("Range"), "sent": 0}
            hub.log.append(entry)
            if path == "/api/v1/repos/internalAccelerationInfo":  # ModelScope's intra-cloud region probe
                return self._ms_error(404, "not inside a cloud region")
            m = re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)(/repo/files|/repo)?", path)
            if m:
                return self._modelscope(m.group(1), m.group(2), q, entry)
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)", path)
            if m:
                return self._hf_api(m.group(1), m.group(2))
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m:
                return self._hf_resolve(m.group(1), m.group(3))
            m = re.fullmatch(r"/storage/([^/]+/[^/]+)/(.+)", path)
            if m and m.group(1) in hub.repos and m.group(2) in hub.repos[m.group(1)]:
                return self._file(m.group(2), hub.repos[m.group(1)][m.group(2)], entry)
            self._json(404, {"error": "not found"})

        # --- ModelScope ---
        def _modelscope(self, repo, tail, q, entry):
            files = hub.repos.get(repo)
            if files is None:
                return self._ms_error(404, f"model {repo} not found")
            if tail is None:
                return self._json(200, {"Code": 200, "Data": {"Path": repo.split("/")[0], "Name": repo.split("/")[1]}, "Success": True})
            if tail == "/repo/files":
                listing, dirs = [], set()
                for rel, p in files.items():
                    parts = rel.split("/")
                    for i in range(1, len(parts)):
                        dirs.add("/".join(parts[:i]))
                    listing.append({"Name": parts[-1], "Path": rel, "Type": "blob", "Size": hub.size(rel, p),
                                    "Sha256": hub.sha(rel, p) or "", "Revision": COMMIT, "IsLFS": rel.endswith(".gguf")})
                listing += [{"Name": d.split("/")[-1], "Path": d, "Type": "tree", "Size": 0} for d in sorted(dirs)]
                return self._json(200, {"Code": 200, "Data": {"Files": listing}, "Success": True})
            rel = q.get("FilePath", "")
            if rel not in files or rel in hub.missing:
                return self._ms_error(404, f"file {rel} not found")
            return self._file(rel, files[rel], entry)

        # --- Hugging Face ---
        def _hf_api(self, repo, kind):
            files = hub.repos.get(repo)
            if files is None:
                return self._hf_error(404, "RepoNotFound", "Repository not found")
            if kind == "revision":
                return self._json(200, {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                                        "siblings": [{"rfilename": r} for r in files]})
            out, dirs = [], set()
            for rel, p in files.items():
                parts = rel.split("/")
                for i in range(1, len(parts)):
                    dirs.add("/".join(parts[:i]))
                size = hub.size(rel, p)
                item = {"type": "file", "path": rel, "size": size, "oid": hashlib.sha1(rel.encode()).hexdigest()}
                if rel.endswith(".gguf"):
                    item["lfs"] = {"oid": hub.sha(rel, p) or "0" * 64, "size": size, "pointerSize": 134}
                out.append(item)
            out = [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in sorted(dirs)] + out
            return self._json(200, out)

        def _hf_resolve(self, repo, rel):
            files = hub.repos.get(repo)
            if files is None:
                return self._hf_error(404, "RepoNotFound", "Repository not found")
            if rel not in files or rel in hub.missing:
                return self._hf_error(404, "EntryNotFound", f"{rel} does not exist")
            p = files[rel]
            # Like an LFS file on the Hub: a redirect to storage, the size and hash in X-Linked-* headers.
            self.send_response(302)
            self.send_header("Location", f"{hub.url}/storage/{repo}/{rel}")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("X-Linked-Size", str(hub.size(rel, p)))
            self.send_header("X-Linked-Etag", f'"{hub.sha(rel, p) or hashlib.sha1(rel.encode()).hexdigest()}"')
            self.send_header("ETag", f'"{hashlib.sha1(rel.encode()).hexdigest()}"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        # --- bytes, with Range ---
        def _file(self, rel, p: Path, entry):
            entry["file"] = rel
            size = p.stat().st_size
            start, end = 0, size - 1
            rng = self.headers.get("Range")
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
            if m:
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            self.send_response(206 if m else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            if m:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if self.command == "HEAD":
                return
            download = not m or not m.group(2)  # whole file or resume (`bytes=N-`), not a header read
            drop = hub.drop_once.pop(rel, None) if download else None
            hold = hub.hold_once.pop(rel, None) if download else None
            with open(p, "rb") as f:
                f.seek(start)
                left = end - start + 1
                chunk = 64 << 10
                t0 = time.monotonic()
                while left > 0:
                    n = min(chunk, left)
                    if drop is not None and entry["sent"] + n > drop:
                        n = drop - entry["sent"]
                    if hold is not None and entry["sent"] + n > hold:
                        n = hold - entry["sent"]
                    data = f.read(n)
                    if rel in hub.flaky and not (m and m.group(2)) and entry["sent"] == 0 and start == 0:
                        data = b"GGUX" + data[4:]
                    try:
                        self.wfile.write(data)
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    entry["sent"] += len(data)
                    left -= len(data)
                    if drop is not None and entry["sent"] >= drop:
                        self.close_connection = True
                        self.wfile.flush()
                        self.connection.shutdown(2)  # a lost connection mid-body
                        return
                    if hold is not None and entry["sent"] >= hold:
                        hold = None
                        hub.held.set()
                        hub._release.wait(600)  # the client may leave meanwhile: the next write then fails
                        t0 = time.monotonic() - entry["sent"] / hub.rate if hub.rate else t0
                    if hub.rate:
                        wait = t0 + entry["sent"] / hub.rate - time.monotonic()
                        if wait > 0:
                            time.sleep(wait)

    return H


def write_split(src: str | Path, out_dir: Path, stem: str, n: int) -> list[Path]:
    """Split a GGUF into n shards named like llama.cpp's gguf-split (`stem-0000i-of-0000n.gguf`, split.* keys)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, Keys

    r = GGUFReader(str(src))
    arch = r.fields[Keys.General.ARCHITECTURE].contents()
    per = -(-len(r.tensors) // n)
    out_dir.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(out_dir / f"{stem}.gguf", arch, split_max_tensors=per)
    for f in r.fields.values():
        if f.name == Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        t = f.types[0]
        w.add_key_value(f.name, f.contents(), t, sub_type=f.types[-1] if t == GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return [out_dir / f"{stem}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
