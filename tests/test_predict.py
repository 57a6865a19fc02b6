"""The prediction model's known corrections: GPU per-layer fixed costs, NUMA by engine, threads beyond the
cores, multi-GPU layer split prefill, and aggregate throughput for --parallel N."""

from dataclasses import replace

import pytest

from hybridinfer.plan import PlanOptions, make_plan
from hybridinfer.predict import GPU_BLOCK_S, GPU_MOE_BLOCK_S, TOKEN_OVERHEAD_S
from hybridinfer.probe import load_profile


def test_gpu_resident_moe_pays_per_layer_fixed_costs(models):
    # Qwen3-30B-A3B Q4_K_M fits a 4090 whole; published llama.cpp decode is ~167-196 tok/s, far below the
    # ~350 tok/s that bytes / bandwidth alone gives.
    m = models["qwen3moe-30b-a3b-q4_k_m"]
    p = make_plan(load_profile("desktop-4090"), m)
    assert set(p.device_of.values()) == {"gpu:0"} or p.prediction.cpu_bytes_per_token < 1e6
    pr = p.prediction
    assert 150 <= pr.decode_tps <= 210
    fixed = TOKEN_OVERHEAD_S["gpu"] + 48 * (GPU_BLOCK_S + GPU_MOE_BLOCK_S)
    assert pr.breakdown_ms["fixed"] == pytest.approx(fixed * 1e3, rel=1e-3)
    assert pr.fraction_of_limit < 0.6
    # Experts on the CPU: the GPU pays only the attention blocks' launches.
    cpu = make_plan(load_profile("desktop-4090"), m, PlanOptions(rules="moe-experts-on-cpu", engine="llama.cpp"))
    assert cpu.prediction.breakdown_ms["fixed"] == pytest.approx((TOKEN_OVERHEAD_S["gpu"] + 48 * GPU_BLOCK_S) * 1e3, rel=1e-3)


def _one_socket(hw):
    return replace(hw, cpu=replace(hw.cpu, physical_cores=hw.cpu.physical_cores // 2, sockets=1),
                   numa_nodes=hw.numa_nodes[:1], memory_bandwidth_gbs=hw.memory_bandwidth_gbs / 2)


def test_second_numa_node_helps_ktransformers_not_llamacpp(models):
    hw = load_profile("dual-6454s-4090d")
    m = models["r1-q4_k_m"]

    def decode(h, engine):
        return make_plan(h, m, PlanOptions(rules="moe-experts-on-cpu", engine=engine, ctx=8192)).prediction.decode_tps

    assert decode(hw, "ktransformers") > 1.25 * decode(_one_socket(hw), "ktransformers")  # it mirrors per node
    assert decode(hw, "llama.cpp") == pytest.approx(decode(_one_socket(hw), "llama.cpp"), rel=0.03)  # one copy


def test_threads_above_physical_cores_warn_and_predict_with_real_cores(models):
    hw = load_profile("desktop-4090")
    m = models["r1-ud-iq1_s"]
    base = make_plan(hw, m)
    over = make_plan(hw, m, PlanOptions(threads=32))
    assert over.threads == 32  # passed through as asked
    assert any("more than the 16 physical cores" in w for w in over.warnings)
    assert [(r.figure, r.text.split(":")[1].split()[0]) for r in over.reasons if r.topic == "threads"] == [(32, "requested")]
    assert [r.figure for r in base.reasons if r.topic == "threads"] == [16]
    assert over.prediction.decode_tps == base.prediction.decode_tps
    assert not any("physical cores:" in w for w in base.warnings)


def test_multi_gpu_layer_split_prefill_does_not_add_tflops(models):
    hw = load_profile("desktop-4090")
    g = hw.gpus[0]
    two = replace(hw, gpus=[g, replace(g, index=1)])
    m = models["llama3-8b-q4_k_m"]
    one = make_plan(hw, m, PlanOptions(rules="layer-split"))
    split = make_plan(two, m, PlanOptions(rules="multi-gpu"))
    assert {d for d in split.device_of.values() if d != "cpu"} == {"gpu:0", "gpu:1"}
    # The GPUs run one after the other: the same FLOPs on two equal GPUs take as long as on one.
    assert split.prediction.prefill_tps == pytest.approx(one.prediction.prefill_tps, rel=0.05)


def test_parallel_slots_predict_aggregate_throughput(models):
    hw = load_profile("xeon4-ddr5-4090")
    m = models["r1-ud-iq1_s"]
    one = make_plan(hw, m).prediction
    assert one.parallel == 1 and one.aggregate_decode_tps == one.decode_tps
    four = make_plan(hw, m, PlanOptions(parallel=4)).prediction
    assert four.parallel == 4 and four.decode_tps == one.decode_tps  # one request alone is as fast as before
    # Four sequences share the dense weights and overlap in experts: more in total, less than 4x, slower each.
    assert one.decode_tps * 1.5 < four.aggregate_decode_tps < one.decode_tps * 4
    assert any("4 busy slots" in n for n in four.notes)
    eight = make_plan(hw, m, PlanOptions(parallel=8)).prediction
    assert eight.aggregate_decode_tps > four.aggregate_decode_tps


def test_parallel_matches_published_five_users(models):
    # reference-machines: xeon4-ddr5-4090, R1 UD-IQ1_S on KTransformers, "5 concurrent users 6-8 tok/s each".
    p = make_plan(load_profile("xeon4-ddr5-4090"), models["r1-ud-iq1_s"], PlanOptions(parallel=5))
    assert p.engine == "ktransformers"
    assert 6.0 <= p.prediction.aggregate_decode_tps / 5 <= 8.0


def test_cpu_memory_counts_llamacpp_repacked_weights_twice_when_mapped(tmp_path):
    # Measured on the mid model: llama-server's RSS = mapped file + CPU_REPACK copies of its Q4_K weights + KV
    # + compute buffer + <0.1 GiB (benchmarks/results/measured_vs_predicted.json).
    from hybridinfer.demo.mid import write_mid
    from hybridinfer.inspect_gguf import inspect

    m = inspect(write_mid(tmp_path / "mid.gguf", "iq1_s", data=False))
    hw = load_profile("ci-box")
    mapped = make_plan(hw, m, PlanOptions(ctx=16384))
    ram = make_plan(hw, m, PlanOptions(ctx=16384, load_mode="ram"))
    # The mid model's Q4_K weights beside the embedding (Q4_K: 256 values in 144 bytes): attn_q (2048 x 3072) and
    # attn_output (2048 x 2048) in 27 blocks, the dense block's ffn_gate/ffn_up (2048 x 11008), the 26 MoE blocks'
    # ffn_gate_shexp/ffn_up_shexp (2048 x 3072): 655,360,000 values, 368,640,000 bytes, repacked beside the mapped
    # file. Read in, the Q4_K embedding (2048 x 102400: 117,964,800 bytes) is resident whole; mapped, only its rows
    # of the tokens seen.
    assert mapped.devices[0].total - ram.devices[0].total == 368_640_000 - 117_964_800
    assert any("repacks" in r.text for r in mapped.reasons if r.topic == "memory")
    assert not any(r.topic == "memory" for r in ram.reasons)
    assert mapped.devices[0].runtime < 0.2 * 2**30  # llama-server's own memory beyond its buffers


def test_cpu_prefill_pays_for_few_tokens_per_expert(models):
    # Routed experts see ubatch x used / count tokens each; a quantized GEMM over few rows does not amortise its
    # unpacking (measured on the mid model at -ub 512 / 171 / 64), so R1's 256 experts prefill slower per FLOP
    # than a dense layer, and a smaller --ubatch slows CPU prefill.
    from hybridinfer.predict import PREFILL_EXPERT_BATCH_N0
    hw = load_profile("epyc-cpu-only")
    m = models["r1-ud-iq1_s"]
    full = make_plan(hw, m, PlanOptions(engine="llama.cpp"))
    small = make_plan(hw, m, PlanOptions(engine="llama.cpp", ubatch=128))
    assert small.prediction.prefill_tps < full.prediction.prefill_tps * 0.8
    assert small.prediction.decode_tps == full.prediction.decode_tps  # decode reads one token at a time
    # Without the term (an engine whose figure was fitted to R1 itself), the same plan prefills faster.
    from hybridinfer.engines import get
    from hybridinfer.predict import PredictInput, predict
    e = get("llama.cpp")
    on_in = PredictInput(m, hw, full.device_of, e.prediction_params, full.threads, full.kv_type)
    off = predict(replace(on_in, params=replace(e.prediction_params, prefill_expert_batch_n0=0.0)))
    on = predict(on_in)
    assert PREFILL_EXPERT_BATCH_N0 > 0 and off.prefill_tps > on.prefill_tps * 1.2
