"""The compiled engine forms select exactly the intended tensors."""
import re

import yaml

from hybridinfer import rules
from hybridinfer.engines import ktransformers_args as kt
from kt_rules import select
from hybridinfer.engines.llamacpp_args import CPU_MOE_RE, apply, compile_placement

GIB = 1024**3


def _resolve(m, name, budgets):
    return rules.resolve(rules.load(name), m, budgets).device_of


def test_experts_on_cpu_is_cpu_moe(models):
    m = models["r1-ud-iq1_s"]
    dev = _resolve(m, "moe-experts-on-cpu", {"gpu:0": 200 * GIB})
    c = compile_placement(dev, m.block_count)
    assert c.cpu_moe and c.args() == ["-ngl", "999", "--cpu-moe"]
    # llama.cpp's --cpu-moe regex, applied to the R1 tensor list, hits all 58 x 3 routed experts and nothing else
    hit = [t.name for t in m.tensors if re.search(CPU_MOE_RE, t.name)]
    assert len(hit) == 174 and all(m.tensors[[x.name for x in m.tensors].index(h)].cls == "routed_experts" for h in hit)
    assert not any(re.search(CPU_MOE_RE, t.name) for t in m.tensors if "shexp" in t.name)


def test_auto_fill_ot_list(models):
    m = models["r1-ud-iq1_s"]
    fixed = sum(t.nbytes for t in m.tensors if t.cls not in ("routed_experts", "token_embd"))
    per_block = sum(t.nbytes for t in m.tensors if t.cls == "routed_experts" and t.block == 3)
    dev = _resolve(m, "moe-auto-fill", {"gpu:0": fixed + 3 * per_block + 1})
    c = compile_placement(dev, m.block_count)
    assert c.ngl == 999 and not c.cpu_moe
    assert c.overrides == [(r"^blk\.(3|4|5)\.ffn_(down|gate|up)_exps\.weight$", "gpu:0"),
                           (r"\.ffn_(down|gate|up)_exps\.weight$", "cpu")]
    placed = apply([t.name for t in m.tensors], c.overrides, c.ngl, m.block_count)
    assert placed == dev
    cpu = [n for n, d in placed.items() if d == "cpu"]
    assert len(cpu) == 55 * 3 + 1  # 55 blocks of experts + token_embd
    assert "-ot" in c.args() and r"\.ffn_(down|gate|up)_exps\.weight$=CPU" in c.args()


def test_layer_split_is_plain_ngl(models):
    m = models["r1-ud-iq1_s"]
    budget = 22 * GIB
    dev = _resolve(m, "layer-split", {"gpu:0": budget})
    c = compile_placement(dev, m.block_count)
    gpu_blocks = sorted({t.block for t in m.tensors if t.block is not None and dev[t.name] != "cpu"})
    assert c.overrides == [] and c.ngl == len(gpu_blocks) + 1  # llama.cpp's -ngl counts the output layer
    assert gpu_blocks == list(range(61 - len(gpu_blocks), 61))  # the last N, like -ngl N
    assert dev["output.weight"] == "gpu:0" and dev["output_norm.weight"] == "gpu:0"
    assert dev["token_embd.weight"] == "cpu"
    assert c.layer == ["cpu"] * (61 - len(gpu_blocks)) + ["gpu:0"] * (len(gpu_blocks) + 1)


def test_multi_gpu_and_cpu_only(models):
    m = models["r1-ud-iq1_s"]
    dev = _resolve(m, "multi-gpu", {"gpu:0": 20 * GIB, "gpu:1": 20 * GIB})
    c = compile_placement(dev, m.block_count)
    assert c.placement([t.name for t in m.tensors]) == dev
    assert {"gpu:0", "gpu:1", "cpu"} == set(dev.values())
    # every layer (so its KV cache) on a GPU, one contiguous block range per GPU in order, the head with the last
    att = [dev[f"blk.{b}.attn_norm.weight"] for b in range(61)]
    k = att.index("gpu:1")
    assert att == ["gpu:0"] * k + ["gpu:1"] * (61 - k) and 20 < k < 40
    assert dev["output.weight"] == dev["output_norm.weight"] == "gpu:1"
    assert c.layer == att + ["gpu:1"]
    assert c.args()[:8] == ["-ngl", "999", "-dev", "CUDA0,CUDA1", "-sm", "layer", "-ts", f"{k},{62 - k}"]
    # each GPU holds the experts of its own first MoE blocks; the rest in RAM
    on0 = sorted({int(n.split(".")[1]) for n, d in dev.items() if "_exps" in n and d == "gpu:0"})
    on1 = sorted({int(n.split(".")[1]) for n, d in dev.items() if "_exps" in n and d == "gpu:1"})
    assert on0 and on1 and on0 == list(range(3, 3 + len(on0))) and on1 == list(range(k, k + len(on1)))
    assert c.args()[-1].endswith("=CPU")
    dev = _resolve(m, "cpu-only", {})
    assert compile_placement(dev, m.block_count).args() == ["-ngl", "0"]


def test_qwen3moe_and_dense(models):
    for name in ("qwen3moe-30b-a3b-q4_k_m", "mixtral-8x7b-q4_k_m", "llama3-8b-q4_k_m"):
        m = models[name]
        for rn in ("moe-experts-on-cpu", "layer-split"):
            dev = _resolve(m, rn, {"gpu:0": 6 * GIB})
            c = compile_placement(dev, m.block_count)
            assert apply([t.name for t in m.tensors], c.overrides, c.ngl, m.block_count) == dev


def test_ktransformers_rules_select_modules(models):
    m = models["r1-ud-iq1_s"]
    fixed = sum(t.nbytes for t in m.tensors if t.cls not in ("routed_experts", "token_embd"))
    per_block = sum(t.nbytes for t in m.tensors if t.cls == "routed_experts" and t.block == 3)
    dev = _resolve(m, "moe-auto-fill", {"gpu:0": fixed + 2 * per_block + 1})
    text = kt.optimize_rules(dev)
    assert yaml.safe_load(text)
    V3 = "ktransformers.models.modeling_deepseek_v3."
    mods = {f"model.layers.{i}.mlp.experts": "torch.nn.ModuleList" for i in range(3, 61)}
    mods.update({f"model.layers.{i}.self_attn": V3 + "DeepseekV3Attention" for i in range(61)})
    mods.update({f"model.layers.{i}.mlp": V3 + "DeepseekV3MoE" for i in range(3, 61)})
    mods.update({f"model.layers.{i}.self_attn.q_a_proj": "torch.nn.Linear" for i in range(61)})
    mods["model.embed_tokens"] = "torch.nn.Embedding"
    sel = select(text, mods)
    for i in range(3, 61):
        k = sel[f"model.layers.{i}.mlp.experts"]["kwargs"]
        if i in (3, 4):
            assert k["generate_op"] == "KExpertsMarlin" and k["generate_device"] == "cuda:0"
        else:
            assert k["generate_op"] == "KExpertsCPU" and k["generate_device"] == "cpu"
    assert all(sel[f"model.layers.{i}.self_attn"]["class"].endswith("KDeepseekV2Attention") for i in range(61))
    assert all(sel[f"model.layers.{i}.mlp"]["class"].endswith("KDeepseekV3MoE") for i in range(3, 61))
    assert sel["model.layers.0.self_attn.q_a_proj"]["kwargs"]["generate_op"] == "KLinearMarlin"
    assert sel["model.embed_tokens"]["kwargs"]["generate_device"] == "cpu"
    assert {kt.module_of(t.name) for t in m.tensors if t.cls == "routed_experts"} == {f"model.layers.{i}.mlp.experts" for i in range(3, 61)}


def test_ktransformers_refuses_attention_on_cpu(models):
    import pytest
    m = models["r1-ud-iq1_s"]
    with pytest.raises(kt.Unsupported):
        kt.optimize_rules(_resolve(m, "layer-split", {"gpu:0": 22 * GIB}))
