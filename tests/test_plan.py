from dataclasses import replace

import pytest

from conftest import verdict
from hybridinfer.errors import HybridError
from hybridinfer.plan import PlanOptions, make_plan
from hybridinfer.probe import load_profile, reference_profiles_dir
from hybridinfer.render import why

GIB = 1024**3
MACHINES = sorted(p.stem for p in reference_profiles_dir().glob("*.json"))
MODELS = ["r1-ud-iq1_s", "r1-ud-iq1_s-legacy", "qwen3moe-30b-a3b-q4_k_m", "llama3-8b-q4_k_m"]
# (machine, model) -> refusal expected: RAM+VRAM far below the model
REFUSED = {("ci-box", "r1-ud-iq1_s"), ("ci-box", "r1-ud-iq1_s-legacy"), ("laptop-small", "r1-ud-iq1_s-legacy")}


def test_all_reference_machines_present():
    assert set(MACHINES) >= {"course-vgpu", "budget-2080ti", "xeon4-ddr5-4090", "dual-6454s-4090d", "desktop-4090",
                             "epyc-cpu-only", "laptop-small", "ci-box"}


@pytest.mark.parametrize("machine", MACHINES)
@pytest.mark.parametrize("model_name", MODELS)
def test_plan_matrix(machine, model_name, models):
    hw = load_profile(machine)
    m = models[model_name]
    if (machine, model_name) in REFUSED:
        with pytest.raises(HybridError) as e:
            make_plan(hw, m)
        msg = str(e.value)
        assert "GiB short" in msg and "\n" not in msg and ("smaller quant" in msg or "--ctx" in msg)
        return
    p = make_plan(hw, m)
    assert set(p.device_of) == {t.name for t in m.tensors}
    for d in p.devices:  # never plans past a device's usable memory
        assert d.total <= d.capacity, (d.device, d.total / GIB, d.capacity / GIB)
    pr = p.prediction
    assert 0 < pr.decode_tps <= pr.decode_limit_tps * 1.0001 and pr.prefill_tps > 0
    assert 0 < pr.fraction_of_limit <= 1
    assert p.threads == hw.cpu.physical_cores
    if not hw.gpus:
        assert p.rules == "cpu-only" and p.engine == "llama.cpp" and set(p.device_of.values()) == {"cpu"}
    if not m.is_moe:
        assert p.rules in ("layer-split", "cpu-only") and p.engine == "llama.cpp"
    if len(hw.numa_nodes) > 1 and p.engine == "llama.cpp":
        assert p.numa == "distribute"
    if m.kv.form == "legacy-mha" and hw.gpus and p.engine == "llama.cpp":  # KTransformers keeps the MLA cache
        assert p.ctx < 16384  # the 71x larger legacy cache forces a smaller context


@pytest.mark.parametrize("machine", ["desktop-4090", "xeon4-ddr5-4090"])
def test_r1_attention_on_gpu_experts_on_cpu(machine, models):
    m = models["r1-ud-iq1_s"]
    hw = load_profile(machine)
    p = make_plan(hw, m)
    assert p.rules == "moe-auto-fill"
    for t in m.tensors:
        dev = p.device_of[t.name]
        if t.cls in ("attention", "shared_experts", "norms", "router", "dense_ffn", "output"):
            assert dev == "gpu:0", t.name
    gpu = next(d for d in p.devices if d.device == "gpu:0")
    # R1's MLA cache: 576 values of f16 per layer per token, all 61 layers' on the GPU that holds the attention
    assert abs(gpu.kv_cache - 576 * 2 * 61 * p.ctx) <= 61
    moved = sorted({t.block for t in m.tensors if t.cls == "routed_experts" and p.device_of[t.name] != "cpu"})
    assert moved == list(range(3, 3 + len(moved)))  # early blocks first, contiguous
    cpu_experts = [t for t in m.tensors if t.cls == "routed_experts" and p.device_of[t.name] == "cpu"]
    assert len(cpu_experts) == (58 - len(moved)) * 3 and len(cpu_experts) > 100
    split = make_plan(hw, m, PlanOptions(rules="layer-split", engine="llama.cpp"))
    assert p.prediction.decode_tps > 1.4 * split.prediction.decode_tps


# Published figures from ../shared/reference (decode tok/s) and the tolerance each prediction must meet.
# course-vgpu: its published VRAM (10-14 GB) implies Marlin, i.e. an Ampere-class vGPU (on the profile's V100,
# KTransformers' bf16 KLinearTorch weights do not fit: test_kt_plan.py); budget-2080ti (Turing, no Marlin): llama.cpp.
CALIBRATION = [
    ("course-vgpu", "r1-ud-iq1_s-legacy", {"cc": "8.0"}, 5.0, 0.30),
    ("xeon4-ddr5-4090", "r1-ud-iq1_s", {}, 12.0, 0.20),
    ("dual-6454s-4090d", "r1-q4_k_m", {}, 12.2, 0.20),
    ("dual-6454s-4090d", "r1-q4_k_m", {"one_socket": True}, 8.73, 0.20),
    ("budget-2080ti", "r1-ud-iq1_s", {"engine": "llama.cpp"}, 4.0, 0.30),  # published 3-5
]


@pytest.mark.parametrize("machine,model_name,var,published,tol", CALIBRATION)
def test_calibration_against_published(machine, model_name, var, published, tol, models):
    hw = load_profile(machine)
    if var.get("one_socket"):
        hw = replace(hw, cpu=replace(hw.cpu, physical_cores=32, logical_cores=64, sockets=1),
                     numa_nodes=hw.numa_nodes[:1], memory_bandwidth_gbs=hw.memory_bandwidth_gbs / 2)
    if var.get("cc"):
        hw = replace(hw, gpus=[replace(g, compute_capability=var["cc"]) for g in hw.gpus])
    engine = var.get("engine", "ktransformers")
    p = make_plan(hw, models[model_name], PlanOptions(rules=None if engine == "llama.cpp" else "moe-experts-on-cpu",
                                                      engine=engine, ctx=8192))
    assert p.prediction.decode_tps == pytest.approx(published, rel=tol)


def test_course_vgpu_memory_matches_published(models):
    hw = load_profile("course-vgpu")
    hw = replace(hw, gpus=[replace(g, compute_capability="8.0") for g in hw.gpus])  # see CALIBRATION
    p = make_plan(hw, models["r1-ud-iq1_s-legacy"],
                  PlanOptions(rules="moe-experts-on-cpu", engine="ktransformers", ctx=8192))
    gpu = next(d for d in p.devices if d.device == "gpu:0")
    assert 10 * GIB <= gpu.total <= 14 * GIB  # published ~10-14 GB VRAM
    assert p.streaming  # 90 GB RAM < 121 GiB of experts: page cache + disk


def test_engine_choice(models):
    xeon = load_profile("xeon4-ddr5-4090")
    p = make_plan(xeon, models["r1-ud-iq1_s"])
    v = p.verdicts[0]
    assert p.engine == v.engine == "ktransformers" and v.verdict == "chosen" and "every routed-expert type runs" in v.reason
    assert "patch ktransformers --apply` for" not in v.reason  # UD-IQ1_S: non-expert tensors in Q4_K/Q6_K/Q8_0
    # A quant with IQ3_XXS attention (ggml type 18) needs hybridinfer's patch; the plan says whether it is applied.
    from hybridinfer.probe import EngineInfo
    m = models["r1-ud-iq1_s"]
    att = m.groups["attention"]
    iq = replace(m, groups={**m.groups, "attention": replace(att, types={"IQ3_XXS": sum(att.types.values())})})
    assert "needs `hybridinfer patch ktransformers --apply` for IQ3_XXS" in make_plan(xeon, iq).verdicts[0].reason
    patched = replace(xeon, engines=[e for e in xeon.engines if e.name != "ktransformers"] +
                      [EngineInfo(name="ktransformers", installed=True, version="0.3.2", detail="IQ patch: applied")])
    assert "IQ3_XXS load through hybridinfer's patch (applied)" in make_plan(patched, iq).verdicts[0].reason
    p = make_plan(xeon, models["r1-ud-iq1_m"])  # IQ1_M experts: KTransformers would compute garbage
    assert (p.engine, p.verdicts[0].engine, p.verdicts[0].verdict) == ("llama.cpp", "llama.cpp", "chosen")
    kt = verdict(p, "ktransformers")
    assert kt.verdict == "blocked" and "IQ1_M" in " ".join([kt.reason, *kt.also])
    p = make_plan(load_profile("desktop-4090"), models["r1-ud-iq1_s"])
    assert p.engine == "llama.cpp" and verdict(p, "ktransformers").verdict == "not installed"
    assert "engine ktransformers: not installed on desktop-4090" in why(p)
    with pytest.raises(HybridError, match="ktransformers cannot run this plan"):
        make_plan(xeon, models["r1-ud-iq1_m"], PlanOptions(engine="ktransformers"))


def test_numa_warning_for_ktransformers(models):
    p = make_plan(load_profile("dual-6454s-4090d"), models["r1-q4_k_m"])
    assert p.engine == "ktransformers"
    assert any("copy of the CPU experts per NUMA node" in w for w in p.warnings)


def test_laptop_streams_r1_and_says_how_slow(models):
    p = make_plan(load_profile("laptop-small"), models["r1-ud-iq1_s"])
    assert p.streaming and p.rules == "layer-split" and p.prediction.decode_tps < 2
    assert any("stream" in w for w in p.warnings)
    with pytest.raises(HybridError, match="GiB short"):
        make_plan(load_profile("laptop-small"), models["r1-ud-iq1_s"], PlanOptions(allow_streaming=False))


def test_options_validation(models):
    hw = load_profile("desktop-4090")
    m = models["r1-ud-iq1_s"]
    with pytest.raises(HybridError, match="exceeds the model's trained context"):
        make_plan(hw, m, PlanOptions(ctx=10**7))
    with pytest.raises(HybridError, match="--parallel must be at least 1"):
        make_plan(hw, m, PlanOptions(parallel=0))
    p = make_plan(hw, m, PlanOptions(ctx=32768, parallel=4, kv_type="q8_0"))
    assert p.ctx == 32768 and p.parallel == 4 and p.flash_attn
    gpu = next(d for d in p.devices if d.device == "gpu:0")
    # R1's MLA cache at q8_0: 576 values per layer per token in blocks of 32 values / 34 bytes = 612 bytes, for
    # all 61 layers (on the GPU with the attention) and 32768 tokens shared by the 4 slots
    assert gpu.kv_cache == 612 * 61 * 32768


def test_plan_json_roundtrip(models):
    from hybridinfer.plan import Plan
    from hybridinfer.util import dump_json

    p = make_plan(load_profile("desktop-4090"), models["r1-ud-iq1_s"])
    assert Plan.from_json(dump_json(p)) == p
