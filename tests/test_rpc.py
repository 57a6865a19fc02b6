"""Placement proven on a real second device: llama.cpp's rpc-server on loopback stands in for a GPU (a profile GPU
entry mapped to RPC0/RPC1 with a stated VRAM), the plan's own llama-server command runs with -v, and llama.cpp's
load log is compared with the plan tensor by tensor and byte by byte. Then `hybridinfer worker` + `serve --rpc`."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from hybridinfer.engines import llamacpp_log
from hybridinfer.inspect_gguf import inspect
from hybridinfer.plan import PlanOptions, make_plan
from hybridinfer.engines.binaries import find_llama_binary
from hybridinfer.probe import GpuInfo, load_profile

from conftest import run_cli

GIB = 1024**3
MIB = 1024**2
BIN = Path(sys.executable).parent
needs_rpc = pytest.mark.skipif(not (find_llama_binary("rpc-server") and find_llama_binary("llama-server")),
                               reason="needs llama.cpp's rpc-server and llama-server (./install.sh)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"worker on {port} did not listen")


class Workers:
    """`hybridinfer worker` processes on loopback (the real command, which execs llama.cpp's rpc-server)."""

    def __init__(self):
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self, port: int | None = None) -> str:
        port = port or _free_port()
        exe = str(BIN / "hybridinfer")
        p = subprocess.Popen([exe, "worker", "--port", str(port), "--threads", "1"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.procs[port] = p
        _wait_port(port)
        return f"127.0.0.1:{port}"

    def kill(self, endpoint: str) -> None:
        p = self.procs.pop(int(endpoint.rsplit(":", 1)[1]))
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()

    def stop_all(self) -> None:
        for port in list(self.procs):
            self.kill(f"127.0.0.1:{port}")


@pytest.fixture
def workers():
    w = Workers()
    yield w
    w.stop_all()


@pytest.fixture(scope="module")
def demo6(tmp_path_factory):
    """The demo architecture with 6 blocks (block 0 dense, 1-5 MoE): enough blocks to split and to auto-fill."""
    from hybridinfer.demo.tiny import write_tiny

    path = write_tiny(tmp_path_factory.mktemp("rpc") / "tiny6.gguf", blocks=6)
    return inspect(path)


def _profile(endpoints: list[str], vram: list[int]):
    hw = load_profile("ci-box")
    gpus = [GpuInfo(index=i, name=f"rpc-server {e} (stands in for a GPU)", vram_total=v, vram_free=v,
                    memory_bandwidth_gbs=20.0, device=f"RPC{i}", endpoint=e, network_gbs=5.0, network_rtt_ms=0.05)
            for i, (e, v) in enumerate(zip(endpoints, vram))]
    return replace(hw, gpus=gpus)


def _check(plan, text, weights_tol=0.05, kv_tol=0.05):
    r = llamacpp_log.compare(plan, text)
    assert r["mismatched"] == {}, r["mismatched"]
    assert r["tensors"] == len(plan.device_of)
    for row in r["memory"]:
        if row.kind == "weights" and row.device != "cpu":
            assert abs(row.ratio - 1) <= weights_tol, row
        if row.kind == "kv":
            assert (row.predicted == 0 and row.measured == 0) or abs(row.ratio - 1) <= kv_tol, row
    return r


def _fixed_and_experts(model):
    fixed = sum(t.nbytes for t in model.tensors if t.cls not in ("routed_experts", "token_embd"))
    per_block = sum(t.nbytes for t in model.tensors if t.cls == "routed_experts" and t.block == 1)
    return fixed, per_block


@needs_rpc
def test_attention_kv_shared_experts_on_device_routed_on_cpu(workers, demo6):
    ep = workers.start()
    plan = make_plan(_profile([ep], [2 * GIB]), demo6, PlanOptions(rules="moe-experts-on-cpu", ctx=4096))
    assert plan.command[plan.command.index("--rpc") + 1] == ep and "--cpu-moe" in plan.command
    text, rss = llamacpp_log.load(plan)
    r = _check(plan, text)
    kv = {row.device: row.measured for row in r["memory"] if row.kind == "kv"}
    assert kv["gpu:0"] > 0 and kv.get("cpu", 0) == 0  # the whole KV cache on the device
    for t in demo6.tensors:
        want = "cpu" if t.cls in ("routed_experts", "token_embd") else "gpu:0"
        assert plan.device_of[t.name] == want, t.name
    assert r["layer_devices"] == {i: "gpu:0" for i in range(7)}


@needs_rpc
def test_auto_fill_moves_early_blocks_experts(workers, demo6):
    ep = workers.start()
    plan0 = make_plan(_profile([ep], [2 * GIB]), demo6, PlanOptions(rules="moe-experts-on-cpu", ctx=4096))
    gpu = next(d for d in plan0.devices if d.device == "gpu:0")
    _, per_block = _fixed_and_experts(demo6)
    # a device with room for the attention side plus two and a half blocks of experts
    vram = gpu.total - gpu.runtime + int(0.75 * GIB) + int(2.5 * per_block)
    plan = make_plan(_profile([ep], [vram]), demo6, PlanOptions(rules="moe-auto-fill", ctx=4096))
    moved = sorted({t.block for t in demo6.tensors if t.cls == "routed_experts" and plan.device_of[t.name] != "cpu"})
    assert moved == [1, 2]
    text, _ = llamacpp_log.load(plan)
    _check(plan, text)
    log = llamacpp_log.parse(text)
    over = {n: b for n, b in log.overridden.items() if "_exps" in n}
    assert all(b.startswith("CPU") for n, b in over.items())  # the other blocks' experts: overridden to the CPU
    assert {int(n.split(".")[1]) for n in over} == {3, 4, 5}


@needs_rpc
def test_two_device_layer_split_kv_on_each(workers, demo6):
    eps = [workers.start(), workers.start()]
    total = sum(t.nbytes for t in demo6.tensors)
    # each device takes about half of the blocks (+ compute, KV, the 0.75 GiB margin)
    one = make_plan(_profile(eps[:1], [2 * GIB]), demo6, PlanOptions(rules="layer-split", ctx=4096))
    dev = next(d for d in one.devices if d.device == "gpu:0")
    vram = dev.compute + dev.kv_cache // 2 + int(0.75 * GIB) + int(total * 0.55)
    plan = make_plan(_profile(eps, [vram, vram]), demo6, PlanOptions(rules="layer-split", ctx=4096))
    layers = [plan.device_of[f"blk.{b}.attn_norm.weight"] for b in range(6)]
    assert "gpu:0" in layers and "gpu:1" in layers and layers == sorted(layers, key=lambda d: (d != "cpu", d))
    assert "-ts" in plan.command and "RPC0,RPC1" in plan.command
    text, _ = llamacpp_log.load(plan)
    r = _check(plan, text)
    kv = {row.device: (row.predicted, row.measured) for row in r["memory"] if row.kind == "kv"}
    assert kv["gpu:0"][1] > 0 and kv["gpu:1"][1] > 0  # KV buffers on both devices, as planned
    assert r["layer_devices"] == {i: d for i, d in enumerate(layers + [plan.device_of["output.weight"]])}


@needs_rpc
def test_multi_gpu_rules_over_two_devices(workers, demo6):
    eps = [workers.start(), workers.start()]
    fixed, per_block = _fixed_and_experts(demo6)
    side = make_plan(_profile(eps, [2 * GIB, 2 * GIB]), demo6, PlanOptions(rules="moe-experts-on-cpu", ctx=4096))
    dev = next(d for d in side.devices if d.device == "gpu:0")
    # each device: its half of the attention side, the KV of its layers, and room for about one block of experts
    vram = int(0.75 * GIB) + dev.compute + dev.kv_cache // 2 + fixed // 2 + int(1.5 * per_block)
    plan = make_plan(_profile(eps, [vram, vram]), demo6, PlanOptions(rules="multi-gpu", ctx=4096))
    text, _ = llamacpp_log.load(plan)
    r = _check(plan, text)
    kv = {row.device: row.measured for row in r["memory"] if row.kind == "kv"}
    assert kv["gpu:0"] > 0 and kv["gpu:1"] > 0 and kv.get("cpu", 0) == 0
    assert plan.device_of["output.weight"] == plan.device_of["output_norm.weight"] == "gpu:1"
    # each device holds experts only of its own blocks, the first ones of its range; the rest on the CPU
    on = {d: sorted({t.block for t in demo6.tensors if t.cls == "routed_experts" and plan.device_of[t.name] == d})
          for d in ("gpu:0", "gpu:1", "cpu")}
    assert on["gpu:0"] and on["gpu:1"] and on["cpu"], on
    for d in ("gpu:0", "gpu:1"):
        assert all(plan.device_of[f"blk.{b}.attn_norm.weight"] == d for b in on[d])


def test_unreachable_worker_is_one_line(tmp_path):
    port = _free_port()
    r = run_cli("plan", "--rpc", f"127.0.0.1:{port}")
    assert r.returncode == 2 and r.stdout == ""
    err = r.stderr.strip()
    assert "\n" not in err and f"RPC worker 127.0.0.1:{port} is unreachable" in err and "hybridinfer worker" in err


def test_worker_refuses_open_bind_without_flag():
    r = run_cli("worker", "--host", "0.0.0.0", "--port", str(_free_port()))
    assert r.returncode == 2 and "no authentication" in r.stderr and "--allow-network" in r.stderr


def _chat(base):
    import openai

    c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
    model = c.models.list().data[0].id
    out = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
    return out


def _health(base) -> tuple[int, dict]:
    import httpx

    try:
        r = httpx.get(base + "/health", timeout=5)
        return r.status_code, r.json()
    except httpx.HTTPError:
        return 0, {}


def _wait_health(base, code, timeout=90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = _health(base)
        if got[0] == code:
            return got
        time.sleep(0.3)
    raise TimeoutError(f"/health never {code}: {_health(base)}")


@needs_rpc
def test_serve_over_two_workers(workers, tmp_path):
    eps = [workers.start(), workers.start()]
    rpc = ",".join(eps)
    r = run_cli("plan", "--rpc", rpc, "--rules", "multi-gpu", "--ctx", "4096", "--json", "--placement")
    assert r.returncode == 0, r.stderr
    (tmp_path / "plan.json").write_text(r.stdout)
    d = json.loads(r.stdout)
    assert d["compiled"]["rpc_servers"] == eps and d["command"][d["command"].index("--rpc") + 1] == rpc
    assert [g for g in d["compiled"]["gpu_devices"].values()] == ["RPC0", "RPC1"]
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "engine.log"
    proc = subprocess.Popen([str(BIN / "hybridinfer"), "serve", "--plan", str(tmp_path / "plan.json"), "--port", str(port),
                             "--engine-log", str(log), "--engine-verbose"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_health(base, 200)
        out = _chat(base)
        assert out.choices[0].message is not None and out.usage.completion_tokens > 0
        # the plan's per-device memory is what the workers were asked to hold
        from hybridinfer.plan import Plan
        plan = Plan.from_json((tmp_path / "plan.json").read_text())
        res = _check(plan, log.read_text())
        meas = {(row.device, row.kind): row for row in res["memory"]}
        assert meas[("gpu:0", "weights")].measured > 0 and meas[("gpu:1", "weights")].measured > 0

        # a worker dies mid-serve: engine down (health truthful), then back when the worker is back
        workers.kill(eps[1])
        code, body = _wait_health(base, 503, timeout=30)
        assert body.get("status") in ("engine_down", "loading")
        import openai
        with pytest.raises(openai.APIStatusError):
            _chat(base)
        workers.start(int(eps[1].rsplit(":", 1)[1]))
        _wait_health(base, 200, timeout=120)
        assert _chat(base).usage.completion_tokens > 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_load_log_parser_on_a_recorded_log(demo6):
    """A recorded `llama-server -v` load log (tiny6, moe-experts-on-cpu on RPC0 at 127.0.0.1:36595): the parser
    reads layers, overrides and buffers, including the dry run llama.cpp does before the real load."""
    text = (Path(__file__).parent / "fixtures" / "llama-load" / "rpc0-moe-experts-on-cpu-tiny6.log").read_text()
    plan = make_plan(_profile(["127.0.0.1:36595"], [2 * GIB]), demo6, PlanOptions(rules="moe-experts-on-cpu", ctx=4096))
    r = llamacpp_log.compare(plan, text)
    assert r["mismatched"] == {} and r["log_devices"] == ["RPC0"]
    mem = {(row.device, row.kind): row for row in r["memory"]}
    assert mem[("gpu:0", "kv")].measured == mem[("gpu:0", "kv")].predicted == 28311552  # 6 layers x 576 x 2 B x 4096
    assert abs(mem[("gpu:0", "weights")].ratio - 1) < 0.01 and abs(mem[("cpu", "weights")].ratio - 1) < 0.01
    assert mem[("cpu", "kv")].measured == 0 and mem[("gpu:0", "compute")].ratio <= 1
    wrong = replace(plan, device_of={**plan.device_of, "blk.2.ffn_up_exps.weight": "gpu:0"})
    assert llamacpp_log.compare(wrong, text)["mismatched"] == {"blk.2.ffn_up_exps.weight": ("gpu:0", "cpu")}


@needs_rpc
def test_saved_plan_with_a_gone_worker_is_one_line(workers, tmp_path):
    ep = workers.start()
    r = run_cli("plan", "--rpc", ep, "--ctx", "4096", "--json")
    assert r.returncode == 0, r.stderr
    (tmp_path / "plan.json").write_text(r.stdout)
    workers.kill(ep)
    r = run_cli("serve", "--plan", str(tmp_path / "plan.json"), "--port", str(_free_port()), timeout=60)
    err = r.stderr.strip()
    assert r.returncode == 2 and "\n" not in err and f"RPC worker {ep} is unreachable" in err


@needs_rpc
def test_serve_leaves_an_unused_worker_alone(workers, tmp_path):
    """Two workers, a plan that puts everything on one: llama.cpp closes its connection to the other after loading;
    serve must not read that as a dropped worker (it used to restart the engine forever)."""
    eps = [workers.start(), workers.start()]
    r = run_cli("plan", "--rpc", ",".join(eps), "--ctx", "4096", "--json")
    assert r.returncode == 0, r.stderr
    (tmp_path / "plan.json").write_text(r.stdout)
    from hybridinfer.engines.binaries import rpc_used
    from hybridinfer.plan import Plan
    plan = Plan.from_json(r.stdout)
    used = rpc_used(plan)
    assert len(used) < len(eps), "the plan uses both workers: this test needs one left unused"
    unused = [e for e in eps if e not in used]
    assert any(x["topic"] == "rpc" and "unused" in x["text"] and unused[0] in x["text"]
               for x in json.loads(r.stdout)["reasons"])
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(BIN / "hybridinfer"), "serve", "--plan", str(tmp_path / "plan.json"), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        _wait_health(base, 200)
        time.sleep(4)  # several rounds of the worker watch
        code, body = _health(base)
        assert code == 200 and body["engine_restarts"] == 0, body
        assert _chat(base).usage.completion_tokens > 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
