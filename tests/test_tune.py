"""hybridinfer tune: candidates from the static plan, budget handling, and a real search on the demo model."""

import json

import pytest

from conftest import run_cli
from hybridinfer.errors import HybridError
from hybridinfer.plan import Plan, PlanOptions, make_plan
from hybridinfer.engines.binaries import find_llama_binary
from hybridinfer.probe import load_profile
from hybridinfer.tune import Candidate, Tuner, parse_budget

needs_bench = pytest.mark.skipif(not find_llama_binary("llama-bench"), reason="llama-bench not installed")


def test_budget_parsing():
    assert (parse_budget("90s"), parse_budget("10m"), parse_budget("1.5h"), parse_budget("45")) == (90, 600, 5400, 45)
    for bad in ("", "10x", "-1m", "0"):
        with pytest.raises(HybridError, match="is not a duration"):
            parse_budget(bad)


def _best(hw, model, opts=PlanOptions()):
    c = Candidate("static", "static plan", opts)
    c.plan = make_plan(hw, model, opts)
    return Tuner(hw, model, opts, 600), c


def test_thread_candidates_physical_one_fewer_and_one_numa_node(models):
    hw = load_profile("dual-6454s-4090d")
    t, best = _best(hw, models["r1-q4_k_m"])
    labels = [label for label, _ in t.alternatives("threads", best)]
    assert best.plan.threads == 64 and labels == ["threads 63", "threads 32"]
    t, best = _best(load_profile("ci-box"), models["qwen3moe-30b-a3b-q4_k_m"])
    assert [label for label, _ in t.alternatives("threads", best)] == ["threads 1"]


def test_gpu_expert_block_candidates_make_real_plans(models):
    hw = load_profile("desktop-4090")
    m = models["r1-ud-iq1_s"]
    t, best = _best(hw, m)
    moved = sorted({x.block for x in m.tensors if x.cls == "routed_experts" and best.plan.device_of[x.name] != "cpu"})
    alts = t.alternatives("gpu_experts", best)
    assert moved and [label for label, _ in alts][0] == "experts of 0 early block(s) on GPU"
    for label, opts in alts:
        n = int(label.split()[2])
        p = make_plan(hw, m, opts)
        on_gpu = sorted({x.block for x in m.tensors if x.cls == "routed_experts" and p.device_of[x.name] != "cpu"})
        assert on_gpu == list(range(3, 3 + n))
    # No GPU: nothing to try.
    t, best = _best(load_profile("epyc-cpu-only"), models["qwen3moe-30b-a3b-q4_k_m"])
    assert t.alternatives("gpu_experts", best) == []


def test_batch_and_load_candidates_change_the_command(models, monkeypatch):
    from hybridinfer.engines import llamacpp

    engine = llamacpp.ENGINE
    hw = load_profile("desktop-4090")
    m = models["qwen3moe-30b-a3b-q4_k_m"]
    p = make_plan(hw, m, PlanOptions(ubatch=1024, batch=2048, load_mode="ram"))
    assert (p.ubatch, p.batch, p.load_mode) == (1024, 2048, "ram")
    cmd = engine.model_args(p, None)  # no binary to ask: the current flag set
    assert cmd[cmd.index("-ub") + 1] == "1024" and cmd[cmd.index("-b") + 1] == "2048" and "--load-mode" in cmd
    monkeypatch.setattr(engine, "bench_binary", "llama-bench-not-here")  # any build: its flags come from flags()
    monkeypatch.setattr(engine, "flags", lambda b: {"-lm", "--load-mode"})
    b = engine.bench_command(p)
    assert b[b.index("-ub") + 1] == "1024" and b[b.index("-lm") + 1] == "none"
    b = engine.bench_command(make_plan(hw, m, PlanOptions(load_mode="mmap")))
    assert b[b.index("-lm") + 1] == "mmap"
    monkeypatch.setattr(engine, "flags", lambda b: {"-mmp", "--mmap"})  # an older llama-bench
    b = engine.bench_command(p)
    assert b[b.index("-mmp") + 1] == "0" and "-lm" not in b
    with pytest.raises(HybridError, match="unknown load mode"):
        make_plan(hw, m, PlanOptions(load_mode="disk"))


def test_cli_refuses_bad_budget_and_other_boxes():
    r = run_cli("tune", "--budget", "soon")
    assert r.returncode == 2 and "--budget 'soon' is not a duration" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("tune", "--hardware", "ci-box")
    assert r.returncode == 2 and "tune measures this box" in r.stderr


@pytest.mark.engine
@needs_bench
def test_tune_on_the_demo_model_writes_a_plan_at_least_as_fast(tmp_path):
    out = tmp_path / "plan.json"
    r = run_cli("tune", "--budget", "4m", "--prompt-tokens", "64", "--gen-tokens", "16", "-o", str(out), "--json",
                timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    doc = json.loads(out.read_text())
    assert doc["tune"] == report
    rows = report["rows"]
    assert rows[0]["label"] == "static plan" and rows[0]["status"] == "done"
    assert {"threads 1", "KV q8_0", "ubatch 128"} <= {x["label"] for x in rows}
    assert all(x["predicted_decode_tps"] for x in rows if x["status"] == "done")
    assert report["winner"]["request_s"] <= report["static"]["request_s"] and report["gain"] >= 1.0
    assert report["took_s"] <= 4 * 60 + 30
    plan = Plan.from_json(json.dumps({k: v for k, v in doc.items() if k not in ("command_line", "tune")}))
    from hybridinfer.engines import get

    assert plan.command == get(plan.engine).command(plan)  # what `serve --plan` runs is the plan's own command
    assert f"wrote {out}" in r.stderr


@pytest.mark.engine
@needs_bench
def test_tune_budget_too_small_for_one_run_is_a_clean_error(tmp_path):
    r = run_cli("tune", "--budget", "0.01s", "-o", str(tmp_path / "p.json"))
    assert r.returncode == 2 and "raise --budget" in r.stderr and not (tmp_path / "p.json").exists()


def test_load_mode_candidate_is_the_other_mode(models):
    t, best = _best(load_profile("ci-box"), models["qwen3moe-30b-a3b-q4_k_m"])  # CPU only: mapped by default
    assert [label for label, _ in t.alternatives("load", best)] == ["load into RAM"]
    t, best = _best(load_profile("desktop-4090"), models["r1-ud-iq1_s"])  # experts on the CPU beside a GPU: read in
    assert [label for label, _ in t.alternatives("load", best)] == ["load mmap"]
