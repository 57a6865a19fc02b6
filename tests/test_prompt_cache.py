"""The prompt cache on disk and slot affinity, against the real llama-server on the tiny demo model: saved at
shutdown and restored after a restart (the engine reports the restored tokens as cached), never restored into
another context size or model, a corrupt or partial state ignored and removed, a full disk or read-only directory
skipped with a message, two serve processes sharing the directory, and 4 interleaved conversations on 2 slots."""

import json
import os
import subprocess
import threading

import httpx
import pytest

from hybridinfer.server.prompt_cache import (IDLE_SAVE_S, DiskStore, Stats, common_prefix, message_chain, prompt_chain,
                                             request_chain)
from tests.served import Served

pytestmark = pytest.mark.engine

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
# The demo's R1 template drops earlier turns' thoughts: a deterministic grammar-free answer keeps turns comparable.
BASE = {"max_tokens": 8, "temperature": 0, "reasoning_format": "raw"}


def _turn(text: str, n: int) -> str:
    return f"{text} " + " ".join(f"word{i}" for i in range(n))


def _chat(url: str, messages: list[dict]) -> dict:
    r = httpx.post(url + "/v1/chat/completions", json={**BASE, "messages": messages}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _cached(answer: dict) -> int:
    return (answer["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def _serve(tmp_path, cache_dir, *extra):
    return Served(["--engine", os.environ.get("HYBRIDINFER_TEST_ENGINE", "llama.cpp"), "--prompt-cache-dir", str(cache_dir), *extra], tmp_path)


def _health(s) -> dict:
    return httpx.get(s.url + "/health", timeout=5).json()["prompt_cache"]


def _states(cache_dir) -> list[str]:
    return sorted(str(p.relative_to(cache_dir)) for p in cache_dir.rglob("*.slot"))


def _conversation(name: str, words: int = 200) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": _turn(f"conversation {name}:", words)}]


def test_saved_at_shutdown_restored_after_restart(tmp_path):
    cache = tmp_path / "pc"
    msgs = _conversation("A")
    s = _serve(tmp_path, cache)
    try:
        first = _chat(s.url, msgs)
        assert _cached(first) == 0
    finally:
        s.stop()
    assert len(_states(cache)) == 1, "saved at shutdown"
    msgs2 = msgs + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                    {"role": "user", "content": "and then?"}]
    s = _serve(tmp_path, cache)
    try:
        second = _chat(s.url, msgs2)
        h = _health(s)
        assert h["restores"] == 1 and h["restored_tokens"] >= first["usage"]["prompt_tokens"], json.dumps([h, s.lines[-15:]], indent=1)
        # The engine reuses the restored tokens: only the new turn is prefilled.
        assert _cached(second) >= first["usage"]["prompt_tokens"] - 1, second["usage"]
        metrics = httpx.get(s.url + "/metrics", timeout=5).text
        assert "hybridinfer_prompt_cache_restores_total 1.0" in metrics
        assert "hybridinfer_prompt_cache_disk_bytes" in metrics
    finally:
        s.stop()


def test_other_context_or_model_never_restored(tmp_path, tiny_model):
    cache = tmp_path / "pc"
    msgs = _conversation("B")
    s = _serve(tmp_path, cache, "--ctx", "4096")
    try:
        _chat(s.url, msgs)
    finally:
        s.stop()
    (first,) = _states(cache)
    follow = msgs + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "more"}]
    for extra in (["--ctx", "2048"], ["--ctx", "4096", "--gguf", str(tiny_model)]):
        if "--gguf" in extra:  # the same weights in another file: another model identity (a changed file)
            with open(tiny_model, "ab") as f:
                f.write(b"\0" * 64)
        s = _serve(tmp_path, cache, *extra)
        try:
            answer = _chat(s.url, follow)
            h = _health(s)
            assert h["restores"] == 0 and _cached(answer) == 0, (extra, h)
            assert os.path.basename(h["dir"]) != first.split("/")[0]
        finally:
            s.stop()


def test_corrupt_or_partial_state_ignored_and_removed(tmp_path):
    cache = tmp_path / "pc"
    msgs = _conversation("C")
    s = _serve(tmp_path, cache)
    try:
        _chat(s.url, msgs)
    finally:
        s.stop()
    (state,) = cache.rglob("*.slot")
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])  # a partial file under a whole file's name
    (state.parent / "tmp-999999999-abc.slot").write_bytes(b"half")  # a crash mid-save of a process now gone
    follow = msgs + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "more"}]
    s = _serve(tmp_path, cache)
    try:
        answer = _chat(s.url, follow)
        h = _health(s)
        assert h["restores"] == 0 and h["rejected"] == 1 and "ignored and removed" in h["last_problem"], h
        assert answer["choices"][0]["message"]["content"] is not None
        assert not (state.parent / "tmp-999999999-abc.slot").exists()
        assert not state.exists() or state.read_bytes() != data[: len(data) // 2]
    finally:
        s.stop()


def test_full_disk_or_read_only_skipped_with_a_message(tmp_path):
    cache = tmp_path / "pc"
    s = _serve(tmp_path, cache, "--prompt-cache-gb", "0.000001")  # ~1 KB: no state fits
    try:
        _chat(s.url, _conversation("D"))
    finally:
        s.stop()
    assert _states(cache) == []
    assert any("prompt cache: not saved" in line for line in s.lines), "\n".join(s.lines[-20:])
    if os.geteuid() == 0:
        return  # root writes into a read-only directory anyway
    keydir = next(p for p in cache.iterdir() if p.is_dir())
    keydir.chmod(0o555)
    try:
        s = _serve(tmp_path, cache)
        try:
            _chat(s.url, _conversation("E"))
            assert _health(s)["skipped"] == 0  # nothing evicted yet; shutdown then fails to save
        finally:
            s.stop()
        assert any("not saved" in line for line in s.lines)
    finally:
        keydir.chmod(0o755)


def test_two_processes_share_the_directory(tmp_path):
    cache = tmp_path / "pc"
    a, b = _serve(tmp_path, cache, "--parallel", "2"), _serve(tmp_path, cache, "--parallel", "2")
    convs = {n: _conversation(n, 120) for n in "PQRSTU"}
    try:
        def talk(s, names):
            for n in names:
                _chat(s.url, convs[n])
        ts = [threading.Thread(target=talk, args=(a, "PQR")), threading.Thread(target=talk, args=(b, "STU"))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        a.stop()
        b.stop()
    names = _states(cache)
    assert len(names) == 6, names
    store = DiskStore(str(next(p for p in cache.iterdir() if p.is_dir())), 2**30, Stats())
    for name in store.entries():
        assert store.check(name), name  # every state whole: size, header, tokens
    assert not list(cache.rglob("tmp-*"))


def test_four_conversations_on_two_slots_find_their_slot_or_state(tmp_path):
    cache = tmp_path / "pc"
    s = _serve(tmp_path, cache, "--parallel", "2")
    convs = {n: _conversation(n, 250) for n in "WXYZ"}
    try:
        first = {n: _chat(s.url, convs[n]) for n in "WXYZ"}  # W, X evicted by Y, Z: saved
        assert _health(s)["saves"] == 2
        for n in "WXYZ":  # each returns: restored from disk or found in its slot, never prefilled from scratch
            follow = convs[n] + [{"role": "assistant", "content": first[n]["choices"][0]["message"]["content"]},
                                 {"role": "user", "content": "go on"}]
            answer = _chat(s.url, follow)
            assert _cached(answer) >= first[n]["usage"]["prompt_tokens"] - 1, (n, answer["usage"])
        h = _health(s)
        assert h["restores"] == 4, h  # 2 slots, 4 conversations in turn: each comes back from disk
    finally:
        s.stop()
    # Without the disk cache the same interleaving still lands each conversation in the slot holding it.
    s = Served(["--engine", "llama.cpp", "--parallel", "2"], tmp_path)
    try:
        a = _chat(s.url, convs["W"])
        _chat(s.url, convs["X"])
        follow = convs["W"] + [{"role": "assistant", "content": a["choices"][0]["message"]["content"]},
                               {"role": "user", "content": "go on"}]
        assert _cached(_chat(s.url, follow)) >= a["usage"]["prompt_tokens"] - 1
        assert httpx.get(s.url + "/health", timeout=5).json()["prompt_cache"]["slot_hits"] == 1
    finally:
        s.stop()


def _complete(url: str, prompt: str) -> dict:
    r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_raw_prompts_find_their_slot_and_state(tmp_path):
    """/v1/completions conversations (each turn's prompt extends the last): 2 interleaved on 2 slots land where
    their prefix is; 4 on 2 slots come back from disk; a returning conversation after a restart is restored."""
    cache = tmp_path / "pc"
    turn1 = {n: _turn(f"Transcript {n}.\nUser:", 250) + "\nAssistant:" for n in "WXYZ"}
    s = _serve(tmp_path, cache, "--parallel", "2")
    try:
        first = {n: _complete(s.url, turn1[n]) for n in "WX"}
        for n in "WX":
            answer = _complete(s.url, turn1[n] + first[n]["choices"][0]["text"] + "\nUser: go on\nAssistant:")
            assert _cached(answer) >= first[n]["usage"]["prompt_tokens"] - 1, (n, answer["usage"])
        assert _health(s)["slot_hits"] == 2
        first.update({n: _complete(s.url, turn1[n]) for n in "YZ"})  # W, X saved as Y, Z take their slots
        answer = _complete(s.url, turn1["W"] + first["W"]["choices"][0]["text"] + "\nUser: go on\nAssistant:")
        assert _cached(answer) >= first["W"]["usage"]["prompt_tokens"] - 1, answer["usage"]
        assert _health(s)["restores"] == 1
    finally:
        s.stop()
    s = _serve(tmp_path, cache, "--parallel", "2")  # the same context per slot: the states' key
    try:
        answer = _complete(s.url, turn1["Z"] + first["Z"]["choices"][0]["text"] + "\nUser: and then?\nAssistant:")
        assert _cached(answer) >= first["Z"]["usage"]["prompt_tokens"] - 1, answer["usage"]
    finally:
        s.stop()


def test_idle_save_survives_a_killed_serve(tmp_path):
    """A finished turn is on disk once the server has been idle for IDLE_SAVE_S: SIGKILL (no shutdown save) loses
    nothing, and the next turn after a restart is restored. A later turn of the same conversation replaces the
    earlier state (it holds its tokens too)."""
    import signal
    import time

    cache = tmp_path / "pc"
    msgs = _conversation("K")
    s = _serve(tmp_path, cache)
    try:
        first = _chat(s.url, msgs)
        deadline = time.monotonic() + IDLE_SAVE_S + 20
        while _health(s)["saves"] < 1 and time.monotonic() < deadline:
            time.sleep(0.25)
        assert _health(s)["saves"] == 1 and len(_states(cache)) == 1
        msgs = msgs + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                       {"role": "user", "content": "and then?"}]
        second = _chat(s.url, msgs)
        deadline = time.monotonic() + IDLE_SAVE_S + 20
        while _health(s)["saves"] < 2 and time.monotonic() < deadline:
            time.sleep(0.25)
        assert _health(s)["saves"] == 2 and len(_states(cache)) == 1, _states(cache)  # turn 1's state superseded
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait(10)
    finally:
        s.stop()
    follow = msgs + [{"role": "assistant", "content": second["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "more"}]
    s = _serve(tmp_path, cache)
    try:
        answer = _chat(s.url, follow)
        assert _health(s)["restores"] == 1
        assert _cached(answer) >= second["usage"]["prompt_tokens"] - 1, answer["usage"]
    finally:
        s.stop()


def test_raw_prompt_chain():
    text = "x" * 1000
    a, b = prompt_chain(text), prompt_chain(text + "y" * 600)
    assert len(a) == 3 and common_prefix(b, a) == 3  # whole blocks only: the longer prompt extends the shorter
    assert common_prefix(prompt_chain("z" + text[1:]), a) == 0
    assert request_chain({"prompt": [text]}) == (a, 1) and request_chain({"prompt": text}) == (a, 1)
    assert request_chain({"prompt": list(range(200))})[0] == prompt_chain(list(range(200)))
    assert request_chain({"prompt": ["a", "b"]}) is None and request_chain({"input": "x"}) is None
    msgs = [SYSTEM, {"role": "user", "content": "hi"}]
    assert request_chain({"messages": msgs}) == (message_chain(msgs), 2)


def test_chain_matching():
    a = message_chain([SYSTEM, {"role": "user", "content": "hi"}])
    b = message_chain([SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    c = message_chain([SYSTEM, {"role": "user", "content": "hello"}])
    assert common_prefix(b, a) == 2 and common_prefix(c, a) == 1 and common_prefix([], a) == 0


def test_plan_shows_the_disk_cache(tmp_path):
    from tests.conftest import run_cli

    r = run_cli("plan", "--engine", "llama.cpp", "--prompt-cache-dir", str(tmp_path / "pc"), "--prompt-cache-gb", "2",
                "--json")
    plan = json.loads(r.stdout)
    assert plan["prompt_cache_bytes"] == 2 * 2**30 and plan["prompt_cache_dir"].startswith(str(tmp_path / "pc"))
    assert "--slot-save-path" in plan["command"]
    assert any(x["topic"] == "prompt-cache-disk" for x in plan["reasons"])
    r = run_cli("plan", "--engine", "llama-cpp-python", "--prompt-cache-dir", str(tmp_path / "pc"))
    assert "--prompt-cache-dir is ignored" in r.stdout + r.stderr or r.returncode != 0


def _fake_state(store: DiskStore, name: str, size: int, chain: list[str]) -> None:
    import struct

    tmp = store.tmp_name()
    with open(os.path.join(store.dir, tmp), "wb") as f:
        f.write(struct.pack("<III", 0x67677371, 3, 5) + b"\0" * (size - 12))
    store.commit(tmp, name, chain, 5)


def test_lru_cap_removes_other_keys_then_least_recently_used(tmp_path):
    import time as _t

    old = DiskStore(str(tmp_path / "pc" / "ctx2048-f16-old"), 10_000, Stats())
    _fake_state(old, "stale", 3000, ["s"])
    store = DiskStore(str(tmp_path / "pc" / "ctx4096-f16-new"), 10_000, Stats())
    _fake_state(store, "a", 3000, ["a"])
    _t.sleep(0.02)
    _fake_state(store, "b", 3000, ["b"])
    assert set(store.entries()) == {"a", "b"} and set(old.entries()) == {"stale"}
    _t.sleep(0.02)
    store.touch("a")  # a restore: a is now the most recently used
    _fake_state(store, "c", 3000, ["c"])  # 12,000 > cap: the other key's state goes first
    assert set(old.entries()) == set() and set(store.entries()) == {"a", "b", "c"}
    _fake_state(store, "d", 3000, ["d"])  # then the least recently used: b
    assert set(store.entries()) == {"a", "c", "d"}
    assert store.lookup(message_chain([SYSTEM])) == (None, 0)
    assert store.check("a")["n_tokens"] == 5
