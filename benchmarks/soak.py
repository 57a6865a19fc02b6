"""Soak `hybridinfer serve`: many requests at a fixed concurrency, a mix of chat and completions, streamed and not.

Prints the load held (requests, concurrency, requests/s), failures by kind, and the resident memory (RSS) of the
proxy and the engine before and after; writes benchmarks/results/soak.json. Without --url it starts `hybridinfer
serve` on the tiny demo model.

    python benchmarks/soak.py                       # 1,000 requests at concurrency 16 on the demo model
    python benchmarks/soak.py --requests 200 --url http://127.0.0.1:8000   # an already running serve
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _rss_mib(pid: int | None) -> float | None:
    try:
        return round(psutil.Process(pid).memory_info().rss / 2**20, 1) if pid else None
    except psutil.Error:
        return None


def engine_pid(proxy_pid: int) -> int | None:
    """The engine is the proxy's child (llama-server), if it runs as one."""
    try:
        kids = psutil.Process(proxy_pid).children()
    except psutil.Error:
        return None
    return next((k.pid for k in kids if "llama-server" in " ".join(k.cmdline()[:1])), None)


def _kind(i: int) -> tuple[str, bool]:
    return ("chat" if i % 2 == 0 else "completions"), (i // 2) % 2 == 0


async def _one(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> str | None:
    """One request; None when it succeeded, else the kind of failure."""
    endpoint, stream = _kind(i)
    body = {"max_tokens": max_tokens, "stream": stream, "ignore_eos": True}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": f"request {i}: tell me something"}]
    else:
        body["prompt"] = f"request {i}: once upon a time"
    try:
        if not stream:
            r = await client.post(f"{url}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}", json=body)
            if r.status_code != 200:
                return f"HTTP {r.status_code}"
            return None if r.json()["usage"]["completion_tokens"] == max_tokens else "short answer"
        done = False
        async with client.stream("POST", f"{url}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}",
                                 json=body) as r:
            if r.status_code != 200:
                return f"HTTP {r.status_code}"
            async for line in r.aiter_lines():
                if line.startswith("data: ") and '"error"' in line:
                    return "error event"
                if line == "data: [DONE]":
                    done = True
        return None if done else "no [DONE]"
    except httpx.TimeoutException:
        return "timeout"
    except httpx.HTTPError as e:
        return e.__class__.__name__


async def soak(url: str, requests: int, concurrency: int, max_tokens: int = 16) -> dict:
    failures: dict[str, int] = {}
    counter = iter(range(requests))
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def worker():
            for i in counter:
                kind = await _one(client, url, i, max_tokens)
                if kind:
                    failures[kind] = failures.get(kind, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"requests": requests, "concurrency": concurrency, "max_tokens": max_tokens, "seconds": round(wall, 2),
            "requests_per_s": round(requests / wall, 2), "failed": sum(failures.values()), "failures": failures}


def measure(url: str, proxy_pid: int, requests: int, concurrency: int, max_tokens: int = 16, warmup: int = 32) -> dict:
    """Warm up (allocators and caches settle), then soak, with RSS of proxy and engine before and after."""
    asyncio.run(soak(url, warmup, concurrency, max_tokens))
    epid = engine_pid(proxy_pid)
    before = {"proxy_mib": _rss_mib(proxy_pid), "engine_mib": _rss_mib(epid)}
    out = asyncio.run(soak(url, requests, concurrency, max_tokens))
    after = {"proxy_mib": _rss_mib(proxy_pid), "engine_mib": _rss_mib(epid)}
    health = httpx.get(url + "/health", timeout=5).json()
    out.update({"rss_before": before, "rss_after": after, "engine_restarts": health.get("engine_restarts"),
                "warmup": warmup})
    return out


def _start(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "hybridinfer"
    cmd = [str(exe), "serve", "--port", str(port), "--parallel", str(args.parallel), "--queue", str(args.concurrency)]
    if args.gguf:
        cmd += ["--gguf", args.gguf]
    print("starting:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"soak: serve exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit("soak: serve did not become ready in 300 s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running hybridinfer serve (its root URL); give --pid to measure its memory")
    ap.add_argument("--pid", type=int, help="with --url: the serve process id")
    ap.add_argument("--gguf", help="without --url: the model to serve (default: the demo model)")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--parallel", type=int, default=4, help="without --url: engine slots")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", default=str(RESULTS / "soak.json"))
    args = ap.parse_args()
    proc = None
    if args.url:
        url, pid = args.url.rstrip("/").removesuffix("/v1"), args.pid
    else:
        proc, url = _start(args)
        pid = proc.pid
    try:
        r = measure(url, pid, args.requests, args.concurrency, args.max_tokens)
    finally:
        if proc:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    r["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    r["model"] = args.gguf or "demo"
    b, a = r["rss_before"], r["rss_after"]
    print(f"load held: {r['requests']} requests at concurrency {r['concurrency']} in {r['seconds']} s "
          f"({r['requests_per_s']} req/s), {r['max_tokens']} tokens each, chat/completions x streamed/not")
    print(f"failures: {r['failed']}" + (f" — {json.dumps(r['failures'])}" if r["failures"] else ""))
    print(f"RSS proxy:  {b['proxy_mib']} MiB before, {a['proxy_mib']} MiB after")
    print(f"RSS engine: {b['engine_mib']} MiB before, {a['engine_mib']} MiB after")
    print(f"engine restarts: {r['engine_restarts']}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(r, f, indent=2)
        f.write("\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 1 if r["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
