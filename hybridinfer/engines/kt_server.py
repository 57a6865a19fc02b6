"""`serve` for the KTransformers family: the dialect the shared supervised-server runner (engines/runner.py: start
the planned argv, stream its log, restart on crash, stop with hybridinfer) speaks to its HTTP server.

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
SGLang (kt-sglang) is OpenAI-shaped with /health; the same dialect passes its chunks through.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass

import httpx
import orjson

from .base import EngineFailed, EngineRejected, RunSettings
from .chunks import CHAT, assemble
from .dialect import Dialect, strip_flags

RUNTIME_FLAGS = {"--host": True, "--port": True, "--model_name": True, "--served-model-name": True}


class KtDialect(Dialect):
    """The KTransformers server's API (or SGLang's, `sglang`), from plan.compiled["api"]."""

    progress_field = None  # no prefill progress in KTransformers' / SGLang's OpenAI streams
    busy_metric = None

    metrics_path = None  # its server exports none (balance_serve's scheduler metrics are on private ports)
    ready_poll_s = 0.2

    def __init__(self, engine, plan, sglang: bool = False):
        super().__init__(engine)
        api = (plan.compiled or {}).get("api", {})
        self.sglang = sglang
        self.fields = set(api.get("fields") or ())  # request fields it reads (empty: pass everything)
        self.stream_usage = api.get("stream_usage", True)
        self.usage = api.get("usage", "real")
        self.honours_max_tokens = sglang or "max_tokens" in self.fields
        # no /health in the legacy server: it listens only once the model is loaded
        self.ready_path = "/health" if sglang else "/v1/models"
        self.model_dir = (plan.compiled or {}).get("model_dir")
        self._tokenizer = None

    # --- launch ---------------------------------------------------------------------------------------------
    def binary(self, argv0: str) -> str | None:
        if argv0 in ("python", "python3"):
            return sys.executable
        return argv0 if os.sep in argv0 else shutil.which(
            argv0, path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))

    def unix_socket(self, binary: str) -> bool:
        return False

    def argv(self, command: list[str], host: str, port: int, settings: RunSettings) -> list[str]:
        """plan.command as planned; only the endpoint and the served model name differ."""
        name_flag = "--served-model-name" if self.sglang else "--model_name"
        return strip_flags(command, RUNTIME_FLAGS) + ["--host", host, "--port", str(port), name_flag, settings.model_id]

    def notes(self, label: str, sock: str | None, port: int) -> tuple[str, ...]:
        return ()

    def transport(self, sock: str | None, max_connections: int = 10) -> httpx.AsyncHTTPTransport:
        return httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=max_connections))

    # --- requests -------------------------------------------------------------------------------------------
    def request(self, path: str, body: dict) -> dict:
        out = dict(body)
        if self.fields:
            keep = self.fields | ({"prompt"} if path.endswith("/completions") and "chat" not in path else set())
            out = {k: v for k, v in out.items() if k in keep}
        if not self.sglang and "messages" in out:  # its Message.content is a plain string
            out["messages"] = [{**m, "content": _text(m.get("content"))} for m in out["messages"]]
        return out

    def stream_request(self, path: str, body: dict) -> dict:
        return self.request(path, {**body, "stream": True})

    async def complete(self, client, path: str, body: dict) -> dict:
        if not self.honours_max_tokens and body.get("max_tokens"):
            # It would generate to --max_new_tokens: stream instead and stop at max_tokens.
            return assemble(path, [c async for c in client.stream(path, body)])
        data = await client.post(path, self.request(path, body))
        data["object"] = "text_completion" if path == "/v1/completions" else "chat.completion"
        if self.usage != "real" or not data.get("usage"):
            text = "".join((c.get("message") or {}).get("content") or c.get("text") or "" for c in data.get("choices", []))
            data["usage"] = await self._usage(body, len(await self._count(text)))
        for ch in data.get("choices", []):
            ch.setdefault("finish_reason", None)
            if ch["finish_reason"] is None:
                ch["finish_reason"] = "stop"
        return data

    # --- its stream -> OpenAI chunks ------------------------------------------------------------------------
    def event(self, payload: str):
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise EngineFailed(f"unreadable stream event from the engine: {payload[:80]!r}") from None

    def error_event(self, e: dict) -> EngineRejected:
        return EngineRejected(500, e.get("message") or str(e), e.get("type"))

    async def chunks(self, client, path: str, body: dict, events):
        """Its chunks in OpenAI's form, a finish reason on the last, then one usage chunk (its own, or counted)."""
        chat = path == CHAT
        limit = body.get("max_tokens") if not self.honours_max_tokens else None
        st = _Read(chat)
        async for chunk in events:
            if chunk.get("usage"):
                st.usage = chunk["usage"]
            choices = chunk.get("choices") or []
            if not choices:
                continue  # its usage chunk: sent once, at the end, below
            chunk = {**chunk, "object": _object(chat), "choices": [st.choice(ch) for ch in choices]}
            chunk.pop("usage", None)
            yield chunk
            if limit and st.n >= limit:  # it would go on to --max_new_tokens: hang up (stops its generation)
                yield _finish_chunk(chunk, chat, "length")
                st.finished = True
                break
        if not st.finished:
            yield _finish_chunk({"id": "", "created": int(time.time())}, chat, "stop")
        usage = st.usage if st.usage and self.usage == "real" else await self._usage(body, st.n)
        yield {"id": "", "object": _object(chat), "created": int(time.time()), "model": body.get("model", ""),
               "choices": [], "usage": usage}

    # --- token counts (it reports none before v0.2.3post1) ---------------------------------------------
    async def _usage(self, body: dict, completion: int) -> dict:
        prompt = body.get("prompt")
        if prompt is None:
            prompt = "\n".join(_text(m.get("content")) for m in body.get("messages", []))
        p = len(await self._count(prompt if isinstance(prompt, str) else str(prompt)))
        return {"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion}

    async def _count(self, text: str) -> list[int]:
        try:
            return self._encode(text)
        except EngineRejected:
            return [0] * max(1, len(text) // 4) if text else []  # no tokenizer here: ~4 characters per token

    async def tokenize(self, client, text: str) -> list[int]:
        return self._encode(text)

    def _encode(self, text: str) -> list[int]:
        """With the model folder's tokenizer.json (the `tokenizers` package, when installed): it has no endpoint."""
        if self._tokenizer is None:
            try:
                from tokenizers import Tokenizer

                self._tokenizer = Tokenizer.from_file(os.path.join(self.model_dir or "", "tokenizer.json"))
            except Exception:
                raise EngineRejected(501, "the KTransformers server has no tokenizer endpoint") from None
        return self._tokenizer.encode(text, add_special_tokens=False).ids


@dataclass
class _Read:
    """What reading one stream has seen: tokens so far (it yields one per chunk), its usage, a finish reason."""
    chat: bool
    n: int = 0
    usage: dict | None = None
    finished: bool = False

    def choice(self, ch: dict) -> dict:
        delta = dict(ch.get("delta") or {})
        piece = delta.get("content") if delta else ch.get("text")
        if piece:
            self.n += 1
        if not self.chat:  # its /v1/completions streams chat-style deltas
            ch = {"index": ch.get("index", 0), "text": piece or "", "finish_reason": ch.get("finish_reason")}
        else:
            if self.n > 1:
                delta.pop("role", None)  # v0.2.0-0.2.1 repeat role on every chunk
            ch = {**ch, "delta": delta}
        if ch.get("finish_reason") == "":
            ch["finish_reason"] = None
        if ch.get("finish_reason"):
            self.finished = True
        return ch


def _object(chat: bool) -> str:
    return "chat.completion.chunk" if chat else "text_completion"


def _text(content) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def _finish_chunk(prev: dict, chat: bool, reason: str) -> dict:
    ch = {"index": 0, "delta": {}, "finish_reason": reason} if chat else {"index": 0, "text": "", "finish_reason": reason}
    return {"id": prev.get("id", ""), "object": _object(chat),
            "created": prev.get("created", int(time.time())), "model": prev.get("model", ""), "choices": [ch]}
