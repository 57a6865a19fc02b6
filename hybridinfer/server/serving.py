"""Serving logic: admission, defaults, forwarding to the engine, reasoning split, metrics.

Returns a response dict, an async generator of SSE strings, or an `Err` value; knows nothing about FastAPI.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator


import orjson

from ..engines.base import EngineFailed, EngineRejected
from ..metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, error_body
from .reasoning import ThinkSplitter, split_text

log = logging.getLogger("hybridinfer.server")
R1_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "min_p": 0.05}  # Unsloth's advice for R1 (1.58-bit)


@dataclass(frozen=True)
class Settings:
    model_id: str
    ctx_per_slot: int
    parallel: int
    queue: int = 16
    starts_in_think: bool = False  # the chat template opens <think> in the generation prompt (R1)
    reasoning_model: bool = False  # apply R1 sampling defaults
    request_timeout: float = 600.0
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass(frozen=True)
class Err:
    status: int
    body: dict
    headers: dict = field(default_factory=dict)


def err(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
        param: str | None = None, retry_after: int | None = None) -> Err:
    return Err(status, error_body(message, type_, code, param), {"Retry-After": str(retry_after)} if retry_after else {})


def sse(obj) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"  # per token: orjson is ~5x the stdlib here


class Serving:
    def __init__(self, settings: Settings, engine, metrics: ServerMetrics):
        self.s = settings
        self.engine = engine  # the interface in engines/base.py
        self.metrics = metrics
        self.slots = asyncio.Semaphore(settings.parallel)
        self.waiting = 0

    # --- models / health -------------------------------------------------------------------------
    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.s.model_id, "object": "model", "created": self.s.created,
                                            "owned_by": "hybridinfer", "max_model_len": self.s.ctx_per_slot}]}

    def health(self) -> tuple[int, dict]:
        st = self.engine.state
        body = {"status": {"ready": "ok", "down": "engine_down"}.get(st, st), "model": self.s.model_id,
                "engine_restarts": self.engine.restarts, "in_flight": self.metrics.in_flight,
                "queued": self.metrics.queued, "slots": self.s.parallel}
        return (200 if st == "ready" else 503), body

    async def engine_metrics(self) -> str:
        return await self.engine.metrics_text()

    # --- admission -------------------------------------------------------------------------------
    def _check(self, model: str | None, max_tokens: int | None) -> Err | None:
        if model not in (None, "", self.s.model_id):
            return err(404, f"model '{model}' does not exist; this server serves '{self.s.model_id}'",
                       code="model_not_found", param="model")
        if max_tokens is not None and max_tokens > self.s.ctx_per_slot:
            return err(400, f"max_tokens {max_tokens} exceeds the context of {self.s.ctx_per_slot} tokens per slot; "
                            f"ask for fewer, or restart serve with a larger --ctx", param="max_tokens")
        if self.engine.state != "ready":
            what = "is loading the model" if self.engine.state in ("loading", "starting") else "is restarting after a crash"
            return err(503, f"the engine {what}; retry shortly", type_="server_error", code="engine_unavailable", retry_after=2)
        if self.metrics.in_flight + self.waiting >= self.s.parallel + self.s.queue:
            return err(429, f"server busy: {self.s.parallel} slots and {self.s.queue} queued requests in use; retry shortly",
                       type_="rate_limit_error", code="queue_full", retry_after=1)
        return None

    async def _acquire(self) -> None:
        self.waiting += 1
        self.metrics.queued = self.waiting
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
            self.metrics.queued = self.waiting
        self.metrics.in_flight += 1

    def _release(self) -> None:
        self.metrics.in_flight -= 1
        self.slots.release()

    # --- endpoints -------------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest):
        max_tokens = req.max_tokens or req.max_completion_tokens
        problem = self._check(req.model, max_tokens)
        if problem:
            self.metrics.request_done("chat", problem.status)
            return problem
        body = req.model_dump(exclude_none=True, exclude={"reasoning_format", "max_completion_tokens", "stream_options"})
        body["model"] = self.s.model_id
        if max_tokens:
            body["max_tokens"] = max_tokens
        if self.s.reasoning_model:
            for k, v in R1_SAMPLING.items():
                body.setdefault(k, v)
        split = req.reasoning_format == "split"
        if req.stream:
            body["stream_options"] = {"include_usage": True}
            return self._stream("chat", "/v1/chat/completions", body, split)
        return await self._once("chat", "/v1/chat/completions", body, split)

    async def completions(self, req: CompletionRequest):
        problem = self._check(req.model, req.max_tokens)
        if problem:
            self.metrics.request_done("completions", problem.status)
            return problem
        body = req.model_dump(exclude_none=True, exclude={"stream_options"})
        body["model"] = self.s.model_id
        if req.stream:
            body["stream_options"] = {"include_usage": True}
            return self._stream("completions", "/v1/completions", body, None)
        return await self._once("completions", "/v1/completions", body, None)

    # --- forwarding ------------------------------------------------------------------------------
    async def _once(self, endpoint: str, path: str, body: dict, split: bool | None):
        await self._acquire()
        t0 = time.perf_counter()
        try:
            data = await self.engine.complete(path, body)
        except EngineRejected as e:
            self.metrics.request_done(endpoint, e.status)
            return err(e.status, e.message, e.type, code=str(e.status))
        except EngineFailed as e:
            self.metrics.request_done(endpoint, 502)
            return err(502, f"the engine failed during the request ({e}); it is being restarted",
                       type_="server_error", code="engine_error")
        finally:
            self._release()
        data["model"] = self.s.model_id
        for ch in data.get("choices", []):
            msg = ch.get("message")
            if msg is None or split is None:
                continue
            text = msg.get("content") or ""
            if split:
                reasoning, content = split_text(text, self.s.starts_in_think)
                msg["content"] = content
                if reasoning is not None:
                    msg["reasoning_content"] = reasoning
            elif self.s.starts_in_think:
                msg["content"] = "<think>\n" + text
        usage = data.get("usage") or {}
        timings = data.pop("timings", None) or {}
        self.metrics.request_done(endpoint, 200, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
        self.metrics.e2e.observe(time.perf_counter() - t0)
        if timings.get("prompt_ms") is not None:
            self.metrics.ttft.observe(timings["prompt_ms"] / 1000)
        if timings.get("predicted_per_second"):
            self.metrics.tps.observe(timings["predicted_per_second"])
        return data

    def _stream(self, endpoint: str, path: str, body: dict, split: bool | None) -> AsyncIterator[str]:
        async def gen():
            await self._acquire()
            t0 = time.perf_counter()
            first = last = None
            usage = {}
            status = 200
            splitter = ThinkSplitter(self.s.starts_in_think) if split else None
            raw_prefix = "<think>\n" if (split is False and self.s.starts_in_think) else ""
            model_id = self.s.model_id
            chat = endpoint == "chat"
            try:
                async for chunk in self.engine.stream(path, body):
                    chunk["model"] = model_id
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    chunk.pop("timings", None)  # llama.cpp's own field; usage carries the counts
                    choices = chunk.get("choices")
                    if not choices:
                        yield sse(chunk)
                        continue
                    ch = choices[0]
                    delta = ch.get("delta") or {}
                    text = delta.get("content") if chat else ch.get("text")
                    if text:
                        last = time.perf_counter()
                        if first is None:
                            first = last
                            self.metrics.ttft.observe(last - t0)
                    if not chat or split is None:
                        yield sse(chunk)
                        continue
                    if splitter is None:  # raw
                        if text and raw_prefix:
                            delta["content"] = raw_prefix + text
                            raw_prefix = ""
                        yield sse(chunk)
                        continue
                    parts = splitter.feed(text) if text else ("", "")
                    if ch.get("finish_reason"):
                        fr, fc = splitter.flush()
                        parts = (parts[0] + fr, parts[1] + fc)
                    if parts[0]:
                        yield sse(_with_delta(chunk, {"reasoning_content": parts[0]}, None))
                    if parts[1]:
                        yield sse(_with_delta(chunk, {"content": parts[1]}, None))
                    if ch.get("finish_reason") or (not text and "role" in delta):
                        yield sse(_with_delta(chunk, {k: v for k, v in delta.items() if k != "content"},
                                              ch.get("finish_reason")))
                yield b"data: [DONE]\n\n"
            except EngineRejected as e:
                status = e.status
                yield sse(error_body(e.message, e.type, str(e.status)))
                yield b"data: [DONE]\n\n"
            except EngineFailed as e:
                status = 502
                log.warning("engine stream broke: %s", e)
                yield sse(error_body("the engine stopped during generation; it is being restarted — retry the request",
                                     "server_error", "engine_error"))
                yield b"data: [DONE]\n\n"
            except (asyncio.CancelledError, GeneratorExit):
                status = 499  # the client went away
                self.metrics.cancelled += 1
                raise
            finally:
                self._release()
                self.metrics.request_done(endpoint, status, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
                if status == 200:
                    self.metrics.e2e.observe(time.perf_counter() - t0)
                    toks = usage.get("completion_tokens", 0)
                    if first is not None and last is not None and toks > 1 and last > first:
                        self.metrics.tps.observe((toks - 1) / (last - first))

        return gen()


def _with_delta(chunk: dict, delta: dict, finish_reason) -> dict:
    out = dict(chunk)
    ch = dict(chunk["choices"][0])
    ch["delta"] = delta
    ch["finish_reason"] = finish_reason
    out["choices"] = [ch]
    out.pop("usage", None)
    out.pop("timings", None)
    return out
