"""`hybridinfer bench` against a real `hybridinfer serve` on the tiny model, and against endpoints that fail."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from served import Served, free_port

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    s = Served(["--gguf", tiny_model, "--parallel", "4", "--threads", "2"], tmp_path_factory.mktemp("bench"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def sweep(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "bench.json"
    png = out.with_suffix(".png")
    r = run_cli("bench", "--url", server.url + "/v1", "--concurrency", "1,2,4", "--requests", "6", "--max-tokens", "16",
                "--prompt-tokens", "40", "--json", str(out), "--plot", str(png), timeout=300)
    assert r.returncode == 0, r.stderr
    return r, json.loads(out.read_text()), png


def test_sweep_completes_with_consistent_metrics(sweep):
    r, rep, png = sweep
    assert rep["schema"] == "hybridinfer.bench/1"
    assert rep["prompt_tokens_counted_by"] == "server /tokenize"
    levels = rep["runs"][0]["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2, 4]
    for lv in levels:
        assert lv["completed"] == 6 and lv["failed"] == 0 and lv["first_error"] is None
        s = lv["samples"]
        assert len(s) == 6
        assert lv["total_output_tokens"] == sum(x["output_tokens"] for x in s) == 6 * 16  # ignore_eos: exactly max
        assert lv["total_reasoning_tokens"] + lv["total_answer_tokens"] == lv["total_output_tokens"]
        assert lv["total_input_tokens"] == sum(x["prompt_tokens"] for x in s)
        for x in s:
            assert 0 < x["ttft_s"] <= x["e2e_s"]
            assert len(x["itl_s"]) == x["chunks"] - 1
            assert 40 < x["prompt_tokens"] <= 48  # 40 content tokens sized by /tokenize, + the chat template
        assert len({x["prompt_tokens"] for x in s}) == 1
        assert lv["output_throughput"] == pytest.approx(lv["total_output_tokens"] / lv["duration"])
        assert lv["request_throughput"] == pytest.approx(6 / lv["duration"])
        assert lv["total_token_throughput"] == pytest.approx(
            (lv["total_input_tokens"] + lv["total_output_tokens"]) / lv["duration"])
        for m in ("ttft", "tpot", "itl", "e2el"):
            assert lv[f"median_{m}_ms"] <= lv[f"p90_{m}_ms"] <= lv[f"p99_{m}_ms"]
        assert lv["median_ttft_ms"] <= lv["median_e2el_ms"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "out tok/s" in r.stdout and "TTFT" in r.stdout


def test_json_schema_is_the_documented_one(sweep):
    _, rep, _ = sweep
    text = (ROOT / "docs" / "benchmarking.md").read_text()
    m = re.search(r"<!-- bench-schema -->\s*```json\n(.*?)```", text, re.S)
    assert m, "docs/benchmarking.md documents the bench JSON schema"
    doc = json.loads(m.group(1))
    assert set(rep) == set(doc)
    assert set(rep["runs"][0]) >= set(doc["runs"][0]) - {"warmup_failed"}
    assert set(rep["runs"][0]["levels"][0]) == set(doc["runs"][0]["levels"][0])
    assert set(rep["runs"][0]["levels"][0]["samples"][0]) == set(doc["runs"][0]["levels"][0]["samples"][0])
    assert set(rep["config"]) == set(doc["config"])


# --- failing endpoints ------------------------------------------------------------------------------------

class _Bad(BaseHTTPRequestHandler):
    mode = "500"
    n = 0

    def log_message(self, *a):
        pass

    def _json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._json(200, {"object": "list", "data": [{"id": "m", "object": "model"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        cls = type(self)
        cls.n += 1
        if self.path.endswith("/tokenize"):
            return self._json(404, {"error": {"message": "no"}})
        if cls.mode == "500" or (cls.mode == "flaky" and cls.n % 2 == 0):
            return self._json(500, {"error": {"message": "backend exploded", "type": "server_error"}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chunk = {"choices": [{"index": 0, "delta": {"content": "tok"}, "finish_reason": None}]}
        for _ in range(3):
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        if cls.mode == "cut":
            self.close_connection = True
            return  # the stream ends without [DONE]
        self.wfile.write(b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}\n\ndata: [DONE]\n\n')


def _bad_server(mode):
    cls = type(f"Bad_{mode}", (_Bad,), {"mode": mode, "n": 0})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), cls)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/v1"


@pytest.mark.parametrize("mode,reason", [("refused", "connection failed"), ("500", "HTTP 500: backend exploded"),
                                         ("cut", "stream ended before [DONE]")])
def test_every_request_failing_is_counted_and_exits_nonzero(tmp_path, mode, reason):
    httpd = None
    if mode == "refused":
        url = f"http://127.0.0.1:{free_port()}/v1"
    else:
        httpd, url = _bad_server(mode)
    out = tmp_path / "r.json"
    try:
        r = run_cli("bench", "--url", url, "--model", "m", "--requests", "4", "--concurrency", "1,2",
                    "--json", str(out), timeout=120)
    finally:
        if httpd:
            httpd.shutdown()
    assert r.returncode == 1, r.stderr
    assert "every request failed" in r.stderr and reason in r.stderr and "Traceback" not in r.stderr
    rep = json.loads(out.read_text())
    for lv in rep["runs"][0]["levels"]:
        assert lv["failed"] == 4 and lv["completed"] == 0
        assert reason in lv["first_error"] and sum(lv["errors"].values()) == 4
        assert all(not s["ok"] and reason in s["error"] for s in lv["samples"])


def test_partial_failures_are_counted_and_run_succeeds(tmp_path):
    httpd, url = _bad_server("flaky")
    out = tmp_path / "r.json"
    try:
        r = run_cli("bench", "--url", url, "--requests", "6", "--warmup", "0", "--json", str(out), timeout=120)
    finally:
        httpd.shutdown()
    assert r.returncode == 0, r.stderr
    lv = json.loads(out.read_text())["runs"][0]["levels"][0]
    assert lv["completed"] == 3 and lv["failed"] == 3 and "backend exploded" in lv["first_error"]
    assert lv["total_output_tokens"] == 9  # usage from the server, failed requests not counted
    assert "first error" in r.stdout + r.stderr


def test_no_url_starts_serve_itself_with_engine_bench(tmp_path, tiny_model):
    out = tmp_path / "r.json"
    r = run_cli("bench", "--gguf", tiny_model, "--requests", "3", "--max-tokens", "8", "--engine-bench",
                "--engine-bench-prompt", "64", "--json", str(out), timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["runs"][0]["levels"][0]["completed"] == 3
    tests = {x["test"]: x["tokens_per_s"] for x in rep["engine_bench"]["results"]}
    assert set(tests) == {"pp64", "tg8"} and all(v > 0 for v in tests.values())
    assert "llama-bench" in " ".join(rep["engine_bench"]["command"])
    assert "engine (llama-bench, same placement)" in r.stdout


@pytest.mark.parametrize("args,fragment", [(["--concurrency", "0"], "--concurrency '0'"),
                                           (["--request-rate", "fast"], "--request-rate 'fast'"),
                                           (["--dataset", "/nonexistent.jsonl"], "does not exist"),
                                           (["--json", "/nonexistent/dir/x.json"], "directory does not exist")])
def test_bad_arguments_one_line(args, fragment):
    r = run_cli("bench", "--url", "http://127.0.0.1:9/v1", *args)
    assert r.returncode == 2 and fragment in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_completions_prompts_are_exactly_sized(server, tmp_path):
    out = tmp_path / "r.json"
    r = run_cli("bench", "--url", server.url + "/v1", "--completions", "--requests", "4", "--prompt-tokens", "64",
                "--max-tokens", "4", "--json", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    s = json.loads(out.read_text())["runs"][0]["levels"][0]["samples"]
    assert [x["prompt_tokens"] for x in s] == [65] * 4  # 64 + BOS


def test_dataset_file(server, tmp_path):
    ds = tmp_path / "p.jsonl"
    ds.write_text('{"prompt": "one two three"}\n{"messages": [{"role": "user", "content": "four five"}]}\n')
    out = tmp_path / "r.json"
    r = run_cli("bench", "--url", server.url + "/v1", "--dataset", str(ds), "--requests", "4", "--max-tokens", "4",
                "--completions", "--json", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    lv = json.loads(Path(out).read_text())["runs"][0]["levels"][0]
    assert lv["completed"] == 4 and lv["total_output_tokens"] <= 16


def test_poisson_arrivals_and_duration(server, tmp_path):
    out = tmp_path / "r.json"
    r = run_cli("bench", "--url", server.url + "/v1", "--request-rate", "40", "--concurrency", "2", "--requests", "6",
                "--max-tokens", "4", "--json", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    lv = rep["runs"][0]["levels"][0]
    assert rep["config"]["request_rate"] == 40 and lv["request_rate"] == 40 and lv["completed"] == 6
    starts = sorted(s["start_s"] for s in lv["samples"])
    assert starts[-1] > 0  # arrivals spread over time, not all at t=0
    r = run_cli("bench", "--url", server.url + "/v1", "--duration", "1.5", "--concurrency", "2", "--max-tokens", "4",
                "--json", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    lv = rep["runs"][0]["levels"][0]
    assert rep["config"]["duration"] == 1.5 and rep["config"]["requests"] is None
    assert lv["completed"] >= 2 and max(s["start_s"] for s in lv["samples"]) < 1.5


def test_prompts_are_deterministic_per_seed():
    import asyncio
    import random

    from hybridinfer.bench.load import random_prompts

    a = asyncio.run(random_prompts(4, 32, random.Random(7)))
    b = asyncio.run(random_prompts(4, 32, random.Random(7)))
    c = asyncio.run(random_prompts(4, 32, random.Random(8)))
    assert a == b and a != c and all(len(p.split()) == 32 for p in a)  # estimate: one word per token


def test_without_a_tokenizer_the_count_is_an_estimate(tmp_path):
    httpd, url = _bad_server("flaky")
    out = tmp_path / "r.json"
    try:
        run_cli("bench", "--url", url, "--requests", "2", "--warmup", "0", "--json", str(out), timeout=60)
    finally:
        httpd.shutdown()
    assert json.loads(out.read_text())["prompt_tokens_counted_by"].startswith("estimate")
