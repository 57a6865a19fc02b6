"""`hybridinfer serve` running a KTransformers plan through the shared supervised-server runner, end to end over
real loopback HTTP with the official openai client.

KTransformers itself needs CUDA, so the engine process is a STAND-IN (tests/kt_standin.py) that answers with the
response shapes recorded from the real server's source at that release — after running the release's real
`args.py` on the exact argv hybridinfer launches (so a launch argv the release rejects fails this test).
"""

import json
import os
import stat
import sys
from pathlib import Path

import httpx
import pytest

import kt_source
from conftest import ROOT, run_cli
from served import Served, read_stream

STANDIN = Path(__file__).with_name("kt_standin.py")
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module", params=["v0.2.1", "v0.4.1"])
def kt(request, tmp_path_factory, shapes_dir):
    tag = request.param
    if tag not in kt_source.SDISTS and not kt_source.have_mirror():
        pytest.skip("needs a git mirror of kvcache-ai/ktransformers (HYBRIDINFER_KT_GIT) for this release")
    d = tmp_path_factory.mktemp(f"kt-{tag}")
    model_dir = d / "DeepSeek-R1"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["DeepseekV3ForCausalLM"]}))
    profile = json.loads((ROOT / "benchmarks/hardware/xeon4-ddr5-4090.json").read_text())
    for e in profile["engines"]:
        if e["name"] == "ktransformers":
            e["version"] = tag
    (d / "hw.json").write_text(json.dumps(profile))
    gguf = shapes_dir["r1-ud-iq1_s" if tag == "v0.4.1" else "r1-ud-iq1_s-legacy"]
    r = run_cli("plan", "--hardware", str(d / "hw.json"), "--gguf", gguf, "--engine", "ktransformers",
                "--kt-model-dir", str(model_dir), "--ctx", "4096", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["command"][0] == "ktransformers"
    # The stand-in takes the place of the `ktransformers` console script; everything after argv[0] is as planned.
    tree = kt_source.tree(tag, d / "trees")
    shim = d / "bin" / "ktransformers"
    shim.parent.mkdir()
    env = {"KT_TAG": tag, "KT_TREE": str(tree), "HOME": str(d / "home"),
           "PYTHONPATH": os.pathsep.join([str(tree), str(d / "trees" / "_stubs"), str(ROOT)])}
    shim.write_text("#!/bin/sh\n" + "".join(f"export {k}='{v}'\n" for k, v in env.items())
                    + f"exec '{sys.executable}' '{STANDIN}' \"$@\"\n")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    (d / "home").mkdir()
    plan["command"][0] = str(shim)
    (d / "plan.json").write_text(json.dumps(plan))
    s = Served(["--plan", str(d / "plan.json"), "--alias", "r1"], d)
    yield tag, s, plan
    s.stop()


def test_banner_and_models(kt):
    tag, s, plan = kt
    text = "\n".join(s.lines)
    assert "plan: engine ktransformers" in text
    assert f"stand-in KTransformers {tag} server" in Path(s.log).read_text()
    assert [m.id for m in s.client().models.list().data] == ["r1"]
    argv = next(ln for ln in s.lines if "--optimize_config_path" in ln)
    assert "--model_name r1" in argv and "--host 127.0.0.1" in argv  # the only changes to plan.command


def test_stream_reasoning_usage_and_max_tokens(kt):
    tag, s, plan = kt
    c = s.client()
    reasoning, content, finish, usage = read_stream(
        c.chat.completions.create(model="r1", messages=MSG, stream=True, max_tokens=7))
    # --force_think: the output starts inside the thought; R1's answer follows </think>
    assert reasoning.strip() == "Let me think." and content.strip() == "Hello"
    assert finish == "length"  # v0.2.1 ignores max_tokens: the runner stopped reading at 7 and hung up
    assert usage.completion_tokens == 7 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + 7


def test_non_stream(kt):
    tag, s, plan = kt
    r = s.client().chat.completions.create(model="r1", messages=MSG, max_tokens=9)
    assert r.choices[0].message.reasoning_content.strip() == "Let me think."
    assert r.choices[0].message.content.strip() == "Hello there!"
    assert r.usage.completion_tokens == 9 and r.object == "chat.completion"


def test_bad_request_is_a_4xx_and_the_server_stays_up(kt):
    tag, s, plan = kt
    r = httpx.post(s.url + "/v1/chat/completions", json={"model": "r1", "messages": "nope"})
    assert 400 <= r.status_code < 500
    assert httpx.get(s.url + "/health").status_code == 200


@pytest.fixture(scope="module")
def sglang(tmp_path_factory, shapes_dir):
    """kt-sglang's plan, run by `serve` with the same runner; SGLang is the stand-in's sglang mode (its real parser
    checks the launch argv first)."""
    d = tmp_path_factory.mktemp("kt-sglang")
    model_dir = d / "DeepSeek-R1"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["DeepseekV3ForCausalLM"]}))
    r = run_cli("plan", "--hardware", "xeon4-ddr5-4090", "--gguf", shapes_dir["r1-ud-iq1_s"], "--engine", "kt-sglang",
                "--kt-model-dir", str(model_dir), "--ctx", "4096", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["command"][:3] == ["python", "-m", "sglang.launch_server"]
    shim = d / "bin" / "python-sglang"
    shim.parent.mkdir()
    env = {"KT_TAG": "sglang", "SGLANG_FLAVOR": "sglang-kt", "SGLANG_TREES": str(d / "sglang"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(ROOT)])}
    shim.write_text("#!/bin/sh\n" + "".join(f"export {k}='{v}'\n" for k, v in env.items())
                    + f"exec '{sys.executable}' '{STANDIN}' \"$@\"\n")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    plan["command"][0] = str(shim)
    (d / "plan.json").write_text(json.dumps(plan))
    s = Served(["--plan", str(d / "plan.json"), "--alias", "r1"], d)
    yield s
    s.stop()


def test_kt_sglang_serves_through_the_same_runner(sglang):
    s = sglang
    assert "stand-in SGLang server" in Path(s.log).read_text()
    argv = next(ln for ln in s.lines if "--kt-method" in ln)
    assert "--served-model-name r1" in argv and "--kt-method LLAMAFILE" in argv
    c = s.client()
    content, usage, finish = "", None, None
    for ch in c.chat.completions.create(model="r1", messages=MSG, stream=True, max_tokens=9):
        usage = ch.usage or usage
        for choice in ch.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert "Hello there!" in content and finish == "length"
    assert usage.completion_tokens == 9 and usage.prompt_tokens == 11  # SGLang's own counts, passed through
