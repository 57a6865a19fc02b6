"""Model families (hybridinfer/archs): each family's tensor classes from llama.cpp's own tensor names, its KV
cache hand-computed from published hparams, the registry, and what the planner and engines ask of them.

Tensor names: llama.cpp 0.3.36 (the tree vendored in llama-cpp-python 0.3.36) src/llama-arch.cpp LLM_TENSOR_NAMES
and the per-arch load_arch_tensors in src/models/*.cpp. Hparams: each model's config.json as converted by that
tree's conversion/*.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGUFWriter
from gguf.constants import GGMLQuantizationType as Q

from hybridinfer import archs, engines
from hybridinfer.archs import FAMILIES, GENERIC, family_of
from hybridinfer.ggufio import parse
from hybridinfer.inspect_gguf import GROUPS, ModelInfo, inspect
from hybridinfer.plan import PlanOptions, _kv, make_plan
from hybridinfer.probe import load_profile

F16 = 2


def classes(fam, names, md=None):
    return {n: fam.tensor_class(n, md) for n in names}


# --- the registry ---------------------------------------------------------------------------------------------

def test_registry_covers_every_family_arch_once():
    seen = {}
    for f in FAMILIES.values():
        assert f.archs and f.reasoning in ("think", "harmony", "none"), f
        for a in f.archs:
            assert a not in seen, (a, f.name, seen.get(a))
            seen[a] = f.name
            assert family_of(a) is f
    for a in ("deepseek2", "deepseek32", "qwen3moe", "qwen3next", "qwen35moe", "glm4moe", "gpt-oss"):
        assert a in seen, a
    # Every family arch is one llama.cpp's tree knows (the engines say which they run).
    assert not [a for a in seen if engines.get("llama.cpp").runs_arch(a)]


@pytest.mark.parametrize("arch", ["llama", "qwen2moe", "mixtral", "unknown", "no-such-arch"])
def test_any_other_arch_is_the_generic_family(arch):
    assert family_of(arch) is GENERIC and GENERIC.name == "generic" and GENERIC.reasoning == "think"


# --- tensor classes -------------------------------------------------------------------------------------------

COMMON = {  # llama-arch.cpp names every family shares
    "token_embd.weight": "token_embd", "output.weight": "output", "output_norm.weight": "norms",
    "blk.0.attn_norm.weight": "norms", "blk.0.ffn_norm.weight": "norms",
    "blk.0.attn_q.weight": "attention", "blk.0.attn_k.weight": "attention", "blk.0.attn_v.weight": "attention",
    "blk.0.attn_output.weight": "attention",
}


def test_deepseek2_classes_mla_and_legacy():
    names = {**COMMON,
             "blk.0.attn_q_a.weight": "attention", "blk.0.attn_q_b.weight": "attention",
             "blk.0.attn_kv_a_mqa.weight": "attention", "blk.0.attn_k_b.weight": "attention",
             "blk.0.attn_v_b.weight": "attention", "blk.0.attn_kv_b.weight": "attention",
             "blk.0.attn_q_a_norm.weight": "norms", "blk.0.attn_kv_a_norm.weight": "norms",
             "blk.0.ffn_gate.weight": "dense_ffn", "blk.0.ffn_up.weight": "dense_ffn", "blk.0.ffn_down.weight": "dense_ffn",
             "blk.3.ffn_gate_inp.weight": "router", "blk.3.exp_probs_b.bias": "router",
             "blk.3.ffn_gate_exps.weight": "routed_experts", "blk.3.ffn_up_exps.weight": "routed_experts",
             "blk.3.ffn_down_exps.weight": "routed_experts", "blk.3.ffn_gate_shexp.weight": "shared_experts",
             "blk.3.ffn_up_shexp.weight": "shared_experts", "blk.3.ffn_down_shexp.weight": "shared_experts"}
    fam = family_of("deepseek2")
    assert fam.name == "deepseek2" and fam.mla and fam.reasoning == "think"
    assert classes(fam, names) == names
    assert classes(GENERIC, names) == names  # exactly what inspect said before families


def test_deepseek32_indexer_is_attention_and_mtp_block_is_nextn():
    md = {"general.architecture": "deepseek32", "deepseek32.block_count": 62, "deepseek32.nextn_predict_layers": 1}
    names = {"blk.5.indexer.k_norm.weight": "attention", "blk.5.indexer.k_norm.bias": "attention",
             "blk.5.indexer.proj.weight": "attention", "blk.5.indexer.attn_k.weight": "attention",
             "blk.5.indexer.attn_q_b.weight": "attention", "blk.5.attn_kv_a_mqa.weight": "attention",
             "blk.5.ffn_gate_exps.weight": "routed_experts",
             # block 61 is the MTP block: every tensor of it, not only nextn.*
             "blk.61.nextn.eh_proj.weight": "nextn", "blk.61.nextn.enorm.weight": "nextn",
             "blk.61.nextn.hnorm.weight": "nextn", "blk.61.nextn.shared_head_norm.weight": "nextn",
             "blk.61.ffn_gate_exps.weight": "nextn", "blk.61.attn_kv_a_mqa.weight": "nextn"}
    assert classes(family_of("deepseek32"), names, md) == names
    assert family_of("deepseek32").tensor_class("blk.61.nextn.eh_proj.weight") == "nextn"  # by name alone too


def test_qwen3moe_classes():
    names = {**COMMON, "blk.0.attn_q_norm.weight": "norms", "blk.0.attn_k_norm.weight": "norms",
             "blk.0.ffn_gate_inp.weight": "router", "blk.0.ffn_gate_exps.weight": "routed_experts",
             "blk.0.ffn_up_exps.weight": "routed_experts", "blk.0.ffn_down_exps.weight": "routed_experts"}
    assert classes(family_of("qwen3moe"), names) == names


def test_qwen3next_linear_attention_is_attention():
    names = {**COMMON, "blk.0.attn_qkv.weight": "attention", "blk.0.attn_gate.weight": "attention",
             "blk.0.ssm_conv1d.weight": "attention", "blk.0.ssm_dt.bias": "attention", "blk.0.ssm_a": "attention",
             "blk.0.ssm_ba.weight": "attention", "blk.0.ssm_alpha.weight": "attention",
             "blk.0.ssm_beta.weight": "attention", "blk.0.ssm_out.weight": "attention",
             "blk.0.ssm_norm.weight": "norms", "blk.0.post_attention_norm.weight": "norms",
             "blk.3.attn_q_norm.weight": "norms", "blk.0.ffn_gate_inp.weight": "router",
             "blk.0.ffn_gate_inp_shexp.weight": "shared_experts", "blk.0.ffn_up_shexp.weight": "shared_experts",
             "blk.0.ffn_down_exps.weight": "routed_experts"}
    for arch in ("qwen3next", "qwen35moe"):
        assert classes(family_of(arch), names) == names


def test_glm4moe_mtp_block_is_nextn():
    # GLM-4.5: 92 trunk blocks + 1 MTP block (block_count 93, nextn_predict_layers 1; conversion/glm.py).
    md = {"general.architecture": "glm4moe", "glm4moe.block_count": 93, "glm4moe.nextn_predict_layers": 1}
    names = {**COMMON, "blk.0.ffn_gate.weight": "dense_ffn", "blk.3.ffn_gate_inp.weight": "router",
             "blk.3.exp_probs_b.bias": "router", "blk.3.ffn_gate_exps.weight": "routed_experts",
             "blk.3.ffn_gate_shexp.weight": "shared_experts", "blk.0.attn_q.bias": "attention",
             "blk.92.nextn.eh_proj.weight": "nextn", "blk.92.nextn.embed_tokens.weight": "nextn",
             "blk.92.nextn.enorm.weight": "nextn", "blk.92.nextn.hnorm.weight": "nextn",
             "blk.92.nextn.shared_head_head.weight": "nextn", "blk.92.nextn.shared_head_norm.weight": "nextn",
             "blk.92.attn_q.weight": "nextn", "blk.92.ffn_down_exps.weight": "nextn", "blk.92.attn_norm.weight": "nextn"}
    assert classes(family_of("glm4moe"), names, md) == names


def test_gpt_oss_sinks_biases_and_experts():
    names = {**COMMON, "blk.0.attn_sinks.weight": "attention", "blk.0.attn_q.bias": "attention",
             "blk.0.attn_output.bias": "attention", "blk.0.post_attention_norm.weight": "norms",
             "blk.0.ffn_gate_inp.weight": "router", "blk.0.ffn_gate_inp.bias": "router",
             "blk.0.ffn_gate_exps.weight": "routed_experts", "blk.0.ffn_gate_exps.bias": "routed_experts",
             "blk.0.ffn_up_exps.bias": "routed_experts", "blk.0.ffn_down_exps.bias": "routed_experts"}
    fam = family_of("gpt-oss")
    assert classes(fam, names) == names and fam.reasoning == "harmony"
    assert not fam.opens_think("{% if add_generation_prompt %}<|start|>assistant{% endif %}")


def test_every_family_classifies_into_groups():
    names = list(COMMON) + ["blk.1.nextn.eh_proj.weight", "blk.1.ssm_out.weight", "blk.1.indexer.proj.weight",
                            "blk.1.whatever.weight", "rope_freqs.weight"]
    for f in [GENERIC, *FAMILIES.values()]:
        assert {f.tensor_class(n) for n in names} <= set(GROUPS), f


# --- KV cache -------------------------------------------------------------------------------------------------

def test_deepseek2_kv_unchanged_mla_and_legacy():
    # R1: 61 layers, kv_lora_rank 512, rope 64 -> MLA 576 values/token/layer; legacy: 128 heads x (192 + 128).
    md = {"deepseek2.block_count": 61, "deepseek2.attention.kv_lora_rank": 512, "deepseek2.rope.dimension_count": 64,
          "deepseek2.attention.head_count": 128, "deepseek2.attention.key_length": 192,
          "deepseek2.attention.value_length": 128}
    legacy = family_of("deepseek2").kv_cache(md, "deepseek2")
    mla = family_of("deepseek2").kv_cache({**md, "deepseek2.attention.key_length_mla": 192}, "deepseek2")
    assert (mla.form, mla.values_per_token_per_layer, mla.layers, mla.bytes_per_token["f16"]) == ("mla", 576, 61, 576 * 61 * F16)
    assert (legacy.form, legacy.values_per_token_per_layer) == ("legacy-mha", 128 * 320)
    assert mla.bytes_at(32768, "f16") == 576 * 61 * F16 * 32768


def test_deepseek32_mla_plus_indexer_over_the_trunk():
    # DeepSeek-V3.2-Exp config.json: 61 layers (+1 MTP: block_count 62), kv_lora_rank 512, qk_rope_head_dim 64,
    # index_head_dim 128 (-> attention.indexer.key_length), index_n_heads 64, index_topk 2048.
    md = {"deepseek32.block_count": 62, "deepseek32.nextn_predict_layers": 1, "deepseek32.attention.kv_lora_rank": 512,
          "deepseek32.rope.dimension_count": 64, "deepseek32.attention.key_length_mla": 192,
          "deepseek32.attention.head_count": 128, "deepseek32.attention.indexer.key_length": 128,
          "deepseek32.attention.indexer.head_count": 64}
    kv = family_of("deepseek32").kv_cache(md, "deepseek32")
    assert (kv.form, kv.layers, kv.values_per_token_per_layer, kv.indexer_values_per_token_per_layer) == ("mla", 61, 576, 128)
    assert kv.bytes_per_token["f16"] == (576 + 128) * 61 * F16 == 85_888


def test_qwen3moe_kv():
    # Qwen3-235B-A22B config.json: 94 layers, 4 KV heads, head_dim 128.
    md = {"qwen3moe.block_count": 94, "qwen3moe.attention.head_count": 64, "qwen3moe.attention.head_count_kv": 4,
          "qwen3moe.embedding_length": 4096, "qwen3moe.attention.key_length": 128, "qwen3moe.attention.value_length": 128}
    kv = family_of("qwen3moe").kv_cache(md, "qwen3moe")
    assert kv.bytes_per_token["f16"] == 94 * 4 * 256 * F16 == 192_512 and kv.bytes_at(8192, "f16") == 192_512 * 8192


def test_glm4moe_kv_skips_the_mtp_block():
    # GLM-4.5 config.json: 92 layers + 1 nextn, 8 KV heads, head_dim 128 (96 query heads, hidden 5120).
    md = {"glm4moe.block_count": 93, "glm4moe.nextn_predict_layers": 1, "glm4moe.attention.head_count": 96,
          "glm4moe.attention.head_count_kv": 8, "glm4moe.embedding_length": 5120, "glm4moe.attention.key_length": 128,
          "glm4moe.attention.value_length": 128}
    kv = family_of("glm4moe").kv_cache(md, "glm4moe")
    assert kv.layers == 92 and kv.bytes_per_token["f16"] == 92 * 8 * 256 * F16 == 376_832


GPT_OSS_120B = {"gpt-oss.block_count": 36, "gpt-oss.attention.head_count": 64, "gpt-oss.attention.head_count_kv": 8,
                "gpt-oss.embedding_length": 2880, "gpt-oss.attention.key_length": 64,
                "gpt-oss.attention.value_length": 64, "gpt-oss.attention.sliding_window": 128}


def test_gpt_oss_kv_sliding_window_on_alternate_layers():
    # gpt-oss-120b config.json: 36 layers alternating sliding (window 128) / full, 8 KV heads of 64.
    kv = family_of("gpt-oss").kv_cache(GPT_OSS_120B, "gpt-oss")
    per_layer = 8 * (64 + 64) * F16  # 2048 B per token per layer
    assert (kv.layers, kv.swa_layers, kv.swa_window) == (18, 18, 128)
    assert kv.bytes_per_token["f16"] == 18 * per_layer == 36_864 == kv.swa_bytes_per_token["f16"]
    # At 32768 tokens, 1 slot: the full layers hold 32768 cells; the sliding ones pad(128 + ubatch 512, 256) = 768.
    assert kv.bytes_at(32768, "f16") == 36_864 * 32768 + 36_864 * 768 == 1_236_271_104
    # 4 slots: pad(4 x 128 + 512) = 1024 cells; a context shorter than that caps it.
    assert kv.bytes_at(32768, "f16", slots=4) == 36_864 * (32768 + 1024)
    assert kv.bytes_at(512, "f16") == 36_864 * 512 * 2


QWEN3_NEXT_80B = {  # Qwen3-Next-80B-A3B config.json via conversion/qwen.py
    "qwen3next.block_count": 48, "qwen3next.full_attention_interval": 4, "qwen3next.attention.head_count": 16,
    "qwen3next.attention.head_count_kv": 2, "qwen3next.embedding_length": 2048, "qwen3next.attention.key_length": 256,
    "qwen3next.attention.value_length": 256, "qwen3next.ssm.conv_kernel": 4, "qwen3next.ssm.state_size": 128,
    "qwen3next.ssm.group_count": 16, "qwen3next.ssm.time_step_rank": 32, "qwen3next.ssm.inner_size": 4096}


def test_qwen3next_kv_on_every_fourth_layer_and_a_state_per_slot():
    kv = family_of("qwen3next").kv_cache(QWEN3_NEXT_80B, "qwen3next")
    assert (kv.layers, kv.state_layers) == (12, 36)  # layers 3, 7, ..., 47 attend fully
    assert kv.bytes_per_token["f16"] == 12 * 2 * 512 * F16 == 24_576
    # per recurrent layer: conv (4-1) x (4096 + 2 x 16 x 128) + state 128 x 4096 values, f32
    per_layer = (3 * (4096 + 2 * 16 * 128) + 128 * 4096) * 4
    assert per_layer == 2_195_456 and kv.state_bytes_per_slot == 36 * per_layer
    assert kv.bytes_at(32768, "q8_0", slots=2) == kv.bytes_per_token["q8_0"] * 32768 + 2 * 36 * per_layer
    explicit = family_of("qwen3next").kv_cache(
        {**QWEN3_NEXT_80B, "qwen3next.attention.recurrent_layers": [i % 2 == 0 for i in range(48)]}, "qwen3next")
    assert (explicit.layers, explicit.state_layers) == (24, 24)


# --- inspect, plan and engines over a written header ---------------------------------------------------------

def _write(path, arch, md, tensors):
    w = GGUFWriter(str(path), arch)
    for k, v in md.items():
        if isinstance(v, bool) or isinstance(v, list):
            w.add_array(k, v) if isinstance(v, list) else w.add_bool(k, v)
        else:
            w.add_uint32(k, v)
    w.add_token_list([f"t{i}" for i in range(256)])
    for name, shape, qt in tensors:
        n = int(np.prod(shape)) * (2 if qt == Q.F16 else 4)
        w.add_tensor_info(name, tuple(reversed(shape)), np.dtype(np.float32), n, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    os.truncate(path, parse(str(path), 0)[2])  # sparse: the data region the header describes
    return str(path)


def _gpt_oss_small(tmp_path):
    md = {**{k: v for k, v in GPT_OSS_120B.items()}, "gpt-oss.block_count": 4, "gpt-oss.embedding_length": 256,
          "gpt-oss.expert_count": 4, "gpt-oss.expert_used_count": 2, "gpt-oss.expert_feed_forward_length": 128,
          "gpt-oss.context_length": 131072}
    t = [("token_embd.weight", (256, 256), Q.F16)]
    for i in range(4):
        p = f"blk.{i}."
        t += [(p + "attn_norm.weight", (256,), Q.F32), (p + "post_attention_norm.weight", (256,), Q.F32),
              (p + "attn_q.weight", (256, 64 * 64), Q.F16), (p + "attn_k.weight", (256, 8 * 64), Q.F16),
              (p + "attn_v.weight", (256, 8 * 64), Q.F16), (p + "attn_output.weight", (64 * 64, 256), Q.F16),
              (p + "attn_sinks.weight", (64,), Q.F32), (p + "ffn_gate_inp.weight", (256, 4), Q.F32),
              (p + "ffn_gate_exps.weight", (256, 128, 4), Q.F16), (p + "ffn_up_exps.weight", (256, 128, 4), Q.F16),
              (p + "ffn_down_exps.weight", (128, 256, 4), Q.F16)]
    t += [("output_norm.weight", (256,), Q.F32), ("output.weight", (256, 256), Q.F16)]
    return _write(tmp_path / "gpt-oss-small.gguf", "gpt-oss", md, t)


def test_inspect_asks_the_family_and_old_json_still_loads(tmp_path):
    m = inspect(_gpt_oss_small(tmp_path))
    assert m.family == "gpt-oss" and m.kv.swa_layers == 2 and m.kv.layers == 2 and m.kv.swa_window == 128
    assert m.groups["attention"].tensors == 4 * 5 and m.groups["routed_experts"].tensors == 12
    old = m.to_dict(tensors=True)
    for k in ("family", "nextn_layers"):
        old.pop(k)
    for k in ("swa_layers", "swa_window", "swa_bytes_per_token", "state_layers", "state_bytes_per_slot",
              "indexer_values_per_token_per_layer"):
        old["kv"].pop(k)
    import json
    back = ModelInfo.from_json(json.dumps(old))
    assert back.family == "" and back.kv.swa_layers == 0 and back.kv.bytes_at(100, "f16") == back.kv.bytes_per_token["f16"] * 100


def test_planner_sizes_the_cache_at_ctx_through_the_model(tmp_path):
    m = inspect(_gpt_oss_small(tmp_path))
    llama = engines.get("llama.cpp")
    kv = _kv(llama, m, "f16", 32768, slots=2)
    total = m.kv.bytes_at(32768, "f16", slots=2)
    assert kv.per_token == m.kv.bytes_per_token["f16"] and abs(kv.per_layer * 4 - total) < 4
    p = make_plan(load_profile("desktop-4090"), m, PlanOptions(engine="llama.cpp", ctx=32768, parallel=2))
    gpu = next(d for d in p.devices if d.device == "gpu:0")
    assert abs(gpu.kv_cache - total) < 8
    assert any("sliding-window" in r.text for r in p.reasons)


def test_engines_say_which_archs_they_run():
    assert engines.get("llama.cpp").runs_arch("deepseek32") is None
    assert engines.get("llama.cpp").runs_arch("gpt-oss") is None
    assert "deepseek32" in engines.get("ik_llama.cpp").runs_arch("deepseek32")
    for a in ("deepseek4", "kimi-linear", "grovemoe", "lfm2moe"):
        assert engines.get("ik_llama.cpp").runs_arch(a), a
    for a in ("deepseek2", "qwen3moe", "glm4moe", "gpt-oss", "qwen3next", "qwen35moe"):
        assert engines.get("ik_llama.cpp").runs_arch(a) is None, a
    for name in ("ktransformers", "kt-sglang"):
        assert engines.get(name).runs_arch("deepseek2") is None and engines.get(name).runs_arch("glm4moe")


def test_inspect_support_table_refuses_an_arch_the_engine_lacks(tmp_path):
    m = inspect(_gpt_oss_small(tmp_path))
    table = engines.support_table(m)
    assert all(v["ktransformers"].startswith("refused: architecture gpt-oss") for v in table.values())
    assert all(v["llama.cpp"] == "ok" for v in table.values())


def test_mla_is_asked_of_the_family_not_the_arch_string():
    assert family_of("deepseek2").mla and family_of("deepseek32").mla
    assert not any(family_of(a).mla for a in ("qwen3moe", "glm4moe", "gpt-oss", "llama"))
    assert archs.FAMILIES["deepseek2"] is family_of("deepseek2")
