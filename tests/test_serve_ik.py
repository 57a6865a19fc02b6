"""`hybridinfer serve --engine ik_llama.cpp`: the real ik_llama.cpp server behind the same API (real HTTP on loopback,
the official openai client), with what its server lacks adapted and said."""

import os
import re
import time

import httpx
import openai
import pytest

from conftest import run_cli
from served import Served, read_stream

pytestmark = pytest.mark.engine


def _ik_binary():
    from hybridinfer.engines import get
    return get("ik_llama.cpp").binary()


needs_ik = pytest.mark.skipif(not _ik_binary(), reason="ik_llama.cpp is not installed (./install.sh builds it)")
MSG = [{"role": "user", "content": "hello world"}]
# ASCII only: with random weights the demo model emits byte tokens that split UTF-8 characters, and ik's chat
# endpoint then answers 500 ("invalid UTF-8 byte", nlohmann json) where mainline replaces them.
ASCII = 'root ::= [a-z ]+'
GREEDY = {"temperature": 0, "max_tokens": 24, "extra_body": {"ignore_eos": True, "grammar": ASCII}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    if not _ik_binary():
        pytest.skip("ik_llama.cpp is not installed (./install.sh builds it)")
    s = Served(["--engine", "ik_llama.cpp", "--gguf", tiny_model, "--parallel", "2", "--threads", "2",
                "--alias", "tiny"], tmp_path_factory.mktemp("ik"))
    yield s
    s.stop()


def _metric(text, name):
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


@needs_ik
def test_banner_command_and_adaptations(server):
    text = "\n".join(server.lines)
    assert "plan: engine ik_llama.cpp" in text
    cmd = next(ln for ln in server.lines if "ik-llama-server" in ln and " -m " in ln)
    assert "-mla 3" in cmd and re.search(r"-fa( on)?\b", cmd) and "-rtr" in cmd  # CPU only: repacked at load
    assert "--log-disable" in cmd  # else its legacy logger writes ./llama.log wherever serve was started
    # its server binds TCP only: hybridinfer says so and keeps the engine on loopback
    assert "--host 127.0.0.1" in cmd and "Unix socket" in text
    assert "does not report" in text  # the metrics its /metrics lacks, named once at start


@needs_ik
def test_chat_reasoning_split_stream_and_usage(server):
    c = server.client()
    r = c.chat.completions.create(model="tiny", messages=MSG, **GREEDY)
    msg = r.choices[0].message
    assert msg.reasoning_content and "<think>" not in msg.reasoning_content and "</think>" not in (msg.content or "")
    assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens > 0
    reasoning, content, finish, usage = read_stream(
        c.chat.completions.create(model="tiny", messages=MSG, stream=True, **GREEDY))
    assert reasoning == msg.reasoning_content and content == (msg.content or "")
    assert usage.completion_tokens == 24 and finish == "length"
    t = c.completions.create(model="tiny", prompt="the quick brown fox", max_tokens=10, temperature=0,
                             extra_body={"ignore_eos": True, "grammar": ASCII})
    assert t.usage.completion_tokens == 10


@needs_ik
def test_tokenize_and_metrics(server):
    toks = httpx.post(server.url + "/tokenize", json={"content": "the quick brown fox"}).json()["tokens"]
    direct = server.engine.post("/tokenize", json={"content": "the quick brown fox"}).json()["tokens"]
    assert toks == direct and len(toks) > 1
    m = httpx.get(server.url + "/metrics").text
    assert _metric(m, "hybridinfer_engine_up") == 1 and "llamacpp:prompt_tokens_total" in m
    assert _metric(m, "hybridinfer_completion_tokens_total") > 0


@needs_ik
def test_bad_request_is_4xx_and_server_stays_up(server):
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="tiny", messages=MSG, max_tokens=10**6)
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and httpx.get(server.url + "/health").status_code == 200


@needs_ik
def test_disconnect_cancels_generation(server):
    before = _metric(server.engine.get("/metrics").text, "llamacpp:tokens_predicted_total") or 0
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30,
                      json={"messages": MSG, "stream": True, "max_tokens": 4000, "ignore_eos": True,
                            "grammar": ASCII}) as r:
        n = 0
        for line in r.iter_lines():
            n += line.startswith("data: ")
            if n >= 5:
                break  # leaving the block closes the connection mid-stream
    busy = True
    deadline = time.time() + 5
    while busy and time.time() < deadline:
        # ik's /slots reports `state` (0 = idle) where mainline has `is_processing`
        busy = any(s.get("is_processing", s.get("state", 0) != 0) for s in server.engine.get("/slots").json())
        time.sleep(0.05)
    assert not busy
    m = httpx.get(server.url + "/metrics").text
    assert _metric(m, "hybridinfer_requests_cancelled_total") >= 1
    assert _metric(server.engine.get("/metrics").text, "llamacpp:tokens_predicted_total") - before < 4000


@needs_ik
def test_engine_crash_restart(tmp_path, tiny_model):
    s = Served(["--engine", "ik_llama.cpp", "--gguf", tiny_model, "--threads", "2"], tmp_path)
    try:
        errors = s.kill_engine_mid_stream({"messages": MSG, "grammar": ASCII})
        assert errors and "engine stopped" in errors[0]["error"]["message"]
        deadline = time.time() + 30
        while time.time() < deadline and httpx.get(s.url + "/health").status_code != 200:
            time.sleep(0.2)
        assert httpx.get(s.url + "/health").json()["engine_restarts"] == 1
        assert s.client().chat.completions.create(model=s.client().models.list().data[0].id, messages=MSG,
                                                  max_tokens=4).usage.completion_tokens >= 1
        engine = s.engine_pid()
    finally:
        s.stop()
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(engine, 0)  # no orphan engine


def test_not_installed_is_one_line(tiny_model, tmp_path):
    r = run_cli("serve", "--engine", "ik_llama.cpp", "--gguf", tiny_model,
                env={"HYBRIDINFER_IK_LLAMA_SERVER": str(tmp_path / "absent")})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "ik_llama.cpp" in r.stderr and "install.sh" in r.stderr


WORDS = ("the of and to in is that for it as with was on be by this are from at or an have not which but all "
         "model cache token slot layer expert memory prefix context restore conversation answer question").split()


@needs_ik
def test_interleaved_conversations_on_two_slots_keep_the_engine_up(tmp_path, tiny_model):
    """4 conversations of 2 turns, ~750 tokens a turn, on 2 slots (A1 B1 C1 D1 A2 B2 C2 D2, as
    benchmarks/long_context.py interleaves them): each slot's cells end up interleaved with the other's. The
    tree's kv-cache seq_pos_min returned a sequence's first cell's position, not its smallest, so a returning slot
    was taken for one missing its start ("forcing full prompt re-processing") and the re-read aborted the engine in
    its flash-attention kernel (GGML_ASSERT(S > 0), iqk_fa_templates.h) at D2, here and on the mid model;
    patches/ik_llama.cpp/0002 fixes it."""
    import random

    s = Served(["--engine", "ik_llama.cpp", "--gguf", tiny_model, "--parallel", "2", "--threads", "2",
                "--no-calibrate"], tmp_path)
    try:
        convs = {}
        for i, n in enumerate("ABCD"):
            rng = random.Random(10 + i)
            probe_text = " ".join(rng.choice(WORDS) for _ in range(400))
            probe = httpx.post(s.url + "/tokenize", json={"content": probe_text}, timeout=30).json()["tokens"]
            words = max(1, int(750 / (len(probe) / 400)))
            convs[n] = ([{"role": "system", "content": "You are a helpful assistant."}],
                        [f"Part {k + 1}. " + " ".join(rng.choice(WORDS) for _ in range(words)) for k in range(2)])
        for k in range(2):
            for n, (msgs, texts) in convs.items():
                msgs.append({"role": "user", "content": texts[k]})
                r = httpx.post(s.url + "/v1/chat/completions", timeout=120,
                               json={"messages": msgs, "max_tokens": 16, "temperature": 0})
                assert r.status_code == 200, (n, k, r.text, s.lines[-5:])
                msgs.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
        assert httpx.get(s.url + "/health", timeout=5).json()["engine_restarts"] == 0
        log = s.log.read_text(errors="replace")
        assert "forcing full prompt re-processing" not in log and "GGML_ASSERT" not in log
    finally:
        s.stop()
