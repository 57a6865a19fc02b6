"""
title: hybridinfer
author: hybridinfer
version: 0.1.0
license: MIT
description: Chat with models served by `hybridinfer serve`: R1's reasoning as a collapsible thinking block, speed (tokens/s, TTFT) as a status line.
"""

# One self-contained file: it imports only what Open-WebUI itself ships (pydantic, httpx, the standard library).
# Install: Admin Panel > Functions > Import (or paste), enable it, set BASE_URL in its valves.
# `hybridinfer openwebui-pipe -o hybridinfer_pipe.py` writes this file.

import json
import re
import time
from typing import AsyncIterator

import httpx
from pydantic import BaseModel, Field

# Sampling parameters Open-WebUI may put in the body; passed through unchanged.
PASS_THROUGH = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "max_completion_tokens", "stop", "seed",
                "presence_penalty", "frequency_penalty", "repeat_penalty", "logit_bias", "response_format",
                "grammar", "json_schema", "ignore_eos")  # the last three: llama.cpp extensions (custom params)


class Pipe:
    class Valves(BaseModel):
        BASE_URL: str = Field(default="http://127.0.0.1:8000/v1",
                              description="hybridinfer's OpenAI base URL (serve prints it at startup)")
        API_KEY: str = Field(default="", description="the key given to `hybridinfer serve --api-key`, if any")
        REQUEST_TIMEOUT: float = Field(default=600.0, description="seconds to wait for any part of a response (serve sends a keepalive every 2 s while it reads a long prompt)")
        SHOW_REASONING: bool = Field(default=True, description="show the model's reasoning as a thinking block")
        MODEL_FILTER: str = Field(default="", description="only list models whose id matches this regex (empty: all)")

    def __init__(self):
        self.type = "manifold"
        self.name = "hybridinfer: "
        self.valves = self.Valves()  # Open-WebUI applies saved valves onto this instance

    # --- models -------------------------------------------------------------------------------------------------
    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.valves.API_KEY}"} if self.valves.API_KEY else {}

    def _url(self, path: str) -> str:
        return self.valves.BASE_URL.rstrip("/") + path

    async def pipes(self) -> list[dict]:
        try:
            async with httpx.AsyncClient(timeout=10) as c:
                r = await c.get(self._url("/models"), headers=self._headers())
                r.raise_for_status()
                ids = [m["id"] for m in r.json().get("data", [])]
        except Exception as e:  # noqa: BLE001 — shown to the user as a model entry, never a traceback
            return [{"id": "unreachable", "name": f"unreachable — {self._describe(e)}"}]
        if self.valves.MODEL_FILTER:
            ids = [i for i in ids if re.search(self.valves.MODEL_FILTER, i)]
        return [{"id": i, "name": i} for i in ids]

    def _describe(self, e: Exception) -> str:
        if isinstance(e, httpx.ConnectError):
            return f"cannot reach {self.valves.BASE_URL} (is `hybridinfer serve` running?)"
        if isinstance(e, httpx.TimeoutException):
            return f"{self.valves.BASE_URL} did not answer within {self.valves.REQUEST_TIMEOUT:g} s"
        if isinstance(e, httpx.HTTPStatusError):
            return f"HTTP {e.response.status_code}: {_error_message(e.response)}"
        return f"{e.__class__.__name__}: {e}"

    # --- chat ---------------------------------------------------------------------------------------------------
    def _payload(self, body: dict, stream: bool) -> dict:
        model = body.get("model", "")
        model = model.split(".", 1)[1] if "." in model else model  # Open-WebUI sends "<function_id>.<model id>"
        out = {"model": model, "messages": body.get("messages", []), "stream": stream}
        if stream:
            out["stream_options"] = {"include_usage": True}
        for k in PASS_THROUGH:
            if body.get(k) is not None:
                out[k] = body[k]
        return out

    async def pipe(self, body: dict, __event_emitter__=None, __task__=None):
        emit = __event_emitter__
        if __task__ or not body.get("stream", True):
            return await self._once(body, emit, answer_only=bool(__task__))
        return self._stream(body, emit)

    async def _status(self, emit, description: str, done: bool = False) -> None:
        if emit:
            await emit({"type": "status", "data": {"description": description, "done": done}})

    async def _once(self, body: dict, emit, answer_only: bool) -> str:
        await self._status(emit, "Waiting for hybridinfer…")
        t0 = time.perf_counter()
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(self.valves.REQUEST_TIMEOUT, connect=10)) as c:
                r = await c.post(self._url("/chat/completions"), json=self._payload(body, False), headers=self._headers())
                r.raise_for_status()
                data = r.json()
        except Exception as e:  # noqa: BLE001
            msg = f"hybridinfer: {self._describe(e)}"
            await self._status(emit, msg, done=True)
            return msg
        msg = (data.get("choices") or [{}])[0].get("message") or {}
        reasoning, content = msg.get("reasoning_content"), msg.get("content") or ""
        usage = data.get("usage") or {}
        await self._status(emit, f"{usage.get('completion_tokens', 0)} tokens in {time.perf_counter() - t0:.1f} s", True)
        if reasoning and self.valves.SHOW_REASONING and not answer_only:
            return f"<think>\n{reasoning}\n</think>\n\n{content}"
        return content

    async def _stream(self, body: dict, emit) -> AsyncIterator[str]:
        await self._status(emit, "Waiting for hybridinfer…")
        t0 = time.perf_counter()
        shown = _Shown()
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(self.valves.REQUEST_TIMEOUT, connect=10)) as c:
                # Leaving this block (the user pressed stop: Open-WebUI closes this generator) closes the HTTP
                # stream, and hybridinfer frees the generation slot.
                async with c.stream("POST", self._url("/chat/completions"), json=self._payload(body, True),
                                    headers=self._headers()) as r:
                    if r.status_code >= 400:
                        await r.aread()
                        raise httpx.HTTPStatusError("error", request=r.request, response=r)
                    async for line in r.aiter_lines():
                        if line.startswith(":"):  # serve's comments while the prompt is read: a status line
                            note = progress_note(line) if shown.phase is None else None
                            if note and shown.note_due(note):
                                await self._status(emit, note)
                            continue
                        chunk = _event(line)
                        if chunk is _DONE:
                            break
                        if chunk is None:
                            continue
                        if chunk.get("usage"):
                            shown.usage = chunk["usage"]
                        for ch in chunk.get("choices") or []:
                            delta = ch.get("delta") or {}
                            async for text in self._show(shown, emit, delta.get("reasoning_content"),
                                                         delta.get("content")):
                                yield text
            if shown.in_think:
                yield "\n</think>\n\n"
        except Exception as e:  # noqa: BLE001 — one readable line for the user, never a traceback
            if shown.in_think:
                yield "\n</think>\n\n"
            msg = self._describe(e) if isinstance(e, httpx.HTTPError) else str(e)
            await self._status(emit, f"hybridinfer: {msg}", done=True)
            yield f"\n\n**hybridinfer:** {msg}"
            return
        await self._status(emit, shown.summary(t0), done=True)

    async def _show(self, shown: "_Shown", emit, reasoning, content) -> AsyncIterator[str]:
        """The text one delta adds: reasoning inside one <think> block (with SHOW_REASONING), then the answer; a
        status line when the phase changes."""
        if not (reasoning or content):
            return
        now = time.perf_counter()
        shown.first = shown.first or now
        shown.last = now
        if reasoning:
            if shown.phase is None:
                shown.phase = "thinking"
                await self._status(emit, "Thinking…")
            if self.valves.SHOW_REASONING:
                if not shown.in_think:
                    shown.in_think = True
                    yield "<think>\n"
                yield reasoning
        if content:
            if shown.phase != "answering":
                shown.phase = "answering"
                await self._status(emit, "Answering…")
            if shown.in_think:
                shown.in_think = False
                yield "\n</think>\n\n"
            yield content


_DONE = object()
STATUS_EVERY = 2.0  # seconds between two status lines while the prompt is read (each is stored with the chat)


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"


def progress_note(line: str) -> str | None:
    """The status line for one of hybridinfer's comments while a prompt is read, e.g.
    `: progress {"stage":"prompt","processed":2700,"total":6000,"cached":0,"tokens_per_s":82.5,"eta_s":40.0}` ->
    "reading the prompt: 45 % (2,700 of 6,000 tokens, ~40 s left)"; from an engine that reports no progress
    `: keepalive {"stage":"prompt","elapsed_s":35}` -> "reading the prompt… 35 s"; `: queued {"waited_s":12}` ->
    "waiting for a free slot… 12 s"; None for anything else."""
    try:
        kind, raw = line[1:].strip().split(" ", 1)
        p = json.loads(raw)
        if kind == "queued":
            return f"waiting for a free slot… {_seconds(float(p['waited_s']))}"
        if kind == "keepalive":
            return f"reading the prompt… {_seconds(float(p['elapsed_s']))}" if p.get("stage") == "prompt" else None
        if kind != "progress":
            return None
        done, total = int(p["processed"]), int(p["total"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if total <= 0:
        return None
    eta = p.get("eta_s")
    left = f", ~{_seconds(eta)} left" if isinstance(eta, (int, float)) else ""
    return f"reading the prompt: {100 * done // total} % ({done:,} of {total:,} tokens{left})"


def _event(line: str):
    """The JSON chunk a server-sent event line carries: None for a line that is not data, _DONE for [DONE]. An
    error event raises, with the server's message."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return _DONE
    chunk = json.loads(data)
    if "error" in chunk:
        raise RuntimeError((chunk["error"] or {}).get("message") or "the server reported an error")
    return chunk


class _Shown:
    """What a streamed answer has shown so far: its phase (None -> "thinking" -> "answering"), whether a <think>
    block is open, the times of the first and last text and the usage, for the closing speed line."""

    def __init__(self):
        self.first = self.last = None
        self.phase = None
        self.in_think = False
        self.noted, self.note_kind = float("-inf"), ""  # the last reading/waiting status line: when, which kind
        self.usage: dict = {}

    def note_due(self, note: str) -> bool:
        """A reading/waiting status line is shown when its kind changes, else at most every STATUS_EVERY s."""
        now, kind = time.perf_counter(), note.split("…")[0].split(":")[0]
        if kind == self.note_kind and now - self.noted < STATUS_EVERY:
            return False
        self.noted, self.note_kind = now, kind
        return True

    def summary(self, t0: float) -> str:
        """The closing status line: tokens, decode speed, time to first token."""
        n = self.usage.get("completion_tokens", 0)
        first, last = self.first, self.last
        ttft = (first - t0) if first else 0.0
        tps = (n - 1) / (last - first) if first and last and last > first and n > 1 else 0.0
        return f"{n} tokens · {tps:.1f} tok/s · TTFT {ttft:.2f} s"


def _error_message(r: httpx.Response) -> str:
    try:
        e = r.json().get("error", {})
        return (e.get("message") if isinstance(e, dict) else str(e)) or r.text[:200]
    except Exception:  # noqa: BLE001
        return r.text[:200] or r.reason_phrase
