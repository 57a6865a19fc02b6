"""The served-engine runner's parts without an engine: the Running contract, the KTransformers dialect's stream
rewriting (fed recorded-shape events) and the one usage accumulator."""

import asyncio
import sys
from types import SimpleNamespace

import pytest

from hybridinfer import engines
from hybridinfer.engines.base import Running, RunSettings
from hybridinfer.engines.chunks import add_usage, assemble
from hybridinfer.engines.kt_server import KtDialect
from hybridinfer.engines.runner import ServerRunner
from hybridinfer.engines.binaries import find_llama_binary

CHAT = "/v1/chat/completions"


def _plan(argv0, api=None):
    return SimpleNamespace(command=[argv0, "--model", "m"], rpc_servers=[], compiled={"api": api or {}, "model_dir": None})


def test_every_served_runner_is_a_running():
    kt = engines.get("ktransformers")
    r = ServerRunner(KtDialect(kt, _plan("python")), _plan("python"), RunSettings(model_id="r1"))
    assert isinstance(r, Running) and r.notes == () and r.state == "starting"
    assert r.command()[0] == sys.executable and r.command()[-2:] == ["--model_name", "r1"]
    e = engines.get(engines.DEFAULT)
    binary = find_llama_binary(e.server_binary)
    if binary:
        r = e.runner(_plan(binary), RunSettings(model_id="tiny"))
        try:
            assert isinstance(r, Running) and "--alias" in r.command() and r.address in r.command()
        finally:
            asyncio.run(r.stop())


async def _events(chunks):
    for c in chunks:
        yield c


def _read(dialect, path, body, chunks):
    async def main():
        return [c async for c in dialect.chunks(None, path, body, _events(chunks))]
    return asyncio.run(main())


def test_legacy_kt_stream_is_cut_at_max_tokens_and_counted():
    """v0.2.1: role on every chunk, no finish reason, no usage, max_tokens ignored."""
    d = KtDialect(engines.get("ktransformers"), _plan("python", {"fields": ["messages", "temperature"], "usage": "none"}))
    ev = [{"id": "a", "choices": [{"index": 0, "delta": {"role": "assistant", "content": w}, "finish_reason": ""}]}
          for w in ("one", " two", " three")]
    out = _read(d, CHAT, {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 2}, ev)
    assert [c["choices"][0]["delta"] for c in out[:2]] == [{"role": "assistant", "content": "one"}, {"content": " two"}]
    assert out[2]["choices"][0]["finish_reason"] == "length"
    assert out[-1]["choices"] == [] and out[-1]["usage"]["completion_tokens"] == 2
    answer = assemble(CHAT, out)
    assert answer["choices"][0]["message"]["content"] == "one two" and answer["choices"][0]["finish_reason"] == "length"


def test_kt_completions_stream_text_and_its_own_usage():
    d = KtDialect(engines.get("kt-sglang"), _plan("python"), sglang=True)
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    ev = [{"id": "b", "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}]},
          {"id": "b", "choices": [], "usage": usage}]
    out = _read(d, "/v1/completions", {"prompt": "p"}, ev)
    assert out[0]["choices"] == [{"index": 0, "text": "x", "finish_reason": "stop"}]
    assert out[-1]["usage"] == usage and len(out) == 2


@pytest.mark.parametrize("cached", [None, 0, 5])
def test_usage_summed_over_prompts(cached):
    u = {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    if cached is not None:
        u["prompt_tokens_details"] = {"cached_tokens": cached}
    acc = add_usage(add_usage({}, u), u)
    assert acc["total_tokens"] == 10 and acc.get("prompt_tokens_details", {}).get("cached_tokens") == (
        None if cached is None else 2 * cached)
