"""`serve` for the KTransformers family: the shared supervised-server runner (llamacpp.Supervisor: start the
planned argv, stream its log, restart on crash, stop with hybridinfer) with what differs in its HTTP server.

The legacy server's quirks, from ktransformers/server/api/openai/endpoints/chat.py, schemas/endpoints/chat.py,
schemas/assistants/streaming.py and api/openai/legacy/completions.py at each tag (kt_versions.VERSIONS says which):
- no /health: it listens only once the model is loaded, so `GET /v1/models` answering 200 means ready;
- /v1/models is `[{"id": "0", ...}]` (v0.2.0-0.2.1), a bare list (v0.2.2), OpenAI's list (v0.2.3+);
- SSE lines are `data:{json}` without the space (v0.2.0-0.2.1) and end with `event: done` + `data: [DONE]`;
- no usage in the stream before v0.2.3post1 and a constant 1/1/2 in non-stream answers of v0.2.2-0.2.3;
  chunks carry no finish_reason before v0.2.3post1;
- sampling: only temperature/top_p (v0.2.2+); max_tokens only from v0.3 — earlier, generation runs to
  --max_new_tokens, so the runner stops reading at max_tokens and closes the stream (its check_client_link
  stops generating when the client goes away);
- /v1/completions streams chat-style `delta.content` chunks.
SGLang (kt-sglang) is OpenAI-shaped with /health; the same code passes its chunks through.
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import sys
import time

import anyio
import httpx
import orjson

from ..errors import HybridError
from .base import EngineFailed, EngineRejected
from .supervisor import Supervisor, free_port, rejected, sse_payloads

RUNTIME_FLAGS = {"--host": True, "--port": True, "--model_name": True, "--served-model-name": True}


def strip_runtime(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        if argv[i] in RUNTIME_FLAGS:
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


class Dialect:
    """What the runner must know of one server's HTTP API (from plan.compiled["api"])."""

    def __init__(self, api: dict, sglang: bool = False):
        self.sglang = sglang
        self.fields = set(api.get("fields") or ())  # request fields it reads (empty: pass everything)
        self.stream_usage = api.get("stream_usage", True)
        self.usage = api.get("usage", "real")
        self.honours_max_tokens = sglang or "max_tokens" in self.fields
        self.ready_path = "/health" if sglang else "/v1/models"

    def request(self, path: str, body: dict) -> dict:
        out = dict(body)
        if self.fields:
            keep = self.fields | ({"prompt"} if path.endswith("/completions") and "chat" not in path else set())
            out = {k: v for k, v in out.items() if k in keep}
        if not self.sglang and "messages" in out:  # its Message.content is a plain string
            out["messages"] = [{**m, "content": _text(m.get("content"))} for m in out["messages"]]
        return out


def _text(content) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


class KtServer(Supervisor):
    """The KTransformers server (or SGLang) as a supervised child on a private loopback port."""

    def __init__(self, engine, plan, settings, restart: bool = True, sglang: bool = False):
        self.engine = engine
        self.plan = plan
        self.settings = settings
        argv0 = plan.command[0]
        self.binary = sys.executable if argv0 in ("python", "python3") else argv0 if os.sep in argv0 else (
            shutil.which(argv0, path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")))
        if not self.binary or not os.access(self.binary, os.X_OK):
            raise HybridError(f"{argv0} not found (engine {engine.name})", engine.install_hint)
        self.label = os.path.basename(self.binary)
        self.port = free_port()
        self.sock = None
        self.log_file = settings.log_file
        self.restart = restart
        self.on_line = settings.on_line
        self.state = "starting"
        self.proc = None
        self.tail = collections.deque(maxlen=200)
        self.restarts = 0
        self.started_at = 0.0
        self.ready_at = 0.0
        self._tasks = []
        self._stopping = False
        self._ready = asyncio.Event()
        self._client = None
        self.request_timeout = settings.request_timeout
        self.max_connections = settings.max_connections
        self.dialect = Dialect((plan.compiled or {}).get("api", {}), sglang=sglang)
        self.model_dir = (plan.compiled or {}).get("model_dir")
        self._tokenizer = None

    def command(self) -> list[str]:
        """plan.command as planned; only the endpoint and the served model name differ."""
        name_flag = "--served-model-name" if self.dialect.sglang else "--model_name"
        argv = strip_runtime(self.plan.command) + ["--host", "127.0.0.1", "--port", str(self.port),
                                                  name_flag, self.settings.model_id]
        return [self.binary] + argv[1:]

    def _transport(self, max_connections: int = 10) -> httpx.AsyncHTTPTransport:
        return httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=max_connections))

    async def _wait_healthy(self, proc) -> None:
        async with httpx.AsyncClient(timeout=2.0, transport=self._transport()) as c:
            while proc.returncode is None:
                try:
                    r = await c.get(self.base_url + self.dialect.ready_path)
                    if r.status_code == 200:
                        self.state = "ready"
                        self.ready_at = time.monotonic()
                        self._ready.set()
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)

    # --- requests -----------------------------------------------------------------------------------------
    async def complete(self, path: str, body: dict) -> dict:
        if not self.dialect.honours_max_tokens and body.get("max_tokens"):
            # It would generate to --max_new_tokens: stream instead and stop at max_tokens.
            return await self._collect(path, body)
        try:
            r = await self._client.post(self.base_url + path, json=self.dialect.request(path, body))
        except httpx.HTTPError as e:
            raise EngineFailed(e.__class__.__name__) from None
        if r.status_code >= 400:
            raise rejected(r)
        data = r.json()
        data["object"] = "text_completion" if path == "/v1/completions" else "chat.completion"
        if self.dialect.usage != "real" or not data.get("usage"):
            text = "".join((c.get("message") or {}).get("content") or c.get("text") or "" for c in data.get("choices", []))
            data["usage"] = await self._usage(body, len(await self._count(text)))
        for ch in data.get("choices", []):
            ch.setdefault("finish_reason", None)
            if ch["finish_reason"] is None:
                ch["finish_reason"] = "stop"
        return data

    async def _collect(self, path: str, body: dict) -> dict:
        chat = path == "/v1/chat/completions"
        text, finish, usage = [], "stop", None
        async for chunk in self.stream(path, body):
            if chunk.get("usage"):
                usage = chunk["usage"]
            for ch in chunk.get("choices", []):
                text.append((ch.get("delta") or {}).get("content") or ch.get("text") or "")
                finish = ch.get("finish_reason") or finish
        content = "".join(text)
        choice = {"index": 0, "finish_reason": finish}
        choice.update({"message": {"role": "assistant", "content": content}} if chat else {"text": content})
        return {"id": "kt-" + str(int(time.time() * 1000)), "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": body.get("model", ""), "choices": [choice], "usage": usage}

    async def stream(self, path: str, body: dict):
        chat = path == "/v1/chat/completions"
        limit = body.get("max_tokens")
        req = self.dialect.request(path, {**body, "stream": True})
        r = None
        n = 0
        usage = None
        finished = False
        try:
            r = await self._client.send(self._client.build_request("POST", self.base_url + path, json=req), stream=True)
            if r.status_code >= 400:
                await r.aread()
                raise rejected(r)
            async for payload in sse_payloads(r.aiter_lines()):
                if payload == "[DONE]":
                    break
                try:
                    chunk = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    raise EngineFailed(f"unreadable stream event from the engine: {payload[:80]!r}") from None
                if "error" in chunk:
                    e = chunk["error"]
                    raise EngineRejected(500, e.get("message") or str(e), e.get("type"))
                if chunk.get("usage"):
                    usage = chunk["usage"]
                choices = chunk.get("choices") or []
                if not choices:
                    continue  # its usage chunk: sent once, at the end, below
                out = []
                for ch in choices:
                    delta = dict(ch.get("delta") or {})
                    piece = delta.get("content") if delta else ch.get("text")
                    if piece:
                        n += 1  # it yields one token per chunk
                    if not chat:  # its /v1/completions streams chat-style deltas
                        ch = {"index": ch.get("index", 0), "text": piece or "", "finish_reason": ch.get("finish_reason")}
                    else:
                        if n > 1:
                            delta.pop("role", None)  # v0.2.0-0.2.1 repeat role on every chunk
                        ch = {**ch, "delta": delta}
                    if ch.get("finish_reason") == "":
                        ch["finish_reason"] = None
                    if ch.get("finish_reason"):
                        finished = True
                    out.append(ch)
                chunk = {**chunk, "object": "chat.completion.chunk" if chat else "text_completion", "choices": out}
                chunk.pop("usage", None)
                yield chunk
                if limit and n >= limit and not self.dialect.honours_max_tokens:
                    yield _finish_chunk(chunk, chat, "length")
                    finished = True
                    break
            if not finished:
                yield _finish_chunk({"id": "", "created": int(time.time())}, chat, "stop")
            if not usage or self.dialect.usage != "real":
                usage = await self._usage(body, n)
            yield {"id": "", "object": "chat.completion.chunk" if chat else "text_completion",
                   "created": int(time.time()), "model": body.get("model", ""), "choices": [], "usage": usage}
        except httpx.HTTPError as e:
            raise EngineFailed(e.__class__.__name__) from None
        finally:
            if r is not None:
                with anyio.CancelScope(shield=True):  # closing the socket is what stops its generation
                    await r.aclose()

    # --- token counts (it reports none before v0.2.3post1) ---------------------------------------------
    async def _usage(self, body: dict, completion: int) -> dict:
        prompt = body.get("prompt")
        if prompt is None:
            prompt = "\n".join(_text(m.get("content")) for m in body.get("messages", []))
        p = len(await self._count(prompt if isinstance(prompt, str) else str(prompt)))
        return {"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion}

    async def _count(self, text: str) -> list[int]:
        try:
            return await self.tokenize(text)
        except EngineRejected:
            return [0] * max(1, len(text) // 4) if text else []  # no tokenizer here: ~4 characters per token

    async def tokenize(self, text: str) -> list[int]:
        """With the model folder's tokenizer.json (the `tokenizers` package, when installed): it has no endpoint."""
        if self._tokenizer is None:
            try:
                from tokenizers import Tokenizer

                self._tokenizer = Tokenizer.from_file(os.path.join(self.model_dir or "", "tokenizer.json"))
            except Exception:
                raise EngineRejected(501, "the KTransformers server has no tokenizer endpoint") from None
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    async def metrics_text(self) -> str:
        return ""  # its server exports none (balance_serve's scheduler metrics are on private ports)


def _finish_chunk(prev: dict, chat: bool, reason: str) -> dict:
    ch = {"index": 0, "delta": {}, "finish_reason": reason} if chat else {"index": 0, "text": "", "finish_reason": reason}
    return {"id": prev.get("id", ""), "object": "chat.completion.chunk" if chat else "text_completion",
            "created": prev.get("created", int(time.time())), "model": prev.get("model", ""), "choices": [ch]}
