"""The serve layer's pieces that need no engine: strict request models, the metrics table, plan's prompt cache,
one-line CLI errors, stale socket directories, the engine's load-error line, the OpenAPI description."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from conftest import run_cli
from hybridinfer import metrics
from hybridinfer.server.protocol import ChatCompletionRequest, CompletionRequest

MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("extra,fragment", [
    ({"max_tokens": True}, "valid integer"),
    ({"stream": "yes"}, "valid boolean"),
    ({"temperature": float("nan")}, "finite number"),
    ({"temperature": "0.5"}, "valid number"),
    ({"n": 5}, "less than or equal to 1"),
    ({"tools": "abc"}, "valid array"),
    ({"tools": [{"type": "function"}]}, "function"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "'image_url' content parts are not supported"),
])
def test_requests_are_strict(extra, fragment):
    body = json.dumps({"messages": MSG, **extra}, allow_nan=True)
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate_json(body)
    assert fragment in str(e.value)


def test_valid_requests_still_pass():
    r = ChatCompletionRequest.model_validate_json(json.dumps({
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}], "temperature": 0, "max_tokens": 3,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "top_k": 3, "ignore_eos": True, "whatever_engine_field": 1}))
    assert r.temperature == 0.0 and r.model_extra == {"whatever_engine_field": 1}
    assert CompletionRequest.model_validate_json('{"prompt": ["a", "b"], "stream": true}').stream


def test_one_metrics_table_shared_by_server_bench_and_plan():
    from hybridinfer.bench.load import Level, Sample
    from hybridinfer.predict import Prediction

    names = [m.name for m in metrics.TABLE]
    assert len(names) == len(set(names)) and all(m.unit and m.meaning for m in metrics.TABLE)
    # plan's predictions and bench's JSON use the table's names for decode and prefill speed
    fields = {f.name for f in dataclasses.fields(Prediction)}
    assert {metrics.DECODE_TPS, metrics.PREFILL_TPS} <= fields
    lv = Level(1, float("inf"), 1.0, [Sample(0, True, 0.0, output_tokens=11, ttft_s=0.1, e2e_s=1.1)]).summary()
    assert lv[f"median_{metrics.DECODE_TPS}"] == pytest.approx(10.0)
    # the server exposes each under hybridinfer_<name>
    m = metrics.ServerMetrics(lambda: ("ready", 0, 1, 2))
    m.decode.observe(10)
    m.ttft.observe(0.2)
    m.request_done("chat", 200, {"prompt_tokens": 5, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4}})
    text = m.render().decode()
    for name in (metrics.DECODE_TPS, metrics.TTFT, metrics.E2E, "queue_wait_s"):
        assert f"{metrics.prom(name)}_bucket" in text
    for line in ("hybridinfer_requests_total{endpoint=\"chat\",status=\"200\"} 1.0", "hybridinfer_engine_up 1.0",
                 "hybridinfer_requests_queued 2.0", "hybridinfer_cached_prompt_tokens_total 4.0"):
        assert line in text


def test_plan_counts_the_prompt_cache(models):
    from hybridinfer.plan import PlanOptions, make_plan
    from hybridinfer.probe import load_profile

    hw = load_profile("desktop-4090")
    model = next(m for m in models.values() if m.is_moe)
    p = make_plan(hw, model, PlanOptions(engine="llama.cpp"))
    cpu = p.devices[0]
    assert 0 < cpu.prompt_cache <= 8 * 2**30 and p.compiled["cache_ram_mib"] == cpu.prompt_cache // 2**20
    assert cpu.total >= cpu.weights + cpu.kv_cache + cpu.compute + cpu.runtime + cpu.prompt_cache
    assert [r.figure for r in p.reasons if r.topic == "prompt-cache"] == [cpu.prompt_cache // 2**20]
    q = make_plan(hw, model, PlanOptions(engine="llama.cpp", cache_ram_mib=0))
    assert q.devices[0].prompt_cache == 0 and q.devices[0].total == cpu.total - cpu.prompt_cache
    cmd = q.command  # the engine's argv, fixed at plan time
    assert cmd[cmd.index("--cache-ram") + 1] == "0"


@pytest.mark.parametrize("args,fragment", [
    (["--queue", "-1"], "--queue -1 is negative"),
    (["--port", "70000"], "--port 70000 is not a TCP port"),
    (["--max-body-mb", "0"], "--max-body-mb 0"),
    (["--cache-ram", "-5"], "--cache-ram -5 is negative"),
])
def test_serve_bad_options_are_one_line(args, fragment):
    r = run_cli("serve", *args, timeout=60)
    assert r.returncode == 2 and fragment in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_stale_socket_dirs_are_cleaned(tmp_path):
    from hybridinfer.engines.sockdir import clean_stale_sockdirs

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "hybridinfer-stale"
    stale.mkdir()
    (stale / "owner.pid").write_text(str(dead.pid))
    live = tmp_path / "hybridinfer-live"
    live.mkdir()
    (live / "owner.pid").write_text(str(os.getpid()))
    other = tmp_path / "someone-else"
    other.mkdir()
    assert clean_stale_sockdirs(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists() and other.exists()


def test_engine_load_error_line():
    from hybridinfer.engines.supervisor import load_error

    tail = ["llama_model_loader: - type q8_0: 30 tensors",
            "llama_model_load: error loading model: error loading model vocabulary: unknown pre-tokenizer type: 'deepseek-v9'",
            "llama_model_load_from_file_impl: failed to load model", "main: exiting due to model loading error", ""]
    assert load_error(tail).endswith("unknown pre-tokenizer type: 'deepseek-v9'")


def test_openapi_declares_bodies_and_answers():
    from hybridinfer.server.app import create_app
    from hybridinfer.server.serving import Settings

    schema = create_app(Settings(model_id="m", ctx_per_slot=4096, parallel=1), engine=None, api_key="k").openapi()
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert "messages" in body["required"] and body["properties"]["max_tokens"]
    assert set(chat["responses"]) >= {"200", "400", "401", "413", "429", "503", "504"}
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert schema["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema["security"] == [{"bearer": []}]


def test_proxy_side_failure_mid_stream_ends_with_error_event_and_done():
    """A chunk the proxy cannot handle (here: `choices` that is not a list — a stand-in for an engine answer no
    real engine gives on demand) becomes an error event and [DONE], never a dropped connection."""
    import asyncio

    from hybridinfer.server.protocol import CompletionRequest
    from hybridinfer.server.serving import Serving, Settings, Stream

    class Malformed:
        state, restarts = "ready", 0

        async def stream(self, path, body):
            yield {"id": "x", "choices": [{"index": 0, "text": "ok", "finish_reason": None}]}
            yield {"id": "x", "choices": 5}

    async def main():
        s = Serving(Settings(model_id="m", ctx_per_slot=512, parallel=1, queue=0), Malformed())
        out = await s.completions(CompletionRequest(prompt="a", stream=True))
        assert isinstance(out, Stream)
        chunks = [c async for c in out]
        await out.aclose()
        return s, chunks

    s, chunks = asyncio.run(main())
    assert b'"text":"ok"' in chunks[0]
    assert b'"error"' in chunks[-2] and b"internal error while streaming" in chunks[-2]
    assert chunks[-1] == b"data: [DONE]\n\n"
    assert s.admitted == 0 and s.running == 0  # the slot came back
    assert 'status="500"' in s.metrics.render().decode()


def test_silent_prefill_gets_keepalive_comments_and_a_late_refusal_an_error_event():
    """A stand-in engine that reads its prompt silently (as ik_llama.cpp does: no progress) for longer than the
    keepalive time, then answers — or refuses. The client has its 200 and comments meanwhile."""
    import asyncio

    from hybridinfer.engines.base import EngineRejected
    from hybridinfer.server.protocol import CompletionRequest
    from hybridinfer.server.serving import Serving, Settings, Stream

    class Slow:
        state, restarts = "ready", 0

        def __init__(self, refuse):
            self.refuse = refuse

        async def stream(self, path, body):
            await asyncio.sleep(0.7)
            if self.refuse:
                raise EngineRejected(400, "Unable to generate parser for this template. Automatic parser generation "
                                          "failed: JSON schema error at #/a: unrecognized type x")
            yield {"id": "x", "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}]}

    async def main(refuse):
        s = Serving(Settings(model_id="m", ctx_per_slot=512, parallel=1, queue=0, keepalive_s=0.2), Slow(refuse))
        t0 = asyncio.get_running_loop().time()
        out = await s.completions(CompletionRequest(prompt="a", stream=True))
        t_status = asyncio.get_running_loop().time() - t0
        assert isinstance(out, Stream) and t_status < 0.5
        chunks = [c async for c in out]
        await out.aclose()
        assert s.admitted == 0
        return chunks

    chunks = asyncio.run(main(False))
    waits = [json.loads(c[len(b": keepalive "):]) for c in chunks if c.startswith(b": keepalive {")]
    assert chunks[0].startswith(b": keepalive {") and len(waits) >= 2
    assert all(w["stage"] == "prompt" for w in waits) and 0.1 <= waits[0]["elapsed_s"] < waits[-1]["elapsed_s"] < 0.8
    assert b'"text":"ok"' in chunks[-2] and chunks[-1] == b"data: [DONE]\n\n"
    chunks = asyncio.run(main(True))
    err = json.loads(chunks[-2][6:])["error"]
    assert err["code"] == "invalid_json_schema" and err["message"].startswith("response_format.json_schema")
    assert chunks[-1] == b"data: [DONE]\n\n"


def test_top_logprobs_limit_and_json_schema_shape():
    with pytest.raises(ValidationError, match="less than or equal to 20"):
        ChatCompletionRequest.model_validate({"messages": MSG, "logprobs": True, "top_logprobs": 21})
    with pytest.raises(ValidationError, match="needs a json_schema object"):
        ChatCompletionRequest.model_validate({"messages": MSG, "response_format": {"type": "json_schema"}})
    r = ChatCompletionRequest.model_validate({"messages": MSG, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}})
    assert r.model_dump(by_alias=True, exclude_none=True)["response_format"]["json_schema"]["schema"] == {"type": "object"}


def test_default_request_timeout_comes_from_the_plan():
    from types import SimpleNamespace as NS

    from hybridinfer.server.cli import default_request_timeout

    plan = NS(ctx=32768, parallel=2, prediction=NS(prefill_tps=50.0, decode_tps=5.0))
    assert default_request_timeout(plan) == pytest.approx(3 * (16384 / 50 + 16384 / 5), abs=1)
    assert default_request_timeout(NS(ctx=4096, parallel=1, prediction=NS(prefill_tps=6000.0, decode_tps=1800.0))) == 600


def test_prefill_eta_follows_the_growing_cost_per_token():
    """Reports from a prompt whose per-token time grows with position (1 ms + 2 us * pos) after a first batch that
    paid 3 s of warm-up: from the third report the ETA is the exact rest; before, the rate so far."""
    from hybridinfer.server.serving import _Progress

    def t(d, c=0):
        return 3.0 + 0.001 * (d - c) + 0.000002 / 2 * (d * d - c * c)

    for cached in (0, 1000):
        p = _Progress(None)
        for d in (512, 1024):
            p.update({"total": 6000, "cache": cached, "processed": cached + d, "time_ms": t(cached + d, cached) * 1000})
        assert p.remaining_s(cached + 1024, 6000, cached, 10.0) == pytest.approx((6000 - cached - 1024) / 10.0)
        for d in (1536, 2048):
            p.update({"total": 6000, "cache": cached, "processed": cached + d, "time_ms": t(cached + d, cached) * 1000})
        done = cached + 2048
        assert p.remaining_s(done, 6000, cached, 1.0) == pytest.approx(t(6000, cached) - t(done, cached), rel=1e-6)


def test_late_wakeup_of_a_cancelled_waiter_is_not_logged_as_a_crash():
    """anyio waits for an engine socket with add_reader(sock, future.set_result); ending that request as the socket
    turns readable leaves a queued set_result on a cancelled future (seen as a traceback in the drain test, ~1 run
    in 10). The loop's handler drops exactly that; anything else still reaches the default handler."""
    import asyncio

    from hybridinfer.server.app import _quiet_late_wakeups

    seen = []

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_quiet_late_wakeups)
        loop.default_exception_handler = lambda context: seen.append(context)
        fut = loop.create_future()
        fut.cancel()
        loop.call_soon(fut.set_result, None)  # the late wake-up, run by the loop for real
        loop.call_soon(lambda: 1 / 0)
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert [type(c.get("exception")) for c in seen] == [ZeroDivisionError]
