"""Compile a placement into KTransformers' native forms:

- legacy engine (0.2-0.4.1): an optimize-rule YAML over module names (`model.layers.N.mlp.experts`, ...),
  first match wins, modelled on its DeepSeek-V3 single-GPU rules;
- kt-kernel + SGLang (0.7.x): `--kt-*` launch flags.

KTransformers places whole modules and can put only routed experts on the CPU; a placement that puts anything
else there cannot be expressed and raises `Unsupported` (the planner then picks llama.cpp).
"""

from __future__ import annotations

import re

import yaml

BLK = re.compile(r"^blk\.(\d+)\.")


class Unsupported(ValueError):
    pass


def module_of(tensor: str) -> str:
    """GGUF tensor name -> the HF module KTransformers matches its rules against."""
    if tensor.startswith("token_embd."):
        return "model.embed_tokens"
    if tensor.startswith("output."):
        return "lm_head"
    if tensor.startswith("output_norm."):
        return "model.norm"
    m = BLK.match(tensor)
    if not m:
        return tensor
    i, rest = m.group(1), tensor[m.end():]
    if re.match(r"ffn_(gate|up|down)_(ch)?exps\.", rest):
        return f"model.layers.{i}.mlp.experts"
    if "_shexp" in rest:
        return f"model.layers.{i}.mlp.shared_experts"
    if rest.startswith(("ffn_gate_inp.", "exp_probs_b.")):
        return f"model.layers.{i}.mlp.gate"
    if rest.startswith("attn_norm."):
        return f"model.layers.{i}.input_layernorm"
    if rest.startswith("ffn_norm."):
        return f"model.layers.{i}.post_attention_layernorm"
    if rest.startswith("attn_"):
        return f"model.layers.{i}.self_attn"
    return f"model.layers.{i}.mlp"


def _cuda(dev: str) -> str:
    return "cuda:" + dev.split(":")[1]


def _layers_re(blocks: list[int]) -> str:
    return "(" + "|".join(str(b) for b in sorted(blocks)) + ")"


def optimize_rules(device_of: dict[str, str]) -> str:
    """The optimize-rule YAML text for `ktransformers --optimize_config_path`."""
    expert_dev: dict[int, str] = {}
    gpus = set()
    for name, dev in device_of.items():
        mod = module_of(name)
        if mod.endswith(".mlp.experts"):
            expert_dev[int(BLK.match(name).group(1))] = dev
        elif dev == "cpu" and mod != "model.embed_tokens":
            raise Unsupported(f"KTransformers keeps {mod} on the GPU; only routed experts may be placed on the CPU")
        if dev != "cpu":
            gpus.add(dev)
    if len(gpus) > 1:
        raise Unsupported("multi-GPU placement for KTransformers needs per-device rule files with transfer_map; "
                          "hybridinfer compiles single-GPU rules only")
    gpu = _cuda(next(iter(gpus))) if gpus else "cuda:0"
    rules = [
        {"match": {"class": "ktransformers.models.modeling_deepseek_v3.DeepseekV3RotaryEmbedding"},
         "replace": {"class": "ktransformers.operators.RoPE.YarnRotaryEmbeddingV3",
                     "kwargs": {"generate_device": gpu, "prefill_device": gpu}}},
        {"match": {"name": r"^lm_head$", "class": "torch.nn.Linear"},
         "replace": {"class": "ktransformers.operators.linear.KTransformersLinear",
                     "kwargs": {"generate_device": gpu, "prefill_device": gpu,
                                "generate_op": "KLinearMarlin", "prefill_op": "KLinearTorch"}}},
        {"match": {"name": r"^model\.layers\.(?!.*self_attn\.kv_b_proj).*$", "class": "torch.nn.Linear"},
         "replace": {"class": "ktransformers.operators.linear.KTransformersLinear",
                     "kwargs": {"generate_device": gpu, "prefill_device": gpu,
                                "generate_op": "KLinearMarlin", "prefill_op": "KLinearTorch"}}},
        {"match": {"name": r"^model\.layers\..*\.mlp$", "class": "ktransformers.models.modeling_deepseek_v3.DeepseekV3MoE"},
         "replace": {"class": "ktransformers.operators.experts.KDeepseekV3MoE",
                     "kwargs": {"generate_device": gpu, "prefill_device": gpu}}},
        {"match": {"name": r"^model\.layers\..*\.mlp\.gate$", "class": "ktransformers.models.modeling_deepseek_v3.MoEGate"},
         "replace": {"class": "ktransformers.operators.gate.KMoEGate",
                     "kwargs": {"generate_device": gpu, "prefill_device": gpu}}},
    ]
    gpu_blocks = sorted(b for b, d in expert_dev.items() if d != "cpu")
    if gpu_blocks:  # earlier rule wins: these layers' experts run on the GPU (Marlin, 4-bit)
        rules.append({"match": {"name": rf"^model\.layers\.{_layers_re(gpu_blocks)}\.mlp\.experts$"},
                      "replace": {"class": "ktransformers.operators.experts.KTransformersExperts",
                                  "kwargs": {"generate_device": gpu, "generate_op": "KExpertsMarlin",
                                             "prefill_device": gpu, "prefill_op": "KExpertsTorch",
                                             "out_device": gpu}},
                      "recursive": False})
    if any(d == "cpu" for d in expert_dev.values()):
        rules.append({"match": {"name": r"^model\.layers\..*\.mlp\.experts$"},
                      "replace": {"class": "ktransformers.operators.experts.KTransformersExperts",
                                  "kwargs": {"prefill_device": gpu, "prefill_op": "KExpertsTorch",
                                             "generate_device": "cpu", "generate_op": "KExpertsCPU",
                                             "out_device": gpu, "backend": "llamafile"}},
                      "recursive": False})
    rules += [
        {"match": {"name": r"^model\.layers\..*\.self_attn$"},
         "replace": {"class": "ktransformers.operators.attention.KDeepseekV2Attention",
                     "kwargs": {"generate_device": gpu, "prefill_device": gpu, "absorb_for_prefill": False}}},
        {"match": {"name": r"^model$"},
         "replace": {"class": "ktransformers.operators.models.KDeepseekV2Model",
                     "kwargs": {"per_layer_prefill_intput_threshold": 0}}},
        {"match": {"name": r"^model\.embed_tokens"},
         "replace": {"class": "default", "kwargs": {"generate_device": "cpu", "prefill_device": "cpu"}}},
        {"match": {"name": r"^model\.norm$"},
         "replace": {"class": "default", "kwargs": {"generate_device": gpu, "prefill_device": gpu}}},
    ]
    header = "# KTransformers optimize rules, compiled by hybridinfer from its placement. First match wins.\n"
    return header + yaml.safe_dump(rules, sort_keys=False, width=200)


def select(rules_yaml: str, modules: dict[str, str]) -> dict[str, dict]:
    """Which rule (its `replace`) each module gets, with KTransformers' semantics: the first rule whose
    `name` regex is found in the module name and whose `class` (if any) is the module's class.
    `modules`: module name -> its class import path."""
    rules = yaml.safe_load(rules_yaml)
    out = {}
    for mod, cls in modules.items():
        for r in rules:
            pat, want = r["match"].get("name"), r["match"].get("class")
            if (pat is None or re.search(pat, mod)) and (want is None or want == cls):
                out[mod] = r["replace"]
                break
    return out


def kt_kernel_flags(device_of: dict[str, str], n_expert: int, n_moe_layers: int, cpu_threads: int,
                    numa_nodes: int, routed_types: set[str]) -> list[str]:
    """kt-kernel/SGLang launch flags. It spreads GPU experts evenly, so blocks-on-GPU become a per-layer count."""
    gpu_expert_tensors = sum(1 for n, d in device_of.items() if d != "cpu" and module_of(n).endswith(".mlp.experts"))
    per_layer = (gpu_expert_tensors // 3) * n_expert // max(1, n_moe_layers)
    method = "LLAMAFILE"  # reads the GGUF's own quant types directly
    return ["--kt-method", method, "--kt-cpuinfer", str(cpu_threads), "--kt-threadpool-count", str(numa_nodes),
            "--kt-num-gpu-experts", str(per_layer)]
