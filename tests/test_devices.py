"""Plans over several devices: each layer's KV cache where its attention is, contiguous block ranges per GPU,
the output head with its norm, and the multi-GPU default chosen by prediction."""
from dataclasses import replace

import pytest

from hybridinfer import rules
from hybridinfer.layers import layer_devices
from hybridinfer.engines.llamacpp import placement_args
from hybridinfer.engines.llamacpp_args import compile_placement, simulate
from hybridinfer.plan import PlanOptions, make_plan
from hybridinfer.probe import load_profile

GIB = 1024**3


def _two_gpus(vram_gib: float, bw: float = 1000.0):
    hw = load_profile("xeon4-ddr5-4090")
    g = hw.gpus[0]
    return replace(hw, gpus=[replace(g, index=i, vram_total=int(vram_gib * GIB), vram_free=0, memory_bandwidth_gbs=bw)
                             for i in range(2)])


def _blocks_of(plan, dev):
    return sorted({int(n.split(".")[1]) for n, d in plan.device_of.items() if n.startswith("blk.") and d == dev
                   and n.endswith(".attn_norm.weight")})


@pytest.mark.parametrize("rules_name", ["multi-gpu", "layer-split"])
@pytest.mark.parametrize("vram", [24, 80])
def test_two_gpu_plans_keep_kv_with_layers(rules_name, vram, models):
    m = models["r1-ud-iq1_s"]
    try:
        p = make_plan(_two_gpus(vram), m, PlanOptions(rules=rules_name))
    except Exception as e:  # layer-split of R1 needs the RAM side too; never a traceback-worthy failure here
        pytest.fail(f"{rules_name} on 2 x {vram} GB: {e}")
    args = placement_args(p)
    assert args[args.index("-ngl") + 1] != "0"  # never -ngl 0 with device overrides: KV would stay in RAM
    c = compile_placement(p.device_of, p.n_layer, p.compiled["gpu_devices"], p.compiled["gpu_buffers"])
    # llama.cpp's own layer assignment for these flags puts every layer where the plan put its attention
    assert c.layer == layer_devices(p.device_of, p.n_layer)
    for b in range(p.n_layer):
        assert c.layer[b] == p.device_of[f"blk.{b}.attn_norm.weight"]
    assert c.placement(list(p.device_of)) == p.device_of
    # contiguous, in block order: gpu:0's blocks all come before gpu:1's
    b0, b1 = _blocks_of(p, "gpu:0"), _blocks_of(p, "gpu:1")
    for bs in (b0, b1):
        assert bs == list(range(bs[0], bs[-1] + 1)) if bs else True
    if b0 and b1:
        assert b0[-1] < b1[0]
    assert p.device_of["output.weight"] == p.device_of["output_norm.weight"]
    # KV bytes counted per device = layers on it x per-layer KV
    per_layer = m.kv.bytes_per_token["f16"] * p.ctx // m.kv.layers
    for d in p.devices:
        if d.device != "cpu":
            assert d.kv_cache == per_layer * c.layer[:p.n_layer].count(d.device)


def test_multi_gpu_default_takes_the_faster(models):
    m = models["r1-ud-iq1_s"]
    # 2 x 80 GB: the box, where the old default used 13 of 158 GiB. Now every routed expert fits on the
    # GPUs either way, and the plan says which it kept and why.
    big = make_plan(_two_gpus(80), m)
    r = big.reasons[0]
    assert r.topic == "rules-choice" and "layer-split" in r.text and "multi-gpu" in r.text
    assert all(d != "cpu" for n, d in big.device_of.items() if n != "token_embd.weight")
    assert sum(d.total for d in big.devices if d.device != "cpu") > 120 * GIB
    split = make_plan(_two_gpus(80), m, PlanOptions(rules="layer-split"))
    assert big.prediction.decode_tps >= split.prediction.decode_tps
    # 2 x 24 GB: attention + KV on the GPUs, each GPU filled with its own early blocks' experts, beats a layer split
    small = make_plan(_two_gpus(24), m)
    assert small.rules == "multi-gpu" and small.reasons[0].topic == "rules-choice"
    assert "chosen over layer-split" in small.reasons[0].text
    assert small.prediction.decode_tps > make_plan(_two_gpus(24), m, PlanOptions(rules="layer-split")).prediction.decode_tps
    for d in small.devices:
        if d.device != "cpu":
            assert d.groups.get("routed_experts", 0) > 10 * GIB and d.total > 0.9 * d.capacity
    # each GPU holds experts only of blocks whose attention it holds: no extra GPU-to-GPU hop
    for n, d in small.device_of.items():
        if "_exps" in n and d != "cpu":
            assert small.device_of[n.split(".ffn")[0] + ".attn_norm.weight"] == d


def test_layer_split_fills_devices_in_order(models):
    m = models["r1-ud-iq1_s"]
    p = make_plan(_two_gpus(80), m, PlanOptions(rules="layer-split"))
    args = placement_args(p)
    assert args[:2] == ["-ngl", "999"] and args[args.index("-dev") + 1] == "CUDA0,CUDA1"
    ts = [int(x) for x in args[args.index("-ts") + 1].split(",")]
    assert ts == [len(_blocks_of(p, "gpu:0")), len(_blocks_of(p, "gpu:1")) + 1]  # the output layer is gpu:1's


def test_simulate_matches_llama_cpp_float_ties():
    # 62 layers, -ts 31,31: layer 31 is the first of the second device (upper_bound on an exact 0.5)
    lay = simulate(999, ["a", "b"], [31, 31], 61)
    assert lay[:31] == ["a"] * 31 and lay[31:] == ["b"] * 31
    # -ngl 5 counts the output layer: the last 4 blocks and the output
    assert simulate(5, ["a"], [1], 61) == ["cpu"] * 57 + ["a"] * 5
    assert simulate(5, ["a"], [1], 61, counts_output=False) == ["cpu"] * 56 + ["a"] * 5 + ["cpu"]


def test_rpc_device_names_and_buffers(models):
    m = models["r1-ud-iq1_s"]
    hw = _two_gpus(80)
    hw = replace(hw, gpus=[replace(g, device=f"RPC{g.index}", endpoint=f"10.0.0.{g.index + 1}:50052",
                                   network_gbs=1.25, network_rtt_ms=0.2) for g in hw.gpus])
    p = make_plan(hw, m, PlanOptions(rules="moe-auto-fill"))
    args = placement_args(p)
    assert args[:2] == ["--rpc", "10.0.0.1:50052,10.0.0.2:50052"]
    assert args[args.index("-dev") + 1] in ("RPC0", "RPC0,RPC1")
    if "RPC0,RPC1" in args:  # experts auto-filled onto RPC1 while every layer is RPC0's: it gets no layers
        assert args[args.index("-ts") + 1].endswith(",0")
    assert all(a.endswith("=RPC0[10.0.0.2:50052]") for a in args if "_exps" in a)  # RPC1 = its server's device 0
    assert "network" in p.prediction.breakdown_ms and p.prediction.breakdown_ms["network"] > 0


def test_follow_attention_needs_auto():
    from hybridinfer.errors import HybridError

    with pytest.raises(HybridError) as e:
        rules.parse({"rules": [{"match": {}, "device": "gpu", "follow": "attention"}]})
    assert "follow" in str(e.value) and "device: auto" in str(e.value)
    with pytest.raises(HybridError):
        rules.parse({"rules": [{"match": {}, "device": "auto", "follow": "experts"}]})
