"""The pipe function inside a real Open-WebUI (lite install, offline, loopback) talking to a real `hybridinfer serve`:
on the tiny model, import + activate through Open-WebUI's HTTP API, chat through /api/chat/completions (stream and
not) and through the UI path, read back the stored reasoning item and answer; on SmolLM2-135M-Instruct (real
weights, tests/realweights.py), a real answer through the UI path, screenshotted in headless Chromium (the docs'
image). Marked `openwebui`: `.ci/run` runs it as its own step (it installs Open-WebUI into a cached venv)."""

import json
import os
import shutil
import time
import uuid

import httpx
import pytest

from conftest import ROOT, run_cli
from owui import VERSION, OpenWebUI, ensure_chromium, ensure_openwebui, screenshot
from realweights import MODEL_ID as SMOL_ID, smollm2
from served import Served, free_port

pytestmark = pytest.mark.openwebui
GRAMMAR = 'root ::= "two plus two" "</think>" " is four"'  # reasoning, then an answer, from random weights
MODEL = "hybridinfer.hybridinfer-demo"
SMOL = "hybridinfer." + SMOL_ID


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model):
    exe = ensure_openwebui()
    ensure_chromium()
    d = tmp_path_factory.mktemp("owui")
    serve = Served(["--gguf", tiny_model, "--alias", "hybridinfer-demo", "--parallel", "2", "--threads", "2"], d)
    (d / "data").mkdir()
    ow = smol = None
    try:
        smol = Served(["--gguf", str(smollm2()), "--threads", "2"], d)
        ow = OpenWebUI(exe, d / "data", free_port())
        r = httpx.post(ow.url + "/api/v1/auths/signup",
                       json={"name": "admin", "email": "admin@example.com", "password": "hybridinfer-test"})
        r.raise_for_status()
        headers = {"Authorization": f"Bearer {r.json()['token']}"}
        yield serve, ow, headers, r.json()["token"], d, smol
    finally:
        if ow:
            ow.stop()
        if smol:
            smol.stop()
        serve.stop()


def _install_function(ow, headers, serve_url):
    source = run_cli("openwebui-pipe").stdout
    httpx.delete(ow.url + "/api/v1/functions/id/hybridinfer/delete", headers=headers)  # a fresh import each time
    r = httpx.post(ow.url + "/api/v1/functions/create", headers=headers,
                   json={"id": "hybridinfer", "name": "hybridinfer", "content": source,
                         "meta": {"description": "models served by hybridinfer", "manifest": {}}})
    assert r.status_code == 200, r.text
    assert r.json()["type"] == "pipe" and r.json()["meta"]["manifest"]["title"] == "hybridinfer"
    r = httpx.post(ow.url + "/api/v1/functions/id/hybridinfer/toggle", headers=headers)
    assert r.json()["is_active"] is True
    spec = httpx.get(ow.url + "/api/v1/functions/id/hybridinfer/valves/spec", headers=headers).json()
    assert {"BASE_URL", "API_KEY", "REQUEST_TIMEOUT", "SHOW_REASONING", "MODEL_FILTER"} <= set(spec["properties"])
    r = httpx.post(ow.url + "/api/v1/functions/id/hybridinfer/valves/update", headers=headers,
                   json={"BASE_URL": serve_url + "/v1"})
    assert r.status_code == 200


def _chat_in_ui(ow, headers, body: dict, question: str) -> tuple[str, dict]:
    """A chat the way Open-WebUI's UI makes one: it creates the chat, runs the pipe in the background and stores the
    answer; -> (chat id, the finished assistant message)."""
    uid, aid = str(uuid.uuid4()), str(uuid.uuid4())
    user_msg = {"id": uid, "parentId": None, "childrenIds": [], "role": "user", "content": question,
                "timestamp": int(time.time()), "models": [body["model"]]}
    r = httpx.post(ow.url + "/api/chat/completions", headers=headers, timeout=120,
                   json=dict(body, stream=True, parent_id=None, id=aid, user_message=user_msg,
                             session_id="hybridinfer-test", background_tasks={}, features={}, variables={}))
    chat_id = r.json()["chat_id"]
    for _ in range(120):
        chat = httpx.get(ow.url + f"/api/v1/chats/{chat_id}", headers=headers).json()["chat"]
        msg = chat["history"]["messages"][aid]
        if msg.get("done"):
            break
        time.sleep(0.5)
    assert msg["done"] and msg["parentId"] == uid and chat["history"]["currentId"] == aid
    return chat_id, msg


def test_function_in_real_openwebui(stack):
    serve, ow, headers, token, d, _ = stack
    _install_function(ow, headers, serve.url)
    models = {m["id"]: m["name"] for m in httpx.get(ow.url + "/api/models", headers=headers).json()["data"]}
    assert models.get(MODEL) == "hybridinfer: hybridinfer-demo"

    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is two plus two?"}], "max_tokens": 60,
            "grammar": GRAMMAR}
    # The API path: the thought stays literal inside content.
    r = httpx.post(ow.url + "/api/chat/completions", headers=headers, json=dict(body, stream=False), timeout=120)
    assert r.json()["choices"][0]["message"]["content"] == "<think>\ntwo plus two\n</think>\n\n is four"
    text = ""
    with httpx.stream("POST", ow.url + "/api/chat/completions", headers=headers, json=dict(body, stream=True),
                      timeout=120) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:]).get("choices", []):
                    text += (c.get("delta") or {}).get("content") or ""
    assert text == "<think>\ntwo plus two\n</think>\n\n is four"

    # The UI path: the thought is stored as its own output item, the answer without it, and the status events.
    chat_id, msg = _chat_in_ui(ow, headers, body, "What is two plus two?")
    out = {o["type"]: o for o in msg["output"]}
    assert [o["type"] for o in msg["output"]] == ["reasoning", "message"]
    assert out["reasoning"]["content"][0]["text"] == "two plus two"
    assert out["message"]["content"][0]["text"].strip() == "is four" and "think" not in msg["content"]
    statuses = [s["description"] for s in msg["statusHistory"]]
    assert statuses[:3] == ["Waiting for hybridinfer…", "Thinking…", "Answering…"]
    assert "tok/s" in statuses[-1] and "TTFT" in statuses[-1] and msg["statusHistory"][-1]["done"]


def test_real_answer_in_openwebui(stack):
    """SmolLM2-135M-Instruct (real weights) through the pipe and Open-WebUI's UI path, at temperature 0: the stored
    answer names Berlin (what the model answers, tests/test_realweights.py), and the chat is screenshotted."""
    _, ow, headers, token, d, smol = stack
    _install_function(ow, headers, smol.url)
    models = {m["id"]: m["name"] for m in httpx.get(ow.url + "/api/models", headers=headers).json()["data"]}
    assert models.get(SMOL) == f"hybridinfer: {SMOL_ID}"
    question = "What is the capital of Germany?"
    # One request first: the screenshot's status line then shows a steady speed, not the first request's page-ins.
    smol.client().completions.create(model=SMOL_ID, prompt="Hello", max_tokens=2)
    body = {"model": SMOL, "messages": [{"role": "user", "content": question}], "temperature": 0, "seed": 42,
            "max_tokens": 64}
    chat_id, msg = _chat_in_ui(ow, headers, body, question)
    assert [o["type"] for o in msg["output"]] == ["message"]  # no thought: SmolLM2 does not reason
    assert "Berlin" in msg["content"] and "think" not in msg["content"]
    statuses = [s["description"] for s in msg["statusHistory"]]
    assert statuses[0] == "Waiting for hybridinfer…" and "Answering…" in statuses
    assert "tok/s" in statuses[-1] and "TTFT" in statuses[-1] and msg["statusHistory"][-1]["done"]

    # The rendering: the chat in headless Chromium.
    httpx.post(ow.url + "/api/v1/users/user/settings/update", headers=headers, json={"ui": {"version": VERSION}})
    png = d / "openwebui-chat.png"
    screenshot(ow.url, token, png, f"/c/{chat_id}")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    if os.environ.get("HYBRIDINFER_UPDATE_DOCS"):
        shutil.copy(png, ROOT / "docs" / "openwebui-chat.png")


def test_long_prompt_shows_reading_progress(stack):
    """A prompt of ~5,000 tokens on SmolLM2 read in batches of 128 (several seconds of prefill here): the chat's
    status history shows the pipe's "reading the prompt: N % (done of total tokens, ~S s left)" before the
    answer, from serve's progress comments, then the answer and the speed line."""
    _, ow, headers, token, d, smol = stack
    long = Served(["--gguf", str(smollm2()), "--threads", "2", "--batch", "128", "--ubatch", "128", "--ctx", "8192"], d)
    try:
        _install_function(ow, headers, long.url)
        facts = ("The river flows past the old mill, and the miller counts the sacks of grain before the market "
                 "opens on Tuesday. ")
        question = facts * 220 + "\nIn one word: what does the miller count?"
        body = {"model": SMOL, "messages": [{"role": "user", "content": question}], "temperature": 0,
                "max_tokens": 8}
        _, msg = _chat_in_ui(ow, headers, body, question)
    finally:
        long.stop()
    statuses = [s["description"] for s in msg["statusHistory"]]
    reading = [s for s in statuses if s.startswith("reading the prompt: ")]
    assert statuses[0] == "Waiting for hybridinfer…" and reading, statuses
    assert statuses.index(reading[-1]) < statuses.index("Answering…"), statuses
    assert " tokens" in reading[-1] and " of " in reading[-1], reading
    assert msg["content"].strip() and "tok/s" in statuses[-1] and msg["statusHistory"][-1]["done"]


def test_server_down_shows_one_line(stack):
    serve, ow, headers, token, d, _ = stack
    _install_function(ow, headers, f"http://127.0.0.1:{free_port()}")
    models = {m["id"]: m["name"] for m in httpx.get(ow.url + "/api/models", headers=headers).json()["data"]}
    assert "hybridinfer.unreachable" in models and "is `hybridinfer serve` running?" in models["hybridinfer.unreachable"]
    r = httpx.post(ow.url + "/api/chat/completions", headers=headers, timeout=60,
                   json={"model": "hybridinfer.unreachable", "stream": False,
                         "messages": [{"role": "user", "content": "hi"}]})
    content = r.json()["choices"][0]["message"]["content"]
    assert content.startswith("hybridinfer: cannot reach") and "Traceback" not in content
