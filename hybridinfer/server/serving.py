"""Serving logic: admission, limits, defaults, forwarding to the engine, reasoning split, metrics.

Returns a response dict, a `Stream` of SSE bytes, or an `Err` value; knows nothing about FastAPI. The caller runs
each request under a watch of its client connection and cancels it when the client leaves: a cancelled request
gives its queue place or engine slot back at once (the engine stops when its connection closes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import anyio
import orjson

from ..engines.base import EngineFailed, EngineRejected, EngineTimeout, Running
from ..engines.chunks import add_usage
from ..metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, error_body
from .reasoning import SPLITTERS, split_with

log = logging.getLogger("hybridinfer.server")
R1_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "min_p": 0.05}  # Unsloth's advice for R1 (1.58-bit)
# A text longer than this many characters per context token cannot fit a slot (real tokenizers average 3-5
# characters per token on prose and code); refusing it here keeps pathological text away from the engine's tokenizer.
CHARS_PER_TOKEN = 8
DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class Settings:
    model_id: str
    ctx_per_slot: int
    parallel: int
    queue: int = 16
    starts_in_think: bool = False  # the chat template opens <think> in the generation prompt (R1)
    reasoning_model: bool = False  # apply R1 sampling defaults
    reasoning: str = "think"  # the model's reasoning format: think | harmony | none (reasoning.reasoning_format)
    request_timeout: float = 600.0
    cache_ram_mib: int | None = None  # the engine's prompt cache in RAM (reported by /health)
    chat_template: bool = True  # False: the GGUF has none (a base model); /v1/models says so with chat_note
    chat_note: str = ""
    keepalive_s: float = 2.0  # a streamed answer's longest silence: an SSE comment (keepalive or progress) after it
    prefill_tps: float | None = None  # the plan's predicted prompt speed (the ETA before the engine reports one)
    prompt_cache_dir: str = ""  # the prompt cache on disk: its keyed directory (plan.prompt_cache_dir), "" = none
    prompt_cache_bytes: int = 0  # its cap
    kv_bytes_per_token: int = 0  # a saved state's size per token (the free-disk check before a save)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def max_prompt_chars(self) -> int:
        return self.ctx_per_slot * CHARS_PER_TOKEN


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


class _Ticket:
    """One admitted request: queued until it holds a slot, then running; released exactly once."""

    def __init__(self, serving: "Serving"):
        self.serving = serving
        self.t_admit = time.perf_counter()
        self.running = False
        self.t_run: float | None = None  # when it got its slot
        self.released = False
        self.engine_slot = None  # the engine slot prompt_cache.py chose

    async def slot(self, body: dict | None = None) -> None:
        await self.serving.slots.acquire()  # cancellable: a client that leaves drops its queue entry
        if self.released:  # released while waiting (cannot happen today, but never leak a slot)
            self.serving.slots.release()
            return
        self.running = True
        self.t_run = time.perf_counter()
        self.serving.running += 1
        self.serving.metrics.queue_wait.observe(time.perf_counter() - self.t_admit)
        cache = self.serving.prompt_cache
        if cache and body is not None:  # its engine slot, its state restored (prompt_cache.py)
            self.engine_slot = await cache.enter(body)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        s = self.serving
        s.admitted -= 1
        if self.running:
            s.running -= 1
            s.slots.release()
        if self.engine_slot is not None:
            s.prompt_cache.leave(self.engine_slot)


class Stream:
    """An SSE body: iterate it for the bytes; `aclose()` ends it and frees its slot even if it never started."""

    def __init__(self, agen: AsyncIterator[bytes], finish):
        self._agen = agen
        self._finish = finish

    def __aiter__(self):
        return self._agen

    async def aclose(self) -> None:
        try:
            await self._agen.aclose()
        finally:
            await self._finish(499)


class Serving:
    def __init__(self, settings: Settings, engine: Running, metrics: ServerMetrics | None = None):
        self.s = settings
        self.engine = engine
        self.slots = asyncio.Semaphore(settings.parallel)
        self.admitted = 0  # queued + running: the one count admission decides on
        self.running = 0
        self.metrics = metrics or ServerMetrics(self.live)
        self.draining = False  # SIGTERM: refuse new requests, end the admitted ones within the grace period
        self.jobs: dict[asyncio.Task, _Ticket] = {}  # each admitted request's engine work
        self.shut: set[asyncio.Task] = set()  # jobs ended by the shutdown (their client gets 503 / an error event)
        self.engine_status: dict = {}  # what the engine itself reports doing (its /metrics), kept by poll_engine
        from .prompt_cache import PromptCache

        self.prompt_cache = PromptCache.create(settings, engine, idle=lambda: self.admitted == 0)
        if self.prompt_cache:
            self.metrics.watch_prompt_cache(self.prompt_cache.report)
            if self.prompt_cache.store and hasattr(engine, "before_stop"):
                engine.before_stop.append(self.prompt_cache.save_all)  # saved at shutdown, before the engine stops

    def live(self) -> tuple[str, int, int, int]:
        return self.engine.state, self.engine.restarts, self.running, self.admitted - self.running

    # --- models / health -------------------------------------------------------------------------
    def models(self) -> dict:
        model = {"id": self.s.model_id, "object": "model", "created": self.s.created, "owned_by": "hybridinfer",
                 "max_model_len": self.s.ctx_per_slot, "chat_template": self.s.chat_template}
        if self.s.chat_note:
            model["chat_template_note"] = self.s.chat_note
        return {"object": "list", "data": [model]}

    async def health(self) -> tuple[int, dict]:
        st = self.engine.state
        status = "shutting_down" if self.draining else {"ready": "ok", "down": "engine_down"}.get(st, st)
        body = {"status": status, "model": self.s.model_id,
                "engine_restarts": self.engine.restarts, "in_flight": self.running,
                "queued": self.admitted - self.running, "slots": self.s.parallel, "queue": self.s.queue,
                "ctx_per_slot": self.s.ctx_per_slot, "cache_ram_mib": self.s.cache_ram_mib,
                "request_timeout_s": self.s.request_timeout, **await self._engine_processing(st)}
        if self.prompt_cache:
            body["prompt_cache"] = self.prompt_cache.report()
        return (200 if status == "ok" else 503), body

    async def _engine_processing(self, st: str) -> dict:
        """What the engine itself says it is working on (llama-server's requests_processing): a prompt it is still
        reading for a client that left shows here, not in in_flight. The engine answers between two batches of a
        prompt, so a busy engine may not answer within 0.5 s: then the last answer and its age."""
        ask = getattr(self.engine, "engine_busy", None)
        if ask is None or st != "ready":
            return {"engine_processing": None}
        n = await ask()
        now = time.monotonic()
        if n is not None:
            self.engine_status = {"n": n, "t": now}
        last = self.engine_status
        if not last:
            return {"engine_processing": None}
        return {"engine_processing": last["n"], "engine_processing_age_s": round(now - last["t"], 1)}

    async def engine_metrics(self) -> str:
        return await self.engine.metrics_text()

    # --- checks and admission --------------------------------------------------------------------
    def _too_long(self, chars: int, what: str = "the prompt") -> Err | None:
        limit = self.s.max_prompt_chars
        if chars <= limit:
            return None
        return err(400, f"{what} has {chars:,} characters, more than a slot's context of {self.s.ctx_per_slot} tokens "
                        f"can hold (limit {limit:,} characters); shorten it, or restart serve with a larger --ctx",
                   code="context_length_exceeded")

    def _unavailable(self) -> Err | None:
        if self.engine.state == "ready":
            return None
        what = "is loading the model" if self.engine.state in ("loading", "starting") else "is restarting after a crash"
        return err(503, f"the engine {what}; retry shortly", type_="server_error", code="engine_unavailable", retry_after=2)

    def _check(self, model: str | None, max_tokens: int | None, chars: int) -> Err | None:
        if model not in (None, "", self.s.model_id):
            return err(404, f"model '{model}' does not exist; this server serves '{self.s.model_id}'",
                       code="model_not_found", param="model")
        if max_tokens is not None and max_tokens > self.s.ctx_per_slot:
            return err(400, f"max_tokens {max_tokens} exceeds the context of {self.s.ctx_per_slot} tokens per slot; "
                            f"ask for fewer, or restart serve with a larger --ctx", param="max_tokens")
        return self._too_long(chars) or self._unavailable()

    async def _tokens_fit(self, texts: list[str]) -> Err | None:
        """A prompt that cannot fit a slot, refused before it waits for one or reaches the engine: counted by the
        engine's own tokenizer (llama-server tokenizes on its HTTP thread, not between the batches of a running
        prompt), and only for a text long enough to need it (a token is at least one byte of UTF-8). The chat
        template's tokens are not counted: a prompt refused here cannot fit whatever the template adds."""
        for text in texts:
            if len(text) * 4 + 1 < self.s.ctx_per_slot or len(text.encode()) < self.s.ctx_per_slot:
                continue
            try:
                n = len(await self.engine.tokenize(text))
            except (EngineRejected, EngineFailed, AttributeError, NotImplementedError):
                return None  # the engine decides, as before
            if n >= self.s.ctx_per_slot:
                return err(400, f"the prompt has {n:,} tokens, more than a slot's context of {self.s.ctx_per_slot:,} "
                                f"tokens can hold; shorten it, or restart serve with a larger --ctx",
                           code="context_length_exceeded")
        return None

    def admit(self) -> _Ticket | Err:
        """The one admission decision for every request kind: check and count with no await in between."""
        if self.draining:
            return err(503, "the server is shutting down; retry the request (on another instance, or once it is back)",
                       type_="server_error", code="shutting_down", retry_after=5)
        if self.admitted >= self.s.parallel + self.s.queue:
            return err(429, f"server busy: {self.s.parallel} slots and {self.s.queue} queued requests in use; "
                            f"retry shortly", type_="rate_limit_error", code="queue_full", retry_after=1)
        self.admitted += 1
        return _Ticket(self)

    async def _engine_error(self, e: EngineRejected | EngineFailed) -> Err:
        """The client's answer when the engine refused the request or broke during it."""
        if isinstance(e, EngineRejected):
            code = _code(e)
            return err(e.status, _message(e), e.type or "invalid_request_error", code=code,
                       param="response_format" if code == "invalid_json_schema" else None)
        if not isinstance(e, EngineTimeout):
            await asyncio.sleep(0.3)  # a broken connection comes just before the supervisor sees the engine exit
        if isinstance(e, EngineTimeout):
            return err(504, f"the engine did not answer within the request timeout ({self.s.request_timeout:g} s); "
                            f"the request was stopped — ask for fewer tokens, or restart serve with a larger "
                            f"--request-timeout", type_="server_error", code="timeout")
        if self.engine.state != "ready":
            return err(502, f"the engine stopped during the request ({e}); it is being restarted — retry shortly",
                       type_="server_error", code="engine_error")
        return err(502, f"the engine connection failed during the request ({e}); retry the request",
                   type_="server_error", code="engine_error")

    # --- endpoints -------------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest):
        max_tokens = req.max_tokens or req.max_completion_tokens
        chars = sum(len(m.content) if isinstance(m.content, str) else sum(len(p.text) for p in m.content or [])
                    for m in req.messages)
        texts = [m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
                 for m in req.messages]
        problem = self._check(req.model, max_tokens, chars) or await self._tokens_fit(["".join(texts)])
        if problem:
            self.metrics.request_done("chat", problem.status)
            return problem
        body = req.model_dump(exclude_none=True, by_alias=True, exclude={"reasoning_format", "max_completion_tokens", "stream_options"})
        body["model"] = self.s.model_id
        if max_tokens:
            body["max_tokens"] = max_tokens
        if self.s.reasoning_model:
            for k, v in R1_SAMPLING.items():
                body.setdefault(k, v)
        split = req.reasoning_format == "split"
        if req.stream:
            body["stream_options"] = {"include_usage": True}
            return await self._stream("chat", "/v1/chat/completions", body, split)
        return await self._once("chat", "/v1/chat/completions", body, split)

    async def completions(self, req: CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        problem = self._check(req.model, req.max_tokens, max(len(p) for p in prompts)) or await self._tokens_fit(prompts)
        if problem:
            self.metrics.request_done("completions", problem.status)
            return problem
        body = req.model_dump(exclude_none=True, exclude={"stream_options"})
        body["model"] = self.s.model_id
        if req.stream:
            body["stream_options"] = {"include_usage": True}
            return await self._stream("completions", "/v1/completions", body, None)
        return await self._once("completions", "/v1/completions", body, None)

    async def tokenize(self, content: str):
        problem = self._too_long(len(content), "the text") or self._unavailable()
        if problem:
            self.metrics.request_done("tokenize", problem.status)
            return problem
        status = 200
        try:
            return {"tokens": await self.engine.tokenize(content)}
        except (EngineRejected, EngineFailed) as e:
            problem = await self._engine_error(e)
            status = problem.status
            return problem
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            self.metrics.request_done("tokenize", status)

    # --- shutdown ---------------------------------------------------------------------------------
    SHUTTING_DOWN = "the server is shutting down; retry the request"

    def _shutdown_err(self) -> Err:
        return err(503, self.SHUTTING_DOWN, type_="server_error", code="shutting_down", retry_after=5)

    def _end_jobs(self, queued_only: bool) -> int:
        """Ends admitted requests' engine work for the shutdown: the queued ones, or all. Their clients get 503 or,
        on a stream already answered 200, an error event and [DONE]."""
        n = 0
        for job, ticket in list(self.jobs.items()):
            if not job.done() and not (queued_only and ticket.running):
                self.shut.add(job)
                job.cancel()
                n += 1
        return n

    async def drain(self, grace: float) -> None:
        """SIGTERM: admit nothing more (503), end the queued requests now, let the running ones finish for up to
        `grace` seconds, then end them (error event + [DONE] / 503) and return once every request has answered."""
        self.draining = True
        self._end_jobs(queued_only=True)
        deadline = time.monotonic() + grace
        while self.admitted and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.admitted:
            log.warning("shutdown: ending %d request(s) still running after the %g s grace period", self.admitted, grace)
            self._end_jobs(queued_only=False)
            deadline = time.monotonic() + 3.0
            while self.admitted and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

    # --- forwarding ------------------------------------------------------------------------------
    async def _once(self, endpoint: str, path: str, body: dict, split: bool | None):
        ticket = self.admit()
        if isinstance(ticket, Err):
            self.metrics.request_done(endpoint, ticket.status)
            return ticket
        status, usage = 500, None
        job = asyncio.ensure_future(self._once_work(ticket, path, body, split))
        self.jobs[job] = ticket
        try:
            try:
                result = await asyncio.shield(job)  # the job ends as below, never half-cancelled from here
            except asyncio.CancelledError:
                if job in self.shut and not _cancelling():
                    result = self._shutdown_err()
                else:  # the client left: stop the engine's work (its connection closes) before the slot is freed
                    job.cancel()
                    with anyio.CancelScope(shield=True):
                        await asyncio.gather(job, return_exceptions=True)
                    raise
            if isinstance(result, Err):
                status = result.status
                return result
            data, usage, t_engine = result
            timings = data.pop("timings", None) or {}
            status = 200
            self.metrics.e2e.observe(time.perf_counter() - ticket.t_admit)
            if timings.get("prompt_ms") is not None:
                self.metrics.ttft.observe(t_engine - ticket.t_admit + timings["prompt_ms"] / 1000)
            if timings.get("predicted_per_second"):
                self.metrics.decode.observe(timings["predicted_per_second"])
            return data
        except asyncio.CancelledError:
            status = 499  # the client went away: the queue entry or the engine's work is dropped with it
            self.metrics.cancelled.inc()
            raise
        finally:
            self.jobs.pop(job, None)
            self.shut.discard(job)
            ticket.release()
            self.metrics.request_done(endpoint, status, usage)

    async def _once_work(self, ticket: _Ticket, path: str, body: dict, split: bool | None):
        await ticket.slot(body)
        t_engine = time.perf_counter()
        try:
            data = await self.engine.complete(path, body)
        except (EngineRejected, EngineFailed) as e:
            return await self._engine_error(e)
        data["model"] = self.s.model_id
        for ch in data.get("choices", []):
            msg = ch.get("message")
            if msg is None or split is None:
                continue
            text = msg.get("content") or ""
            if split:
                reasoning, content = split_with(self.s.reasoning, text, self.s.starts_in_think)
                msg["content"] = content
                if reasoning is not None:
                    msg["reasoning_content"] = reasoning
            elif self.s.starts_in_think:
                msg["content"] = "<think>\n" + text
        return data, data.get("usage") or {}, t_engine

    async def _stream(self, endpoint: str, path: str, body: dict, split: bool | None):
        """Answers 200 as soon as the engine has accepted the request, or after `keepalive_s` at the latest, so a
        client sees its status line and then SSE comments (keepalive, prefill progress) while the prompt is read.
        What the engine refuses within that time (prompt longer than the context, bad grammar or schema, ...)
        is still an HTTP error; a refusal or failure after it becomes an error event + [DONE]."""
        ticket = self.admit()
        if isinstance(ticket, Err):
            self.metrics.request_done(endpoint, ticket.status)
            return ticket
        state = {"status": 499, "usage": {}, "done": False}
        q: asyncio.Queue = asyncio.Queue()
        job = asyncio.ensure_future(self._pump(ticket, path, body, q))
        self.jobs[job] = ticket

        async def finish(status: int | None = None) -> None:
            if state["done"]:
                return
            state["done"] = True
            if status is not None:
                state["status"] = status
            if state["status"] == 499:
                self.metrics.cancelled.inc()
            if not job.done():
                job.cancel()  # inside the engine stream: its connection closes, and the engine stops the request
            with anyio.CancelScope(shield=True):
                await asyncio.gather(job, return_exceptions=True)
            self.jobs.pop(job, None)
            self.shut.discard(job)
            ticket.release()
            self.metrics.request_done(endpoint, state["status"], state["usage"])

        try:
            try:
                first = await asyncio.wait_for(q.get(), self.s.keepalive_s)
            except asyncio.TimeoutError:
                first = None  # still queued or reading the prompt: answer 200 now and keep the stream alive
            if first is not None and first[0] == "error":
                problem = await self._engine_error(first[1])
                await finish(problem.status)
                return problem
            if first is not None and first[0] == "shutdown":
                await finish(503)
                return self._shutdown_err()
        except BaseException:
            await finish(499)
            raise
        return Stream(self._relay(endpoint, ticket, first, q, split, state, finish), finish)

    async def _pump(self, ticket: _Ticket, path: str, body: dict, q: asyncio.Queue) -> None:
        """The engine's side of a stream, as its own task: wait for a slot, then put each engine chunk on `q`,
        then ("end", None); a refusal or failure as ("error", e); a shutdown as ("shutdown", None)."""
        try:
            await ticket.slot(body)
            gen = self.engine.stream(path, self.engine_body(body))
            try:
                async for chunk in gen:
                    q.put_nowait(("chunk", chunk))
            finally:
                if hasattr(gen, "aclose"):
                    with anyio.CancelScope(shield=True):
                        await gen.aclose()  # closing the engine connection is what stops its work
            q.put_nowait(("end", None))
        except (EngineRejected, EngineFailed) as e:
            q.put_nowait(("error", e))
        except asyncio.CancelledError:
            if asyncio.current_task() in self.shut:
                q.put_nowait(("shutdown", None))
            raise
        except Exception as e:  # noqa: BLE001 — reported to the client by the relay
            q.put_nowait(("crash", e))

    def engine_body(self, body: dict) -> dict:
        """A streamed request as sent to the engine: with prefill progress where the engine reports it."""
        field_ = getattr(self.engine, "progress_field", None)
        return dict(body, **{field_: True}) if field_ else body

    async def _relay(self, endpoint, ticket, first, q, split, state, finish) -> AsyncIterator[bytes]:
        """The engine's chunks as SSE bytes, then [DONE]; an SSE comment after every `keepalive_s` of silence
        (the prefill's progress once the engine reports it); whatever breaks ends the stream with an error event."""
        clock = _Clock(self.metrics, ticket.t_admit)
        chat = endpoint == "chat"
        think = _Think(split, self.s.starts_in_think, self.s.reasoning) if chat and split is not None else None
        progress = _Progress(self.s.prefill_tps)
        ka = self.s.keepalive_s
        item = first
        try:
            if item is None:  # no engine answer within keepalive_s: the status line went out; say why it waits
                yield progress.comment(ticket, clock.t_first is not None)
            last = time.monotonic()
            while True:
                if item is None:
                    try:
                        item = await asyncio.wait_for(q.get(), max(0.01, ka - (time.monotonic() - last)))
                    except asyncio.TimeoutError:
                        yield progress.comment(ticket, clock.t_first is not None)
                        last = time.monotonic()
                        continue
                kind, val = item
                item = None
                if kind == "end":
                    break
                if kind == "error":
                    raise val
                if kind == "shutdown":
                    state["status"] = 503
                    yield sse(error_body(self.SHUTTING_DOWN, "server_error", "shutting_down"))
                    yield DONE
                    return
                if kind == "crash":
                    raise val
                if isinstance(val, dict) and val.get("prompt_progress") is not None:
                    p = val["prompt_progress"]
                    if progress.update(p) and p.get("processed", 0) > p.get("cache", 0) \
                            and time.monotonic() - last >= 0.5:  # a report with news, not more often than 2/s
                        yield progress.comment(ticket, False)
                        last = time.monotonic()
                    continue  # llama-server's progress chunks carry no text: the client gets the comment only
                for event in self._events(val, chat, think, clock, state["usage"]):
                    yield event
                    last = time.monotonic()
            yield DONE
            state["status"] = 200
            clock.done(state["usage"].get("completion_tokens", 0))
        except EngineRejected as e:
            state["status"] = e.status
            yield sse(error_body(_message(e), e.type or "invalid_request_error", _code(e)))
            yield DONE
        except EngineFailed as e:
            yield await self._broke(e, state)
            yield DONE
        except (asyncio.CancelledError, GeneratorExit):
            state["status"] = 499  # the client went away
            raise
        except Exception as e:  # noqa: BLE001 — a proxy-side failure still ends the stream properly
            state["status"] = 500
            log.error("stream failed in the proxy: %r", e)
            yield sse(error_body(f"internal error while streaming: {e.__class__.__name__}", "server_error", "internal_error"))
            yield DONE
        finally:
            await finish()

    def _events(self, chunk, chat: bool, think: "_Think | None", clock: "_Clock", usage: dict) -> list[bytes]:
        """One engine chunk -> the SSE events the client gets (one per choice, usage on the last)."""
        if not isinstance(chunk, dict):
            return []  # llama-server sends `data: null` between the prompts of a multi-prompt request
        chunk["model"] = self.s.model_id
        chunk.pop("timings", None)  # llama.cpp's own field; usage carries the counts
        if chunk.get("usage"):
            add_usage(usage, chunk["usage"])
        choices = chunk.get("choices")
        if not choices:
            return [sse(chunk)]
        out = []
        for ch in choices:
            text = (ch.get("delta") or {}).get("content") if chat else ch.get("text")
            if text:
                clock.token()
            out += think.rewrite(ch, text) if think else [ch]
        events = []
        for ch in out:
            c = dict(chunk)
            c["choices"] = [ch]
            if ch is not out[-1]:
                c.pop("usage", None)
            events.append(sse(c))
        return events

    async def _broke(self, e: EngineFailed, state: dict) -> bytes:
        """The error event ending a stream the engine broke off."""
        problem = await self._engine_error(e)
        state["status"] = problem.status
        log.warning("engine stream broke: %s", e)
        msg = problem.body["error"]["message"]
        if problem.status == 502 and self.engine.state != "ready":
            msg = "the engine stopped during generation; it is being restarted — retry the request"
        return sse(error_body(msg, problem.body["error"]["type"], problem.body["error"]["code"]))


def _cancelling() -> bool:
    """Whether this task itself is being cancelled (its client left), not only something it awaited."""
    task = asyncio.current_task()
    return bool(task and task.cancelling())


def _message(e: EngineRejected) -> str:
    """The engine's refusal, said about the request: llama-server words a bad response_format schema as "Unable to
    generate parser for this template. Automatic parser generation failed: JSON schema error at #/…: …"."""
    m = e.message or ""
    i = m.find("JSON schema error")
    if i >= 0:
        return f"response_format.json_schema is not a usable JSON schema: {m[i:]}"
    return m


def _code(e: EngineRejected) -> str:
    """A proper OpenAI-style `code` for an engine's refusal (llama-server puts the HTTP status there)."""
    m = (e.message or "").lower()
    if "context" in m and ("exceed" in m or "too long" in m):
        return "context_length_exceeded"
    if "json schema" in m or "json_schema" in m:
        return "invalid_json_schema"
    if "grammar" in m:
        return "invalid_grammar"
    return "invalid_request" if e.status < 500 else "engine_error"


class _Progress:
    """A stream's wait as the client sees it, as SSE comments (OpenAI clients skip them). While the prompt is read:
    `: progress {"stage": "prompt", "processed": N, "total": T, "cached": C, "tokens_per_s": R, "eta_s": E}` from
    the engine's report (llama-server's `prompt_progress`: total, cache, processed, time_ms — tools/server/
    server-task.cpp, result_prompt_progress); before one, or from an engine that reports none,
    `: keepalive {"stage": "prompt", "elapsed_s": S}`. Waiting for a slot: `: queued {"stage": "queued",
    "waited_s": S}`. Once tokens flow, a silence gets a bare `: keepalive`."""

    def __init__(self, prefill_tps: float | None):
        self.prefill_tps = prefill_tps
        self.p: dict | None = None
        self.points: list[tuple[int, float]] = []  # (processed, seconds) of each report with work done

    def update(self, p: dict) -> bool:
        if not isinstance(p, dict) or not isinstance(p.get("total"), int):
            return False
        self.p = p
        self.t = time.monotonic()
        secs = (p.get("time_ms") or 0) / 1000
        if secs > 0 and p.get("processed", 0) > p.get("cache", 0):
            self.points.append((p["processed"], secs))
        return True

    def remaining_s(self, done: int, total: int, cached: int, rate: float | None) -> float | None:
        """Seconds to read the rest. Each token costs more the further in it sits (attention reads the whole
        prefix): seconds(d) = w + a*(d - cached) + b*(d² - cached²)/2, w the first batch's warm-up, fitted by
        least squares to the reports so far (from 3 on); with fewer, or a fit that makes no sense, the rest at
        the rate so far."""
        fit = _fit([(d - cached, (d * d - cached * cached) / 2, t) for d, t in self.points[-64:]]) \
            if len(self.points) >= 3 else None
        if fit and fit[1] >= 0 and fit[2] >= 0:
            _, a, b = fit
            return a * (total - done) + b / 2 * (total * total - done * done)
        return (total - done) / rate if rate else None

    def comment(self, ticket: "_Ticket", answering: bool) -> bytes:
        now = time.perf_counter()
        if not ticket.running:
            return b": queued " + orjson.dumps({"stage": "queued", "waited_s": round(now - ticket.t_admit, 1)}) + b"\n\n"
        if answering:
            return b": keepalive\n\n"
        p = self.p
        if p is None:
            elapsed = round(now - (ticket.t_run or ticket.t_admit), 1)
            return b": keepalive " + orjson.dumps({"stage": "prompt", "elapsed_s": elapsed}) + b"\n\n"
        total, cached, done = p["total"], p.get("cache", 0), p.get("processed", 0)
        secs = (p.get("time_ms") or 0) / 1000
        measured = (done - cached) / secs if secs > 0 and done > cached else None
        rate = measured or self.prefill_tps  # before the engine's first batch: the plan's predicted speed
        # counted down from the engine's last report (it reports once per batch)
        rest = self.remaining_s(done, total, cached, rate)
        eta = rest - (time.monotonic() - self.t) if rest is not None else None
        eta = round(eta, 1) if eta is not None and (eta > 0 or done >= total) else None  # None: overdue
        eta = max(eta, 0.0) + 0.0 if eta is not None else None  # no -0.0
        out = {"stage": "prompt", "processed": done, "total": total, "cached": cached,
               "tokens_per_s": round(measured, 1) if measured else None, "eta_s": eta}
        return b": progress " + orjson.dumps(out) + b"\n\n"


def _fit(rows: list[tuple[float, float, float]]) -> tuple[float, float, float] | None:
    """Least squares t = w + a*x + b*y over rows (x, y, t) -> (w, a, b); None when the rows do not determine it."""
    import numpy as np  # only once a prompt has sent three reports

    r = np.asarray(rows, dtype=float)
    coef, _, rank, _ = np.linalg.lstsq(np.column_stack([np.ones(len(r)), r[:, 0], r[:, 1]]), r[:, 2], rcond=None)
    return (float(coef[0]), float(coef[1]), float(coef[2])) if rank == 3 else None


class _Clock:
    """A stream's first and last token times: its time to first token and decode speed."""

    def __init__(self, metrics: ServerMetrics, t0: float):
        self.metrics = metrics
        self.t0 = t0
        self.t_first: float | None = None
        self.t_last: float | None = None

    def token(self) -> None:
        self.t_last = time.perf_counter()
        if self.t_first is None:
            self.t_first = self.t_last
            self.metrics.ttft.observe(self.t_first - self.t0)

    def done(self, completion_tokens: int) -> None:
        self.metrics.e2e.observe(time.perf_counter() - self.t0)
        t_first, t_last = self.t_first, self.t_last
        if t_first is not None and t_last is not None and completion_tokens > 1 and t_last > t_first:
            self.metrics.decode.observe((completion_tokens - 1) / (t_last - t_first))


class _Think:
    """A chat stream's reasoning, per choice: split into reasoning_content and content (`split`), or the raw text
    with the <think> the template opened in the prompt given back to the client."""

    def __init__(self, split: bool, starts_in_think: bool, reasoning: str = "think"):
        self.split = split
        self.splitter = SPLITTERS[reasoning]
        self.starts_in_think = starts_in_think
        self.splitters: dict = {}
        self.raw_open: set[int] = set()  # choices that already got the "<think>\n" prefix (raw format)

    def rewrite(self, ch: dict, text: str | None) -> list[dict]:
        idx = ch.get("index", 0)
        delta = ch.get("delta") or {}
        if not self.split:
            if text and self.starts_in_think and idx not in self.raw_open:
                delta["content"] = "<think>\n" + text
                self.raw_open.add(idx)
            return [ch]
        sp = self.splitters.setdefault(idx, self.splitter(self.starts_in_think))
        parts = sp.feed(text) if text else ("", "")
        if ch.get("finish_reason"):
            fr, fc = sp.flush()
            parts = (parts[0] + fr, parts[1] + fc)
        out = []
        if parts[0]:
            out.append(_choice(ch, {"reasoning_content": parts[0]}, None))
        if parts[1]:
            out.append(_choice(ch, {"content": parts[1]}, None))
        if ch.get("finish_reason") or (not text and "role" in delta):
            out.append(_choice(ch, {k: v for k, v in delta.items() if k != "content"}, ch.get("finish_reason")))
        return out


def _choice(ch: dict, delta: dict, finish_reason) -> dict:
    out = dict(ch)
    out["delta"] = delta
    out["finish_reason"] = finish_reason
    return out
