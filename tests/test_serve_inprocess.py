"""`serve --engine llama-cpp-python`: llama.cpp in-process, same placement, same API, proven on the tiny model."""

import re
import time

import httpx
import pytest

from served import Served

pytestmark = pytest.mark.engine
llama_cpp = pytest.importorskip("llama_cpp", reason="install.sh --dev installs llama-cpp-python")


@pytest.fixture(scope="module")
def inproc(tmp_path_factory, tiny_model):
    # Planned as on a 24 GB GPU box with the routed experts on the CPU, so the plan carries a tensor override.
    s = Served(["--engine", "llama-cpp-python", "--gguf", tiny_model, "--hardware", "desktop-4090",
                "--rules", "moe-experts-on-cpu", "--threads", "2"], tmp_path_factory.mktemp("inproc"))
    yield s
    s.stop()


def test_override_took_effect_in_load_log(inproc):
    banner = "\n".join(inproc.lines)
    assert "llama-cpp-python (in-process)" in banner and "tensor_buft_overrides=" in banner
    log = inproc.log.read_text()
    overridden = set(re.findall(r"tensor (\S+) \(.*\) buffer type overridden to (CPU\w*)", log))
    want = {f"blk.{b}.ffn_{k}_exps.weight" for b in (1, 2, 3) for k in ("gate", "up", "down")}
    assert {n for n, _ in overridden} == want  # exactly the routed experts, nothing else


def test_same_greedy_text_as_llama_server(inproc, tmp_path, tiny_model):
    body = {"prompt": "hi there", "max_tokens": 12, "temperature": 0}
    ours = httpx.post(inproc.url + "/v1/completions", json=body, timeout=60).json()
    ref = Served(["--gguf", tiny_model, "--threads", "2"], tmp_path)
    try:
        theirs = httpx.post(ref.url + "/v1/completions", json=body, timeout=60).json()
    finally:
        ref.stop()
    assert ours["choices"][0]["text"] == theirs["choices"][0]["text"]
    assert ours["usage"] == {k: theirs["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def test_openai_client_chat_stream_and_reasoning(inproc):
    c = inproc.client()
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=16)
    msg = r.choices[0].message
    assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens > 0
    assert msg.model_extra.get("reasoning_content") is not None  # R1 template opens <think>: output starts inside it
    n = 0
    usage = None
    for ch in c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=16, stream=True, stream_options={"include_usage": True}):
        if ch.usage:
            usage = ch.usage
        for choice in ch.choices:
            if choice.delta.model_extra.get("reasoning_content") or choice.delta.content:
                n += 1
    assert usage.completion_tokens == 16 and 0 < n <= 16


def test_bad_requests_and_cancel(inproc):
    r = httpx.post(inproc.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                              "max_tokens": 10**6}, timeout=10)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = httpx.post(inproc.url + "/v1/chat/completions", json={"messages": []}, timeout=10)
    assert 400 <= r.status_code < 500
    # A client that leaves mid-stream stops generation: the next request is served at once, not after 3000 tokens.
    with httpx.stream("POST", inproc.url + "/v1/completions", timeout=30,
                      json={"prompt": "go", "max_tokens": 3000, "ignore_eos": True, "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                break
    t0 = time.time()
    r = httpx.post(inproc.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and time.time() - t0 < 5
    m = httpx.get(inproc.url + "/metrics").text
    assert re.search(r"hybridinfer_requests_cancelled_total [1-9]", m)
    assert httpx.post(inproc.url + "/tokenize", json={"content": "hello"}).json()["tokens"]


def test_refuses_parallel(tiny_model):
    from conftest import run_cli

    r = run_cli("serve", "--engine", "llama-cpp-python", "--gguf", tiny_model, "--parallel", "2")
    assert r.returncode == 2 and "one request at a time" in r.stderr and "Traceback" not in r.stderr
