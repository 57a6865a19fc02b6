"""Load generation against any OpenAI-compatible endpoint, and the figures vLLM's `bench serve` reports.

Closed loop (C clients, each sending its next request when the last one ends) or open loop (Poisson arrivals at a
request rate, at most C in flight). Every request streams; a sample records its timings and tokens, or why it failed.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

from ..metrics import DECODE_TPS

# Short common words: about one token each in BPE vocabularies of real models.
WORDS = ("the of and to in is was for on are with as his they at be this from have or one had by but not what all "
         "were when we there can an your which their said if do will each about how up out them then she many some so "
         "these would other into has more her two like him see time could no make than first been its who now people "
         "my made over did down only way find use may water long little very after words called just where most know "
         "get through back much before go good new write our used me man too any day same right look think also around "
         "another came come work three word must because does part even place well such here take why things help put "
         "years different away again off went old number great tell men say small every found still between name should "
         "home big give air line set own under read last never us left end along while might next sound below saw "
         "something thought both few those always looked show large often together asked house world going want school "
         "important until form food keep children feet land side without boy once animals life enough took sometimes four "
         "head above kind began almost live page got earth need far hand high year mother light parts country father let "
         "night following picture being study second eyes soon times story boys since white days ever paper hard near "
         "sentence better best across during today others however sure means knew try told young miles sun ways thing "
         "whole hear example heard several change answer room sea against top turned learn point city play toward five "
         "using himself usually").split()


@dataclass
class Sample:
    index: int
    ok: bool
    start_s: float            # since the level began
    prompt_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    answer_tokens: int = 0
    chunks: int = 0           # streamed deltas carrying text
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class Level:
    concurrency: int
    request_rate: float       # inf = closed loop
    duration_s: float
    samples: list[Sample]

    def summary(self) -> dict:
        ok = [s for s in self.samples if s.ok]
        failed = [s for s in self.samples if not s.ok]
        d = max(self.duration_s, 1e-9)
        out = {"concurrency": self.concurrency,
               "request_rate": "inf" if self.request_rate == float("inf") else self.request_rate,
               "duration": self.duration_s, "completed": len(ok), "failed": len(failed),
               "total_input_tokens": sum(s.prompt_tokens for s in ok),
               "total_output_tokens": sum(s.output_tokens for s in ok),
               "total_reasoning_tokens": sum(s.reasoning_tokens for s in ok),
               "total_answer_tokens": sum(s.answer_tokens for s in ok)}
        out["request_throughput"] = len(ok) / d
        out["output_throughput"] = out["total_output_tokens"] / d
        out["total_token_throughput"] = (out["total_input_tokens"] + out["total_output_tokens"]) / d
        tpot = [(s.e2e_s - s.ttft_s) / (s.output_tokens - 1) for s in ok if s.output_tokens > 1 and s.ttft_s is not None]
        series = {"ttft": [s.ttft_s for s in ok if s.ttft_s is not None], "tpot": tpot,
                  "itl": [x for s in ok for x in s.itl_s], "e2el": [s.e2e_s for s in ok if s.e2e_s is not None]}
        for name, vals in series.items():
            a = np.asarray(vals, dtype=float) * 1000.0
            for stat, fn in (("mean", np.mean), ("median", np.median), ("std", np.std)):
                out[f"{stat}_{name}_ms"] = float(fn(a)) if a.size else None
            for p in (90, 99):
                out[f"p{p}_{name}_ms"] = float(np.percentile(a, p)) if a.size else None
        # Decode speed under its one name (hybridinfer.metrics): per request, tokens after the first / time since it.
        tps = np.asarray([1.0 / x for x in tpot if x > 0], dtype=float)
        for stat, fn in (("mean", np.mean), ("median", np.median)):
            out[f"{stat}_{DECODE_TPS}"] = float(fn(tps)) if tps.size else None
        errors: dict[str, int] = {}
        for s in failed:
            errors[s.error or "unknown"] = errors.get(s.error or "unknown", 0) + 1
        out["errors"] = errors
        out["first_error"] = failed[0].error if failed else None
        return out


# --- prompts ---------------------------------------------------------------------------------------------

async def server_tokenizer(client: httpx.AsyncClient, base: str):
    """A tokenize(text) -> count function using the server's /tokenize (llama-server and hybridinfer have one),
    or None."""
    root = base.rstrip("/").removesuffix("/v1")
    try:
        r = await client.post(root + "/tokenize", json={"content": "hello world"}, timeout=5)
        if r.status_code != 200 or not isinstance(r.json().get("tokens"), list):
            return None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None

    async def count(text: str) -> int:
        r = await client.post(root + "/tokenize", json={"content": text}, timeout=30)
        return len(r.json()["tokens"])

    return count


async def random_prompts(n: int, tokens: int, rng: random.Random, count=None) -> list[str]:
    """n prompts of `tokens` tokens each: random common words, sized with the server's tokenizer when given
    (otherwise one token per word, an estimate)."""
    out = []
    for _ in range(n):
        pool = [rng.choice(WORDS) for _ in range(tokens + 8)]
        if count is None:
            out.append(" ".join(pool[:tokens]))
            continue
        # The most words that fit (binary search), then pad with one-letter words to the exact count where possible.
        lo, hi = 1, len(pool)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if await count(" ".join(pool[:mid])) <= tokens:
                lo = mid
            else:
                hi = mid - 1
        text = " ".join(pool[:lo])
        got = await count(text)
        for pad in (" a", " I", " a", " I", " a", " I", " a", " I"):
            if got >= tokens:
                break
            c = await count(text + pad)
            if c <= tokens:
                text, got = text + pad, c
        out.append(text)
    return out


def file_prompts(path: str, n: int, rng: random.Random) -> list[str]:
    """JSONL: one object per line with "prompt" (str) or "messages" (first user message is used)."""
    items = []
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{ln}: not valid JSON") from None
            if isinstance(obj.get("prompt"), str):
                items.append(obj["prompt"])
            elif isinstance(obj.get("messages"), list):
                items.append(next(m["content"] for m in obj["messages"] if m.get("role") == "user"))
            else:
                raise ValueError(f"{path}:{ln}: needs a \"prompt\" string or a \"messages\" list")
    if not items:
        raise ValueError(f"{path}: no prompts")
    rng.shuffle(items)
    return [items[i % len(items)] for i in range(n)]


# --- one request -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    url: str                  # base, ending in /v1
    model: str
    chat: bool = True
    max_tokens: int = 128
    ignore_eos: bool = True
    api_key: str | None = None
    seed: int | None = None
    timeout: float = 600.0


async def one(client: httpx.AsyncClient, t: Target, prompt: str, index: int, t_level: float) -> Sample:
    path, body, headers = _request(t, prompt, index)
    t0 = time.perf_counter()
    s = Sample(index=index, ok=False, start_s=t0 - t_level)
    try:
        async with client.stream("POST", t.url.rstrip("/") + path, json=body, headers=headers,
                                 timeout=httpx.Timeout(t.timeout, connect=10)) as r:
            if r.status_code >= 400:
                raw = (await r.aread()).decode(errors="replace")
                s.error = f"HTTP {r.status_code}: {_message(raw)}"
                return s
            usage, done = await _read_events(r, t, s, t0)
            if s.error:
                return s
    except httpx.ConnectError as e:
        s.error = f"connection failed: {e or 'refused'}"
        return s
    except httpx.TimeoutException:
        s.error = f"timed out after {t.timeout:g} s"
        return s
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        s.error = f"stream broke: {e.__class__.__name__}{': ' + str(e) if str(e) else ''}"
        return s
    if not done:
        s.error = "stream ended before [DONE]"
        return s
    s.e2e_s = time.perf_counter() - t0
    s.ok = True
    _count_tokens(s, usage)
    return s


def _request(t: Target, prompt: str, index: int) -> tuple[str, dict, dict]:
    """The streaming request for one prompt: its path under /v1, JSON body and headers."""
    body = {"model": t.model, "stream": True, "max_tokens": t.max_tokens,
            "stream_options": {"include_usage": True}}
    if t.chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if t.ignore_eos:
        body["ignore_eos"] = True
    if t.seed is not None:
        body["seed"] = t.seed + index
    headers = {"Authorization": f"Bearer {t.api_key}"} if t.api_key else {}
    path = "/chat/completions" if t.chat else "/completions"
    return path, body, headers


async def _read_events(r: httpx.Response, t: Target, s: Sample, t0: float) -> tuple[dict | None, bool]:
    """Reads the server-sent events into `s` (time to first text, gaps between texts, deltas, reasoning deltas);
    returns the usage the server reported (or None) and whether [DONE] came. An error event sets s.error."""
    last = None
    usage = None
    async for line in r.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return usage, True
        chunk = json.loads(payload)
        if "error" in chunk:
            s.error = f"stream error: {_message(json.dumps(chunk))}"
            return usage, False
        if chunk.get("usage"):
            usage = chunk["usage"]
        for ch in chunk.get("choices") or []:
            delta = ch.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            text = delta.get("content") if t.chat else ch.get("text")
            if not (reasoning or text):
                continue
            now = time.perf_counter()
            if last is None:
                s.ttft_s = now - t0
            else:
                s.itl_s.append(now - last)
            last = now
            s.chunks += 1
            if reasoning:
                s.reasoning_tokens += 1
    return usage, False


def _count_tokens(s: Sample, usage: dict | None) -> None:
    """Prompt, output, reasoning and answer tokens of a finished request: the server's usage where it gave one."""
    if usage:
        s.prompt_tokens = usage.get("prompt_tokens", 0)
        s.output_tokens = usage.get("completion_tokens", 0)
    else:  # no usage from this server: one streamed delta per token
        s.output_tokens = s.chunks
    detail = ((usage or {}).get("completion_tokens_details") or {}).get("reasoning_tokens")
    if detail is not None:
        s.reasoning_tokens = detail
    elif s.chunks:  # deltas are not always one token each (held-back tags, UTF-8): split the count in proportion
        s.reasoning_tokens = round(s.output_tokens * s.reasoning_tokens / s.chunks)
    s.answer_tokens = max(0, s.output_tokens - s.reasoning_tokens)


def _message(raw: str) -> str:
    try:
        obj = json.loads(raw)
        e = obj.get("error", obj)
        msg = e.get("message") if isinstance(e, dict) else str(e)
        return (msg or raw).strip().splitlines()[0][:300]
    except (ValueError, AttributeError, IndexError):
        return (raw.strip().splitlines() or ["(empty body)"])[0][:300]


# --- a level ---------------------------------------------------------------------------------------------

async def run_level(t: Target, prompts: list[str], concurrency: int, request_rate: float = float("inf"),
                    duration: float | None = None, rng: random.Random | None = None, on_done=None) -> Level:
    """Closed loop when request_rate is inf, else Poisson arrivals; at most `concurrency` in flight.
    With `duration`, no request starts after it (prompts are reused round-robin)."""
    rng = rng or random.Random(0)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        samples: list[Sample] = []
        t_level = time.perf_counter()
        sem = asyncio.Semaphore(concurrency)
        counter = iter(range(10**9))

        def more(i: int) -> bool:
            if duration is not None:
                return time.perf_counter() - t_level < duration
            return i < len(prompts)

        async def send(i: int):
            try:
                s = await one(client, t, prompts[i % len(prompts)], i, t_level)
            finally:
                sem.release()
            samples.append(s)
            if on_done:
                on_done(s)

        if request_rate == float("inf"):
            async def worker():
                while True:
                    i = next(counter)
                    if not more(i):
                        return
                    await sem.acquire()
                    await send(i)
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            tasks = []
            i = 0
            while more(i):
                await sem.acquire()
                tasks.append(asyncio.create_task(send(i)))
                i += 1
                await asyncio.sleep(rng.expovariate(request_rate))
            await asyncio.gather(*tasks)
        wall = time.perf_counter() - t_level
    samples.sort(key=lambda s: s.index)
    return Level(concurrency, request_rate, wall, samples)


async def server_info(client: httpx.AsyncClient, base: str, api_key: str | None) -> dict | None:
    """What a hybridinfer server reports about itself on /health (slots, queue, context, the engine's prompt cache
    in RAM), or None for another kind of server."""
    root = base.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = await client.get(root + "/health", headers=headers, timeout=5)
        body = r.json()
    except (httpx.HTTPError, ValueError):
        return None
    if not isinstance(body, dict) or "slots" not in body:
        return None
    return {k: body.get(k) for k in ("slots", "queue", "ctx_per_slot", "cache_ram_mib")}


async def first_model(client: httpx.AsyncClient, base: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = await client.get(base.rstrip("/") + "/models", headers=headers, timeout=10)
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise ValueError("the server lists no models")
    return data[0]["id"]
