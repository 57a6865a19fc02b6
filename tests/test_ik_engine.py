"""ik_llama.cpp as a planned engine: its blockers (incompatible DeepSeek MLA dims, types), flags, KV form, and
`--engine auto` between it and mainline (tests/test_calibration.py: by this box's calibration). No binary needed."""

from dataclasses import replace

import pytest

from conftest import run_cli
from hybridinfer.engines import REGISTRY, get, support_table
from hybridinfer.inspect_gguf import Group, inspect
from hybridinfer.plan import PlanOptions, make_plan
from hybridinfer.probe import EngineInfo, load_profile, probe

IK, MAIN = "ik_llama.cpp", "llama.cpp"


@pytest.fixture(scope="module")
def hw():
    h = probe(engines=False)
    return replace(h, engines=[EngineInfo(name=MAIN, installed=True), EngineInfo(name=IK, installed=True)])


def test_registered_and_in_inspect(tiny_model):
    assert IK in REGISTRY and isinstance(get(IK), type(get(MAIN)))
    m = inspect(tiny_model)
    support = support_table(m)
    assert support["routed_experts"][IK] == "ok" and support["attention"][IK] == "ok"


def test_incompatible_deepseek_mla_is_a_blocker_before_launch(tmp_path, hw):
    from hybridinfer.demo.tiny import write_tiny
    path = write_tiny(tmp_path / "old-dims.gguf", kv_lora=128, rope=32)
    m = inspect(path)
    why = get(IK).blockers(m, None, hw)
    assert any("Detected incompatible DeepSeek model" in w and "key 160 / value 128, rope 32" in w for w in why)
    assert get(MAIN).blockers(m, None, hw) == []
    assert get(IK).blockers(inspect(write_tiny(tmp_path / "ok.gguf")), None, hw) == []
    # asked for by name: one line, exit 2; auto falls back to mainline and says why
    r = run_cli("plan", "--gguf", path, "--engine", IK)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "incompatible DeepSeek model" in r.stderr
    p = make_plan(hw, m, PlanOptions(engine="auto"))
    assert p.engine == MAIN
    ik = next(v for v in p.verdicts if v.engine == IK)
    assert ik.verdict == "blocked" and ik.reason.startswith("it aborts loading")


def _with_type(m, cls, qtype):
    """The model with every tensor of a class in another quant type (same bytes): a stand-in for an
    ik-quantized file, which no tool here can produce."""
    ts = [replace(t, type=qtype) if t.cls == cls else t for t in m.tensors]
    g = m.groups[cls]
    return replace(m, tensors=ts, groups={**m.groups, cls: Group(bytes=g.bytes, params=g.params, tensors=g.tensors,
                                                                  types={qtype: g.bytes})})


def test_quant_types_decide_which_engine_runs_a_file(tiny_model, hw):
    m = _with_type(inspect(tiny_model), "routed_experts", "IQ4_K_R4")
    main_why = get(MAIN).blockers(m, None, hw)
    assert main_why and "IQ4_K_R4" in main_why[0] and IK in main_why[0]
    assert get(IK).blockers(m, None, hw) == []
    p = make_plan(hw, m, PlanOptions(engine="auto"))
    assert p.engine == IK and next(v for v in p.verdicts if v.engine == MAIN).verdict == "blocked"
    # a repacked CPU layout placed on a GPU: ik's CUDA kernels do not run it
    cpu_only = _with_type(inspect(tiny_model), "attention", "Q4_K_R4")
    gpu = {t.name: ("gpu:0" if t.cls == "attention" else "cpu") for t in cpu_only.tensors}
    why = get(IK).blockers(cpu_only, gpu, hw)
    assert any("Q4_K_R4" in w and "GPU" in w for w in why)


def test_command_flags_cpu_only_and_hybrid(tiny_model, hw):
    m = inspect(tiny_model)
    cpu = make_plan(hw, m, PlanOptions(engine=IK, threads=2)).command
    assert cpu[0].endswith("ik-llama-server") and "-rtr" in cpu
    assert cpu[cpu.index("-mla") + 1] == "3" and "-fa" in cpu and "-amb" not in cpu
    gpu_box = replace(load_profile("desktop-4090"), engines=hw.engines)
    hyb = make_plan(gpu_box, m, PlanOptions(engine=IK, rules="moe-experts-on-cpu")).command
    assert "-rtr" not in hyb  # repacked types have no CUDA kernels
    assert "-amb" in hyb and ("--cpu-moe" in hyb or "-ot" in hyb) and "-ngl" in hyb
    q8 = make_plan(hw, m, PlanOptions(engine=IK, kv_type="q8_0")).command
    assert q8[q8.index("-ctk") + 1] == "q8_0" and "-ctv" not in q8  # MLA caches only the latent (K)


def test_legacy_gguf_gets_the_mla_cache(tmp_path):
    from hybridinfer.demo.tiny import write_tiny
    leg = inspect(write_tiny(tmp_path / "legacy.gguf", mla=False))
    assert get(IK).kv_form(leg) == "mla" and get(MAIN).kv_form(leg) == "legacy-mha"
    assert get(IK).kv_bytes_per_token(leg, "f16") == 576 * 2 * leg.block_count
    assert get(MAIN).kv_bytes_per_token(leg, "f16") == 4 * (192 + 128) * 2 * leg.block_count


def test_bench_output_with_fork_load_messages():
    # ik_llama.cpp's llama-bench prints its MLA set-up to stdout inside the JSON array
    from hybridinfer.engines.llamacpp import parse_bench
    out = ('[\n================= Adjusted mainline llama.cpp MLA tensors to ik_llama.cpp\n'
           'Computed blk.0.attn_kv_b.weight as 512 x 1024 of type q8_0 and stored in buffer CPU\n'
           '  {\n    "n_prompt": 512,\n    "n_gen": 0,\n    "avg_ts": 170.5,\n    "stddev_ts": 2.0\n  },\n'
           '  {\n    "n_prompt": 0,\n    "n_gen": 128,\n    "avg_ts": 55.0,\n    "stddev_ts": 1.0\n  }\n]\n')
    assert [(r["test"], r["tokens_per_s"]) for r in parse_bench(out)] == [("pp512", 170.5), ("tg128", 55.0)]


@pytest.mark.engine
def test_bench_command_runs_as_the_server_does(tiny_model, hw):
    """ik's llama-bench gets the server's batch sizes and KV types (V too where there is no MLA), and its own
    parser takes the command: a short real run on the demo model (MLA) and the qwen3moe demo (no MLA)."""
    import subprocess

    from hybridinfer.demo.families import ensure_family
    from hybridinfer.engines.binaries import find_llama_binary

    engine = get(IK)
    qwen = ensure_family("qwen3moe")
    for path, mla in ((tiny_model, True), (str(qwen), False)):
        p = make_plan(hw, inspect(path), PlanOptions(engine=IK, threads=2, kv_type="q8_0", batch=256, ubatch=128))
        b = engine.bench_command(p, n_prompt=16, n_gen=4, repetitions=1)
        assert b[b.index("-b") + 1] == "256" and b[b.index("-ub") + 1] == "128" and b[b.index("-ctk") + 1] == "q8_0"
        assert ("-mla" in b) is mla
        assert "-ctv" not in b if mla else b[b.index("-ctv") + 1] == "q8_0"
        if not find_llama_binary("ik-llama-bench"):
            continue
        r = subprocess.run(b, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and engine.parse_bench(r.stdout), (b, r.stderr[-2000:])
