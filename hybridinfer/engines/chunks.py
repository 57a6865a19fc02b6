"""OpenAI stream chunks: the one usage accumulator and the assembly of a streamed answer into a non-streamed one.
Engines assemble with it (an answer read as a stream) and the server counts tokens with it (what it relayed)."""

from __future__ import annotations

CHAT = "/v1/chat/completions"


def add_usage(acc: dict, u: dict) -> dict:
    """Add one chunk's `usage` to `acc`: a multi-prompt request reports one usage per prompt, the answer their sum."""
    for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
        acc[k] = acc.get(k, 0) + (u.get(k) or 0)
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is not None:
        d = acc.setdefault("prompt_tokens_details", {"cached_tokens": 0})
        d["cached_tokens"] += cached
    return acc


def assemble(path: str, chunks: list[dict]) -> dict:
    """Streamed chunks -> the non-streamed OpenAI answer (choices by index; content, reasoning, tool calls and
    logprobs joined; usage summed over the prompts of a multi-prompt request; the engine's timings kept)."""
    chat = path.endswith("chat/completions")
    out: dict = {"object": "chat.completion" if chat else "text_completion"}
    choices: dict[int, dict] = {}
    usage: dict = {}
    for ch in chunks:
        for k in ("id", "created", "model", "system_fingerprint"):
            if k in ch and k not in out:
                out[k] = ch[k]
        if ch.get("timings"):
            out["timings"] = ch["timings"]
        if ch.get("usage"):
            add_usage(usage, ch["usage"])
        for c in ch.get("choices") or []:
            i = c.get("index", 0)
            acc = choices.setdefault(i, {"index": i, "finish_reason": None, "logprobs": None})
            _add_choice(acc, c, chat)
    out["choices"] = [choices[i] for i in sorted(choices)]
    out["usage"] = usage
    return out


def _add_choice(acc: dict, c: dict, chat: bool) -> None:
    if c.get("finish_reason"):
        acc["finish_reason"] = c["finish_reason"]
    lp = c.get("logprobs")
    if isinstance(lp, dict) and isinstance(lp.get("content"), list):
        acc["logprobs"] = acc["logprobs"] or {"content": []}
        acc["logprobs"]["content"] += lp["content"]
    if not chat:
        acc["text"] = acc.get("text", "") + (c.get("text") or "")
        return
    msg = acc.setdefault("message", {"role": "assistant", "content": None})
    delta = c.get("delta") or {}
    for k in ("content", "reasoning_content"):
        if delta.get(k):
            msg[k] = (msg.get(k) or "") + delta[k]
    for tc in delta.get("tool_calls") or []:
        calls = msg.setdefault("tool_calls", [])
        j = tc.get("index", len(calls))
        while len(calls) <= j:
            calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        call = calls[j]
        if tc.get("id"):
            call["id"] = tc["id"]
        fn = tc.get("function") or {}
        call["function"]["name"] += fn.get("name") or ""
        call["function"]["arguments"] += fn.get("arguments") or ""
