"""Long conversations on a slow box: per-turn TTFT warm, after a `serve` restart with the prompt cache on disk, and
after a restart without it; then 4 interleaved conversations on 2 slots.

    .venv/bin/python benchmarks/long_context.py [--model mid|tiny|PATH] [--tokens 6000] [--turns 4] [--engine auto]

One conversation of --turns user turns, each adding about --tokens/--turns prompt tokens (sized with the server's
/tokenize), so the last turn's prompt is about --tokens long. Every request is streamed, TTFT measured by the client
(request sent to the first streamed delta), max_tokens --max-tokens.

- warm: one `serve`, the turns one after another: each turn reuses the slot's prefix, prefilling only its new part.
- restart + disk cache: `serve --prompt-cache-dir`, restarted before turns 2..N: the conversation is saved at
  shutdown and restored before the turn runs.
- restart, no cache: `serve` restarted before turns 2..N with no disk cache: the whole conversation is prefilled.
- interleaved: `serve --parallel 2`, 4 conversations of 2 turns, turns in the order A1 B1 C1 D1 A2 B2 C2 D2: with
  the disk cache (each second turn restored into its slot) and without it (the engine's own prompt cache in RAM).

Every request is read with a 10 s read timeout (a strict client or proxy): serve's SSE comments (keepalive,
prefill progress) must keep it alive; per turn the time to the status line (first byte), the longest silence
before the first token, and the progress comments are recorded.

Writes benchmarks/results/long_context-<cpu kind>[-<engine>].json and prints the figures. Targets: the turn
after a restart has TTFT <= 1.5x the warm one (vs the full re-prefill without the cache); the first byte within
5 s of the request at any prompt length.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
EXE = str(Path(sys.executable).parent / "hybridinfer")
sys.path.insert(0, str(HERE.parent))

from hybridinfer.probe import probe  # noqa: E402
from tests.served import free_port, wait_healthy  # noqa: E402

WORDS = ("the of and to in is that for it as with was on be by this are from at or an have not which but all "
         "model cache token slot layer expert memory prefix context restore conversation answer question").split()


def cpu_kind(hw) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{hw.cpu.model} {hw.cpu.isa}".lower()).strip("-")


class Serve:
    def __init__(self, args: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "a")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([EXE, "serve", "--port", str(self.port), *args], stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True)
        wait_healthy(self.url, self.proc, 1800, "serve", lambda: Path(log).read_text()[-3000:])
        self.load_s = time.perf_counter() - t0

    def stop(self) -> float:
        t0 = time.perf_counter()
        self.proc.terminate()
        self.proc.wait(600)
        self.log.close()
        return time.perf_counter() - t0

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def tokens(self, text: str) -> int:
        return len(httpx.post(self.url + "/tokenize", json={"content": text}, timeout=60).json()["tokens"])

    def turn(self, messages: list[dict], max_tokens: int) -> dict:
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        t0 = time.perf_counter()
        ttft, content, usage = None, "", {}
        first_byte, last, gap, progress = None, None, 0.0, 0
        # A read timeout of 10 s: what a strict client or proxy allows; serve's SSE comments must beat it.
        with httpx.stream("POST", self.url + "/v1/chat/completions", json=body,
                          timeout=httpx.Timeout(10.0, connect=10.0)) as r:
            first_byte = time.perf_counter() - t0  # the status line and headers
            r.raise_for_status()
            for line in r.iter_lines():
                if not line:
                    continue
                now = time.perf_counter() - t0
                if ttft is None:  # the silence a client sees while the prompt is read
                    gap = max(gap, now - (last if last is not None else first_byte))
                    last = now
                    progress += line.startswith(": progress ")
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ch = json.loads(line[6:])
                usage = ch.get("usage") or usage
                for c in ch.get("choices") or []:
                    d = c.get("delta") or {}
                    if (d.get("content") or d.get("reasoning_content")) and ttft is None:
                        ttft = time.perf_counter() - t0
                    content += d.get("content") or ""
        return {"ttft_s": round(ttft or 0, 3), "e2e_s": round(time.perf_counter() - t0, 3),
                "first_byte_s": round(first_byte, 3), "longest_silence_s": round(gap, 3), "progress_comments": progress,
                "prompt_tokens": usage.get("prompt_tokens"),
                "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"), "answer": content}


def user_texts(serve: Serve, n: int, tokens_each: int, seed: int) -> list[str]:
    """n user messages of about tokens_each tokens each (sized with the server's tokenizer)."""
    rng = random.Random(seed)
    probe_text = " ".join(rng.choice(WORDS) for _ in range(400))
    per_word = serve.tokens(probe_text) / 400
    words = max(1, int(tokens_each / per_word))
    return [f"Part {i + 1}. " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(n)]


def conversation(serve_args: list[str], texts: list[str], a, log: Path, restart: bool) -> dict:
    """Turns one after another; with `restart`, serve is stopped and started again before turns 2..N."""
    msgs: list[dict] = [{"role": "system", "content": "You are a helpful assistant."}]
    s = Serve(serve_args, log)
    loads, turns = [round(s.load_s, 1)], []
    try:
        for i, text in enumerate(texts):
            if restart and i:
                s.stop()
                s = Serve(serve_args, log)
                loads.append(round(s.load_s, 1))
            msgs.append({"role": "user", "content": text})
            t = s.turn(msgs, a.max_tokens)
            msgs.append({"role": "assistant", "content": t.pop("answer")})
            turns.append(t)
            print(f"    turn {i + 1}: TTFT {t['ttft_s']:.2f} s, prompt {t['prompt_tokens']}, cached {t['cached_tokens']}, "
                  f"first byte {t['first_byte_s']:.2f} s, longest silence {t['longest_silence_s']:.2f} s, "
                  f"{t['progress_comments']} progress comments", flush=True)
        pc = s.health().get("prompt_cache")
    finally:
        s.stop()
    return {"turns": turns, "load_s": loads, "prompt_cache": pc}


def interleaved(serve_args: list[str], texts: dict[str, list[str]], a, log: Path) -> dict:
    s = Serve(serve_args + ["--parallel", "2"], log)
    convs = {n: [{"role": "system", "content": "You are a helpful assistant."}] for n in texts}
    out: dict[str, list] = {n: [] for n in texts}
    try:
        for k in range(2):
            for n in texts:
                convs[n].append({"role": "user", "content": texts[n][k]})
                t = s.turn(convs[n], a.max_tokens)
                convs[n].append({"role": "assistant", "content": t.pop("answer")})
                out[n].append(t)
                print(f"    {n}{k + 1}: TTFT {t['ttft_s']:.2f} s, prompt {t['prompt_tokens']}, cached {t['cached_tokens']}",
                      flush=True)
        pc = s.health().get("prompt_cache")
    finally:
        s.stop()
    return {"conversations": out, "prompt_cache": pc}


def model_path(name: str) -> str:
    if name in ("mid", "tiny"):
        out = subprocess.run([EXE, "demo", "--size", name], capture_output=True, text=True, check=True).stdout
        return out.strip().splitlines()[-1]
    return name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mid", help="mid | tiny | a GGUF path (default: mid)")
    ap.add_argument("--tokens", type=int, default=6000, help="the conversation's length at its last turn (default: 6000)")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--interleaved-tokens", type=int, help="tokens per turn of the interleaved conversations "
                    "(default: --tokens / --turns)")
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--skip", default="", help="phases to skip: comma-separated of warm,disk,nocache,interleaved")
    ap.add_argument("--out", help="JSON file (default: benchmarks/results/long_context-<cpu kind>.json)")
    a = ap.parse_args()
    gguf = model_path(a.model)
    hw = probe()
    work = Path(tempfile.mkdtemp(prefix="hybridinfer-longctx-"))
    log = work / "serve.log"
    base = ["--gguf", gguf, "--engine", a.engine, "--no-calibrate"]
    print(f"model {gguf}, {a.turns} turns to ~{a.tokens} tokens, engine {a.engine}; logs in {log}", flush=True)
    s = Serve(base, log)
    plan_line = next((ln for ln in log.read_text().splitlines() if ln.strip().startswith("plan:")), "")
    texts = user_texts(s, a.turns, a.tokens // a.turns, seed=1)
    per_turn = a.interleaved_tokens or a.tokens // a.turns
    other = {n: user_texts(s, 2, per_turn, seed=10 + i) for i, n in enumerate("ABCD")}
    s.stop()
    skip = set(filter(None, a.skip.split(",")))
    res: dict = {}
    phases = [("warm", lambda: conversation(base, texts, a, log, restart=False)),
              ("disk", lambda: conversation(base + ["--prompt-cache-dir", str(work / "pc-restart")], texts, a, log, True)),
              ("nocache", lambda: conversation(base, texts, a, log, restart=True)),
              ("interleaved", lambda: {"disk": interleaved(base + ["--prompt-cache-dir", str(work / "pc-inter")],
                                                           other, a, log),
                                       "ram_only": interleaved(base, other, a, log)})]
    t0 = time.perf_counter()
    for name, run in phases:
        if name in skip:
            continue
        print(f"  {name}:", flush=True)
        res[name] = run()
    summary = {}
    if "warm" in res and "disk" in res:
        w = [t["ttft_s"] for t in res["warm"]["turns"][1:]]
        d = [t["ttft_s"] for t in res["disk"]["turns"][1:]]
        summary["restart_disk_over_warm"] = [round(x / y, 2) for x, y in zip(d, w)]
        if "nocache" in res:
            n = [t["ttft_s"] for t in res["nocache"]["turns"][1:]]
            summary["restart_nocache_over_warm"] = [round(x / y, 2) for x, y in zip(n, w)]
        summary["target_met"] = all(r <= 1.5 for r in summary["restart_disk_over_warm"])
    every = [t for ph in ("warm", "disk", "nocache") if ph in res for t in res[ph]["turns"]]
    if every:
        summary["first_byte_s_max"] = max(t["first_byte_s"] for t in every)
        summary["longest_silence_s_max"] = max(t["longest_silence_s"] for t in every)
        summary["first_byte_target_met"] = summary["first_byte_s_max"] <= 5.0
    doc = {"schema": "hybridinfer.long_context/1", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": {"host": platform.node(), "cpu": hw.cpu.model, "isa": hw.cpu.isa, "kind": cpu_kind(hw),
                       "physical_cores": hw.cpu.physical_cores},
           "config": {"model": gguf, "tokens": a.tokens, "turns": a.turns, "max_tokens": a.max_tokens,
                      "interleaved_tokens_per_turn": per_turn,
                      "engine": a.engine, "plan": plan_line.strip()},
           "seconds": round(time.perf_counter() - t0, 1), "summary": summary, **res}
    tail = "" if a.engine == "auto" else "-" + re.sub(r"[^a-z0-9]+", "-", a.engine.lower())
    out = Path(a.out) if a.out else HERE / "results" / f"long_context-{cpu_kind(hw)}{tail}.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(summary))
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
