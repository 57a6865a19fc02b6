"""The Open-WebUI pipe function, loaded the way Open-WebUI loads it (a module from source text), against a real
`hybridinfer serve` on the tiny model."""

import ast
import asyncio
import re
import types

import httpx
import pytest

from conftest import run_cli
from served import Served, free_port

pytestmark = pytest.mark.engine
# A grammar makes the random-weight model "think" then answer, deterministically (llama.cpp GBNF, passed through).
GRAMMAR = 'root ::= "two plus two" "</think>" " is four"'


def load_pipe(text: str):
    mod = types.ModuleType("function_hybridinfer")
    exec(compile(text, "<open-webui function>", "exec"), mod.__dict__)
    return mod


@pytest.fixture(scope="module")
def source():
    r = run_cli("openwebui-pipe")
    assert r.returncode == 0
    return r.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    s = Served(["--gguf", tiny_model, "--parallel", "2", "--threads", "2"], tmp_path_factory.mktemp("owui-pipe"))
    yield s
    s.stop()


def make(source, url, **valves):
    p = load_pipe(source).Pipe()
    p.valves = p.Valves(BASE_URL=url + "/v1", **valves)
    return p


async def collect(p, body, task=None):
    events = []

    async def emit(e):
        events.append(e)

    res = await p.pipe(body, __event_emitter__=emit, __task__=task)
    if isinstance(res, str):
        return res, events
    return "".join([x async for x in res]), events


def test_self_contained(source):
    tree = ast.parse(source)
    mods = {n.module if isinstance(n, ast.ImportFrom) else a.name for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert {m.split(".")[0] for m in mods} <= {"json", "re", "time", "typing", "httpx", "pydantic"}
    assert 'title: hybridinfer' in source.split('"""')[1]
    r = run_cli("openwebui-pipe", "--base-url", "http://10.0.0.2:9000/v1")
    assert 'default="http://10.0.0.2:9000/v1"' in r.stdout or "default='http://10.0.0.2:9000/v1'" in r.stdout


def test_pipes_lists_models_and_filters(source, server):
    assert asyncio.run(make(source, server.url).pipes()) == [{"id": "tiny", "name": "tiny"}]
    assert asyncio.run(make(source, server.url, MODEL_FILTER="^nomatch").pipes()) == []


def test_stream_reasoning_then_answer_with_status(source, server):
    body = {"model": "hybridinfer.tiny", "stream": True, "max_tokens": 60, "grammar": GRAMMAR,
            "messages": [{"role": "user", "content": "what is two plus two?"}]}
    out, events = asyncio.run(collect(make(source, server.url), body))
    assert out == "<think>\ntwo plus two\n</think>\n\n is four"
    desc = [e["data"]["description"] for e in events]
    # on a loaded box even this short prompt may take long enough to be reported
    desc = [d for d in desc if not d.startswith("reading the prompt: ")]
    assert desc[:3] == ["Waiting for hybridinfer…", "Thinking…", "Answering…"]
    assert re.fullmatch(r"\d+ tokens · [\d.]+ tok/s · TTFT [\d.]+ s", desc[-1]) and events[-1]["data"]["done"]
    assert all(e["type"] == "status" for e in events)


def test_non_stream_hidden_reasoning_and_task(source, server):
    body = {"model": "hybridinfer.tiny", "stream": False, "max_tokens": 60, "grammar": GRAMMAR,
            "messages": [{"role": "user", "content": "x"}]}
    out, events = asyncio.run(collect(make(source, server.url), body))
    assert out == "<think>\ntwo plus two\n</think>\n\n is four" and events[-1]["data"]["done"]
    out, _ = asyncio.run(collect(make(source, server.url, SHOW_REASONING=False), dict(body, stream=True)))
    assert out == " is four"
    out, _ = asyncio.run(collect(make(source, server.url), dict(body, stream=True), task="title_generation"))
    assert out == " is four"  # background tasks (titles, tags) get the answer only


def test_errors_are_one_readable_line(source, server):
    down = f"http://127.0.0.1:{free_port()}"
    models = asyncio.run(make(source, down).pipes())
    assert models[0]["id"] == "unreachable" and "is `hybridinfer serve` running?" in models[0]["name"]
    body = {"model": "hybridinfer.tiny", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    out, events = asyncio.run(collect(make(source, down), body))
    assert out.startswith("\n\n**hybridinfer:** cannot reach") and "Traceback" not in out
    assert events[-1]["data"]["done"] and events[-1]["data"]["description"].startswith("hybridinfer: cannot reach")
    out, _ = asyncio.run(collect(make(source, server.url), dict(body, max_tokens=10**7)))
    assert "HTTP 400" in out and "max_tokens" in out


def test_cancel_closes_the_stream_and_frees_the_slot(source, server):
    def cancelled():
        m = re.search(r"hybridinfer_requests_cancelled_total (\d+)", httpx.get(server.url + "/metrics").text)
        return int(m.group(1))

    before = cancelled()

    async def run():
        p = make(source, server.url)
        gen = await p.pipe({"model": "hybridinfer.tiny", "stream": True, "max_tokens": 3000, "ignore_eos": True,
                            "messages": [{"role": "user", "content": "go"}]})
        n = 0
        async for _ in gen:
            n += 1
            if n == 5:
                break
        await gen.aclose()  # what Open-WebUI does when the user presses stop

    asyncio.run(run())
    for _ in range(50):
        h = httpx.get(server.url + "/health").json()
        if cancelled() > before and h["in_flight"] == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert cancelled() == before + 1 and httpx.get(server.url + "/health").json()["in_flight"] == 0


def test_progress_note_wording(source):
    note = load_pipe(source).progress_note
    line = ': progress {"stage":"prompt","processed":2700,"total":6000,"cached":0,"tokens_per_s":67.5,"eta_s":40.0}'
    assert note(line) == "reading the prompt: 45 % (2,700 of 6,000 tokens, ~40 s left)"
    assert note(': progress {"processed":10,"total":100,"eta_s":300}') == \
        "reading the prompt: 10 % (10 of 100 tokens, ~5 min left)"
    assert note(': progress {"processed":10,"total":100,"eta_s":null}') == "reading the prompt: 10 % (10 of 100 tokens)"
    assert note(": progress not json") is None and note(": keepalive") is None
    # an engine that reports no progress (ik_llama.cpp, KTransformers): how long it has been reading
    assert note(': keepalive {"stage":"prompt","elapsed_s":35.2}') == "reading the prompt… 35 s"
    assert note(': keepalive {"stage":"prompt","elapsed_s":300}') == "reading the prompt… 5 min"
    assert note(': queued {"stage":"queued","waited_s":12.4}') == "waiting for a free slot… 12 s"
    assert note(': keepalive {"other":1}') is None and note(": ") is None


def test_stream_without_usage_still_ends_with_the_speed_line(source):
    """A server that sends no usage chunk (a stream without stream_options honoured): the answer, then a closing
    status line counting 0 tokens — never an AttributeError in place of it."""
    mod = load_pipe(source)
    sse = 'data: {"choices":[{"index":0,"delta":{"content":"hello"}}]}\n\ndata: [DONE]\n\n'
    transport = httpx.MockTransport(lambda req: httpx.Response(200, text=sse,
                                                                headers={"content-type": "text/event-stream"}))
    real = httpx.AsyncClient
    mod.httpx = types.SimpleNamespace(**{k: getattr(httpx, k) for k in dir(httpx) if not k.startswith("_")})
    mod.httpx.AsyncClient = lambda **kw: real(transport=transport, **kw)
    body = {"model": "hybridinfer.tiny", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    out, events = asyncio.run(collect(mod.Pipe(), body))
    assert out == "hello" and events[-1]["data"]["done"]
    assert events[-1]["data"]["description"].startswith("0 tokens · ")


def test_stream_shows_prefill_progress_then_the_answer(source):
    """A stand-in for serve's SSE (httpx.MockTransport): progress comments, then the answer."""
    mod = load_pipe(source)
    sse = (': queued {"stage":"queued","waited_s":0.0}\n\n: keepalive\n\n'
           ': progress {"stage":"prompt","processed":2700,"total":6000,"cached":0,"tokens_per_s":82.5,"eta_s":40.0}\n\n'
           'data: {"choices":[{"index":0,"delta":{"content":"hello"}}]}\n\n'
           'data: {"choices":[],"usage":{"prompt_tokens":6000,"completion_tokens":1,"total_tokens":6001}}\n\n'
           'data: [DONE]\n\n')
    transport = httpx.MockTransport(lambda req: httpx.Response(200, text=sse,
                                                                headers={"content-type": "text/event-stream"}))
    real = httpx.AsyncClient
    mod.httpx = types.SimpleNamespace(**{k: getattr(httpx, k) for k in dir(httpx) if not k.startswith("_")})
    mod.httpx.AsyncClient = lambda **kw: real(transport=transport, **kw)
    p = mod.Pipe()
    body = {"model": "hybridinfer.tiny", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    out, events = asyncio.run(collect(p, body))
    desc = [e["data"]["description"] for e in events]
    assert out == "hello"
    assert desc[:4] == ["Waiting for hybridinfer…", "waiting for a free slot… 0 s",
                        "reading the prompt: 45 % (2,700 of 6,000 tokens, ~40 s left)", "Answering…"]
