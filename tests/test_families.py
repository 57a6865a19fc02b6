"""Every giant-MoE family's tiny random-weights model: written, inspected, planned, its placement rules compiled to
llama.cpp's first-match -ot semantics, served by each engine that knows the architecture and answered through the
official openai client; and each family's reasoning format split — on crafted engine output and on the real
engine's output forced into shape by a grammar (random weights write random text)."""
import re

import pytest

from hybridinfer import rules
from hybridinfer.demo.families import FAMILIES, ensure_family
from hybridinfer.engines.llamacpp_args import apply, compile_placement
from hybridinfer.archs.base import GENERIC
from hybridinfer.inspect_gguf import inspect
from hybridinfer.plan import PlanOptions, make_plan
from hybridinfer.probe import load_profile
from hybridinfer.server.reasoning import (HarmonySplitter, PlainSplitter, ThinkSplitter, reasoning_format,
                                          split_with, splitter_for)

from conftest import run_cli
from served import Served, read_stream

GIB = 1024**3
NAMES = [n for n in FAMILIES if n != "deepseek2"]  # deepseek2 is the demo model every other test runs
ARCH = {"qwen3moe": "qwen3moe", "glm4moe": "glm4moe", "gpt-oss": "gpt-oss", "qwen3next": "qwen3next",
        "deepseek32": "deepseek32"}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Each family's model, written once for the module (about a second for all)."""
    d = tmp_path_factory.mktemp("families")
    out = {}
    for name in NAMES:
        path = str(d / f"tiny-{name}.gguf")
        FAMILIES[name].write(path, 0)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def infos(written):
    return {n: inspect(p) for n, p in written.items()}


# --- crafted engine output ------------------------------------------------------------------------------------------

def _by_char(cls, text, starts_in_think=False):
    sp, r, c = cls(starts_in_think), "", ""
    for ch in text:
        a, b = sp.feed(ch)
        r, c = r + a, c + b
    a, b = sp.flush()
    return r, c


HARMONY_CASES = [
    # raw text, every header present (ik_llama.cpp's chat, any engine's /v1/completions)
    ("<|channel|>analysis<|message|>the user greets<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|return|>",
     "the user greets", "Hello!"),
    # llama-server's chat with --reasoning-format none: the final header already consumed by its parser
    ("<|channel|>analysis<|message|>think a bit<|end|>The answer.", "think a bit", "The answer."),
    # <|end|> hidden by llama.cpp's detokenizer (control token): the next <|start|> ends the message
    ("<|channel|>analysis<|message|>hmm<|start|>assistant<|channel|>final<|message|>ok", "hmm", "ok"),
    # two analysis messages, then the answer
    ("<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>analysis<|message|>b<|end|>"
     "<|start|>assistant<|channel|>final<|message|>c", "ab", "c"),
    # cut off at max_tokens inside the thought / inside a header
    ("<|channel|>analysis<|message|>still thinking", "still thinking", ""),
    ("<|channel|>analysis<|message|>t<|end|><|start|>assistant<|channel|>fin", "t", ""),
    # structured output: a constrained final message
    ("<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>final <|constrain|>json<|message|>{\"a\": 1}",
     "x", "{\"a\": 1}"),
    # no harmony at all: an answer
    ("plain text < with | brackets >", "", "plain text < with | brackets >"),
]


@pytest.mark.parametrize("text,reasoning,content", HARMONY_CASES)
def test_harmony_split_whole_and_streamed_agree(text, reasoning, content):
    whole = split_with("harmony", text)
    assert whole == (reasoning or None, content)
    assert _by_char(HarmonySplitter, text) == (reasoning, content)
    for cut in range(1, len(text)):  # any two-chunk split
        sp = HarmonySplitter()
        a1, b1 = sp.feed(text[:cut])
        a2, b2 = sp.feed(text[cut:])
        a3, b3 = sp.flush()
        assert (a1 + a2 + a3, b1 + b2 + b3) == (reasoning, content), cut
    for part in (reasoning, content):
        assert not re.search(r"<\|(channel|message|start|end|return|constrain)\|>", part) or part.startswith("{")


def test_harmony_tool_calls_and_preambles_pass_through_unmangled():
    call = '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>'
    text = "<|channel|>analysis<|message|>need the weather<|end|>" + call
    assert split_with("harmony", text) == ("need the weather", call)
    assert _by_char(HarmonySplitter, text) == ("need the weather", call)
    # recipient in the role header
    call2 = '<|start|>assistant to=functions.f<|channel|>commentary json<|message|>{}<|call|>'
    assert split_with("harmony", "<|channel|>analysis<|message|>r<|end|>" + call2) == ("r", call2)
    # a preamble on the commentary channel is kept whole, then the answer
    pre = "<|channel|>commentary<|message|>Let me check.<|end|>"
    assert split_with("harmony", pre + "<|start|>assistant<|channel|>final<|message|>Done") == (None, pre + "Done")


def test_think_and_none_splitters():
    # Qwen3 / GLM-4.5 write <think> themselves; Qwen3-Next-Thinking's template opens it in the prompt
    assert _by_char(ThinkSplitter, "<think>\nplan</think>\n\nanswer") == ("plan", "answer")
    assert _by_char(ThinkSplitter, "plan\n</think>\n\nanswer", True) == ("plan\n", "answer")
    assert _by_char(PlainSplitter, "<think>x</think>y") == ("", "<think>x</think>y")
    assert split_with("none", "abc") == (None, "abc")


def test_templates_that_open_the_thought():
    from hybridinfer.demo import families as f, tiny
    assert GENERIC.opens_think(tiny.CHAT_TEMPLATE) and GENERIC.opens_think(f.QWEN3_THINKING_TEMPLATE)
    # an empty thought closed in the prompt (enable_thinking=false) does not open one
    assert not GENERIC.opens_think(f.QWEN3_TEMPLATE) and not GENERIC.opens_think(f.GLM45_TEMPLATE)
    assert not GENERIC.opens_think(f.HARMONY_TEMPLATE)


def test_splitter_chosen_from_the_model(infos):
    want = {"qwen3moe": "think", "glm4moe": "think", "gpt-oss": "harmony", "qwen3next": "think", "deepseek32": "think"}
    for name, m in infos.items():
        assert reasoning_format(m) == want[name] == FAMILIES[name].reasoning
    assert splitter_for(infos["gpt-oss"]) is HarmonySplitter

    generic = type("M", (), {"arch": "llama"})()  # no family of its own: <think> is split, a no-op without one
    assert reasoning_format(generic) == "think"
    assert {n: infos[n].opens_think for n in infos} == {"qwen3moe": False, "glm4moe": False, "gpt-oss": False,
                                                         "qwen3next": True, "deepseek32": True}


# --- write, inspect, plan, compile ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_written_and_inspected(name, infos):
    m = infos[name]
    assert m.arch == ARCH[name] and m.is_moe and m.expert_count == 8 and m.expert_used_count == 2
    names = {t.name for t in m.tensors}
    experts = [t for t in m.tensors if t.cls == "routed_experts" and t.name.endswith(".weight")]
    assert len(experts) == 3 * len(m.moe_blocks) and m.kv.bytes_per_token["f16"] > 0
    if name == "gpt-oss":
        assert {t.type for t in experts} == {"MXFP4"} and "blk.0.attn_sinks.weight" in names
        assert "blk.3.ffn_down_exps.bias" in names
    if name == "glm4moe":
        assert "blk.3.nextn.eh_proj.weight" in names and "blk.0.ffn_gate.weight" in names  # NextN + dense lead
    if name == "qwen3next":
        assert {"blk.0.ssm_conv1d.weight", "blk.0.ssm_a", "blk.3.attn_q.weight"} <= names
        assert "blk.3.ssm_a" not in names  # every fourth layer is full attention
    if name == "deepseek32":
        assert {"blk.1.indexer.proj.weight", "blk.1.indexer.attn_q_b.weight", "blk.1.attn_k_b.weight"} <= names


def test_demo_cli_writes_each_family(tmp_path):
    r = run_cli("demo", "--help")
    assert all(n in r.stdout for n in FAMILIES)
    r = run_cli("demo", "--family", "gpt-oss", env={"HYBRIDINFER_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip()
    assert path.startswith(str(tmp_path)) and inspect(path).arch == "gpt-oss"
    r = run_cli("inspect", "--gguf", path)
    assert r.returncode == 0 and "gpt-oss" in r.stdout


@pytest.mark.parametrize("name", NAMES)
def test_plan_and_rules_compile_first_match(name, infos):
    m = infos[name]
    hw = load_profile("desktop-4090")
    plan = make_plan(hw, m, PlanOptions(ctx=4096))
    assert plan.command and set(plan.device_of) == {t.name for t in m.tensors}
    names = [t.name for t in m.tensors]
    fixed = sum(t.nbytes for t in m.tensors if t.cls not in ("routed_experts", "token_embd", "nextn"))  # what the GPU holds
    per_block = sum(t.nbytes for t in m.tensors if t.cls == "routed_experts" and t.block == m.moe_blocks[0])
    for rn, budgets in (("moe-experts-on-cpu", {"gpu:0": 2 * GIB}),
                        ("moe-auto-fill", {"gpu:0": fixed + per_block + 1}),
                        ("layer-split", {"gpu:0": fixed // 2}),
                        ("multi-gpu", {"gpu:0": fixed, "gpu:1": fixed})):
        dev = rules.resolve(rules.load(rn), m, budgets).device_of
        c = compile_placement(dev, m.block_count)
        assert c.placement(names) == dev, rn
        # compiled to rules, not to the one-regex-per-tensor fallback
        assert len(c.overrides) <= 4, (rn, c.overrides)
        if rn == "moe-experts-on-cpu":
            assert all(dev[t.name] == "cpu" for t in m.tensors if t.cls == "routed_experts")
            # an MTP block (nextn, which llama.cpp loads only to draft) stays on the CPU: one more rule than --cpu-moe
            assert c.cpu_moe or any(t.cls == "nextn" for t in m.tensors)
            assert apply(names, c.overrides, c.ngl, m.block_count) == dev
        if rn == "moe-auto-fill":
            on_gpu = {t.block for t in m.tensors if t.cls == "routed_experts" and dev[t.name] == "gpu:0"}
            assert on_gpu == {m.moe_blocks[0]}


# --- served by each engine ------------------------------------------------------------------------------------------

def _ik_installed() -> bool:
    from hybridinfer.engines import get
    return bool(get("ik_llama.cpp").binary())


# The real engine's output forced into each family's reasoning shape (ASCII only: ik's chat endpoint answers 500 on
# byte tokens that split UTF-8 characters). Text literals: the same characters the special tokens render as.
WORD = '[a-z ]{3,12}'
SHAPE = {
    "think": f'root ::= "<think>" {WORD} "</think>" {WORD}',
    "think-open": f'root ::= {WORD} "</think>" {WORD}',  # the template opened <think> in the prompt
    "harmony": f'root ::= "<|channel|>analysis<|message|>" {WORD} "<|end|><|start|>assistant<|channel|>final<|message|>" {WORD}',
}
MSG = [{"role": "user", "content": "hello world"}]
CASES = [(n, e) for n in NAMES for e in ("llama.cpp", "ik_llama.cpp") if e == "llama.cpp" or FAMILIES[n].ik]


@pytest.fixture(scope="module")
def servers(written, tmp_path_factory):
    started: dict = {}

    def get(name, engine):
        if (name, engine) not in started:
            if engine == "ik_llama.cpp" and not _ik_installed():
                pytest.skip("ik_llama.cpp is not installed (./install.sh builds it)")
            for key in list(started):  # one engine at a time on a 2-core box
                started.pop(key).stop()
            started[(name, engine)] = Served(["--engine", engine, "--gguf", written[name], "--ctx", "2048",
                                              "--threads", "2", "--alias", name], tmp_path_factory.mktemp("fam"))
        return started[(name, engine)]
    yield get
    for s in started.values():
        s.stop()


@pytest.mark.engine
@pytest.mark.parametrize("name,engine", CASES)
def test_served_answers_and_splits(name, engine, servers, infos, tmp_path):
    s = servers(name, engine)
    assert f"plan: engine {engine}" in "\n".join(s.lines)
    c = s.client()
    assert [m.id for m in c.models.list().data] == [name]
    kind = FAMILIES[name].reasoning
    shape = SHAPE["think-open" if infos[name].opens_think else kind]
    req = dict(model=name, messages=MSG, temperature=0, max_tokens=200,
               extra_body={"grammar": shape, "ignore_eos": False})
    r = c.chat.completions.create(**req)
    msg = r.choices[0].message
    assert r.usage.completion_tokens > 0
    words = re.compile(r"^[a-z ]{3,12}$")
    assert words.match(msg.reasoning_content or ""), (msg.reasoning_content, msg.content)
    assert words.match((msg.content or "").lstrip("\n")), (msg.reasoning_content, msg.content)
    # the same engine output streamed: the same split
    reasoning, content, finish, usage = read_stream(c.chat.completions.create(stream=True, **req))
    assert (reasoning, content) == (msg.reasoning_content, msg.content or "")
    # and the raw text the engine sent, split here, is the same again
    raw = c.chat.completions.create(**{**req, "extra_body": {**req["extra_body"], "reasoning_format": "raw"}})
    text = raw.choices[0].message.content
    assert split_with(kind, text) == (msg.reasoning_content, msg.content or "")
    # and a plain request gets an answer (llama-server's chat answers 500 when a gpt-oss model's output is not
    # harmony at all — common/parsers/gpt-oss.cpp — which a real model's never is: that family keeps the shape)
    plain = shape if kind == "harmony" else f"root ::= {WORD}"
    r = c.chat.completions.create(model=name, messages=MSG, max_tokens=60, temperature=0,
                                  extra_body={"grammar": plain})
    m = r.choices[0].message
    assert r.usage.completion_tokens > 0
    assert (m.reasoning_content if infos[name].opens_think else m.content)  # a thought the template opened, unclosed
    if engine == "llama.cpp":  # `hybridinfer bench` against it (/v1/completions: raw text, no chat parser)
        import json
        out = tmp_path / "bench.json"
        r = run_cli("bench", "--url", s.url + "/v1", "--completions", "--requests", "3", "--max-tokens", "8",
                    "--prompt-tokens", "32", "--json", str(out), timeout=180)
        assert r.returncode == 0, r.stderr
        lv = json.loads(out.read_text())["runs"][0]["levels"][0]
        assert lv["completed"] == 3 and lv["failed"] == 0 and lv["total_output_tokens"] == 3 * 8


# --- on a real second device: llama.cpp's rpc-server on loopback stands in for a GPU (tests/test_rpc.py) -------------

@pytest.mark.engine
@pytest.mark.parametrize("rn", ["moe-experts-on-cpu", "moe-auto-fill"])
def test_rules_on_an_rpc_device(rn, infos):
    from hybridinfer.engines import llamacpp_log
    from test_rpc import Workers, _check, _profile, needs_rpc

    if needs_rpc.args[0]:
        pytest.skip(needs_rpc.kwargs["reason"])
    m = infos["qwen3moe"]
    workers = Workers()
    try:
        ep = workers.start()
        plan = make_plan(_profile([ep], [2 * GIB]), m, PlanOptions(rules="moe-experts-on-cpu", ctx=4096))
        if rn == "moe-auto-fill":  # room for the attention side plus one and a half blocks of experts
            per_block = sum(t.nbytes for t in m.tensors if t.cls == "routed_experts" and t.block == 0)
            gpu = next(d for d in plan.devices if d.device == "gpu:0")
            vram = gpu.total - gpu.runtime + int(0.75 * GIB) + int(1.5 * per_block)
            plan = make_plan(_profile([ep], [vram]), m, PlanOptions(rules=rn, ctx=4096))
        text, _ = llamacpp_log.load(plan)
        r = _check(plan, text)
        kv = {row.device: row.measured for row in r["memory"] if row.kind == "kv"}
        assert kv["gpu:0"] > 0 and kv.get("cpu", 0) == 0
        on_dev = {t.block for t in m.tensors if t.cls == "routed_experts" and plan.device_of[t.name] == "gpu:0"}
        assert on_dev == (set() if rn == "moe-experts-on-cpu" else {0}), (rn, on_dev)
        assert all(plan.device_of[t.name] == "gpu:0" for t in m.tensors if t.cls == "attention")
    finally:
        workers.stop_all()


@pytest.mark.engine
def test_engines_leave_the_mtp_block_unloaded_as_planned():
    """GLM's MTP block (blk.3 of the tiny glm4moe) as the real engines load it: llama.cpp names each of its tensors
    unused and ignores it; ik_llama.cpp's CPU buffer is the file's tensors minus the block, what the plan reserves."""
    import subprocess
    import time

    from hybridinfer.engines.binaries import find_llama_binary
    from tests.served import free_port

    path = ensure_family("glm4moe")
    m = inspect(path)
    nextn = [t for t in m.tensors if t.cls == "nextn"]
    assert nextn and all(t.block == m.block_count - 1 for t in nextn)
    for binary in ("llama-server", "ik-llama-server"):
        exe = find_llama_binary(binary)
        if not exe:
            continue
        engine = "llama.cpp" if binary == "llama-server" else "ik_llama.cpp"
        cpu = next(d for d in make_plan(load_profile("epyc-cpu-only"), m, PlanOptions(engine=engine)).devices
                   if d.device == "cpu")
        assert cpu.weights == m.bytes - sum(t.nbytes for t in nextn)
        # read into RAM, as the plan runs it (ik: -rtr turns mmap off); mapped, a skipped tensor's pages are never read
        ram = ["--load-mode", "none"] if binary == "llama-server" else ["--no-mmap"]
        proc = subprocess.Popen([exe, "-m", path, "-c", "512", "-t", "1", "--port", str(free_port()), *ram],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines, deadline = [], time.time() + 60
        for line in proc.stdout:
            lines.append(line)
            if "listening" in line or "HTTP server listening" in line or time.time() > deadline:
                break
        proc.kill()
        proc.wait()
        log = "".join(lines)
        if binary == "llama-server":
            unused = set(re.findall(r"unused tensor (\S+) ", log))
            assert {t.name for t in nextn} <= unused, log[-2000:]
        else:
            mib = float(re.search(r"CPU buffer size =\s+([\d.]+) MiB", log).group(1))
            assert abs(mib * 2**20 - cpu.weights) < 0.01 * 2**20, (mib, cpu.weights)
