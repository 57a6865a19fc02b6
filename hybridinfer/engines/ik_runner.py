"""ik_llama.cpp's server dialect: llama-server's (engines/dialect.py) plus what its chat endpoint reports differently.

ik_llama.cpp's OpenAI chat responses say finish_reason "stop" whenever generation stopped, a max_tokens cut
included (examples/server/server-task.cpp, to_json_oaicompat_chat_final/_stream test `if (stop)`, where mainline
tells STOP_TYPE_LIMIT apart). Clients read "length" to know an answer (or a thought) was cut off, so a chat
completion that used all of max_tokens is reported as "length" (an end-of-sequence on exactly the last allowed
token reads as a cut too).
"""

from __future__ import annotations

from .dialect import Dialect

NOTE = ("its chat endpoint reports finish_reason \"stop\" for a max_tokens cut: hybridinfer reports \"length\" when "
        "a completion used all of max_tokens")


def _limit(body: dict) -> int | None:
    v = body.get("max_tokens", body.get("max_completion_tokens", body.get("n_predict")))
    return v if isinstance(v, int) and v > 0 else None


def _fix(obj: dict, limit: int | None, usage: dict | None) -> None:
    if limit and usage and usage.get("completion_tokens", 0) >= limit:
        for c in obj.get("choices", []):
            if c.get("finish_reason") == "stop":
                c["finish_reason"] = "length"


def _cached(usage: dict | None, timings: dict) -> None:
    """ik's usage has no prompt_tokens_details; its timings say how many prompt tokens it computed (prompt_n), the
    rest it reused from the slot's cache (a warm or restored prefix)."""
    if usage and "prompt_tokens_details" not in usage and isinstance(timings.get("prompt_n"), int) \
            and usage.get("prompt_tokens") is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": max(0, usage["prompt_tokens"] - timings["prompt_n"])}


class IkDialect(Dialect):
    # ik_llama.cpp's server sends no prefill progress (examples/server/server-task.cpp has it commented out, in
    # ik_llama-cpp-python 0.1.5's tree): serve's keepalive comments carry the plan's estimate instead.
    progress_field = None

    def notes(self, label: str, sock: str | None, port: int) -> tuple[str, ...]:
        return super().notes(label, sock, port) + (NOTE,)

    async def complete(self, client, path: str, body: dict) -> dict:
        out = await super().complete(client, path, body)
        if path.endswith("chat/completions"):
            _fix(out, _limit(body), out.get("usage"))
        return out

    async def chunks(self, client, path: str, body: dict, events):
        limit = _limit(body) if path.endswith("chat/completions") else None
        held = None  # the finishing chunk, until the usage that tells a cut from a stop arrives
        timings: dict = {}
        async for chunk in events:
            timings = chunk.get("timings") or timings
            _cached(chunk.get("usage"), timings)
            if chunk.get("usage") and any(not c.get("finish_reason") for c in chunk.get("choices") or []):
                # ik repeats the running usage on every chunk; OpenAI (and our assembler, which sums the usage of
                # each prompt of a multi-prompt request) expects it once, at the end
                chunk = {k: v for k, v in chunk.items() if k != "usage"}
            if held is not None:
                _fix(held, limit, chunk.get("usage"))
                yield held
                held = None
            finishing = any(c.get("finish_reason") == "stop" for c in chunk.get("choices", []))
            if limit and finishing and not chunk.get("usage"):
                held = chunk
                continue
            _fix(chunk, limit, chunk.get("usage"))
            yield chunk
        if held is not None:
            yield held
