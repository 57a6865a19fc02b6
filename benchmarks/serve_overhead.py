"""Tokens/s and TTFT through hybridinfer vs the raw llama-server with the same arguments, in one run.

    .venv/bin/python benchmarks/serve_overhead.py [--requests 30] [--max-tokens 128]

Streams sequential chat requests (greedy, ignore_eos) alternately to both servers and prints medians and the
ratios (targets: >= 0.98 tokens/s, <= 3 ms added median TTFT), plus the proxy's own CPU time per streamed token.
Writes benchmarks/results/serve_overhead.json.
"""

import argparse
import json
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

EXE = str(Path(sys.executable).parent / "hybridinfer")
# One client (creating one per request costs tens of ms); a fresh TCP connection per request for both servers alike.
CLIENT = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url, proc, timeout=60):
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("server did not start")


def one(url, max_tokens):
    body = {"model": "m", "messages": [{"role": "user", "content": "benchmark the overhead"}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    first = last = None
    n = 0
    with CLIENT.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            for c in d.get("choices", []):
                delta = c.get("delta", {})
                if delta.get("content") or delta.get("reasoning_content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    n += 1
    end = time.perf_counter()
    return first - t0, (n - 1) / (last - first) if n > 1 and last > first else 0.0, end - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, help="engine threads (default: the plan's, all physical cores)")
    a = ap.parse_args()
    hp = port()
    hi = subprocess.Popen([EXE, "serve", "--port", str(hp), "--alias", "m", *(["--threads", str(a.threads)] if a.threads else [])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    hurl = f"http://127.0.0.1:{hp}"
    try:
        wait(hurl, hi)
        banner = ""
        while "engine:" not in banner:
            banner = hi.stdout.readline()
        cmd = banner.split("engine:", 1)[1].split()
        rp = port()
        cmd[cmd.index("--port") + 1] = str(rp); cmd[cmd.index("--host") + 1] = "127.0.0.1"  # the same arguments, another port
        raw = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rurl = f"http://127.0.0.1:{rp}"
        try:
            wait(rurl, raw)
            for u in (hurl, rurl):
                one(u, 16)  # warm-up
            res = {"hybridinfer": [], "llama-server": []}
            proxy = psutil.Process(hi.pid)
            cpu = 0.0
            for _ in range(a.requests):
                c0 = sum(proxy.cpu_times()[:2])
                res["hybridinfer"].append(one(hurl, a.max_tokens))
                cpu += sum(proxy.cpu_times()[:2]) - c0
                res["llama-server"].append(one(rurl, a.max_tokens))
        finally:
            raw.terminate()
            raw.wait()
    finally:
        hi.terminate()
        hi.wait()
    med = {k: {"ttft_ms": statistics.median(x[0] for x in v) * 1e3, "tokens_per_s": statistics.median(x[1] for x in v),
               "e2e_ms": statistics.median(x[2] for x in v) * 1e3} for k, v in res.items()}
    h, r = med["hybridinfer"], med["llama-server"]
    out = {"machine": platform.node(), "model": "built-in tiny demo (q8_0)", "requests": a.requests, "max_tokens": a.max_tokens,
           "engine_threads": a.threads or "plan default",
           "median": med, "tokens_per_s_ratio": h["tokens_per_s"] / r["tokens_per_s"],
           "request_throughput_ratio": r["e2e_ms"] / h["e2e_ms"],  # whole-request tokens/s, robust to bursts
           "added_median_ttft_ms": h["ttft_ms"] - r["ttft_ms"],
           # the proxy's own CPU per streamed token (its process only; the engine is a child with its own)
           "proxy_cpu_us_per_token": cpu / (a.requests * a.max_tokens) * 1e6}
    print(json.dumps(out, indent=2))
    name = f"serve_overhead-threads{a.threads}.json" if a.threads else "serve_overhead.json"
    (Path(__file__).parent / "results" / name).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
