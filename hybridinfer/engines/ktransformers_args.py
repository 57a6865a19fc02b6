"""Compile a placement into KTransformers' native forms:

- legacy engine (0.2-0.4.1): an optimize-rule YAML over module names (`model.layers.N.mlp.experts`, ...),
  first match wins, modelled on its DeepSeek-V3 single-GPU rules;
- kt-kernel + SGLang: `--kt-*` launch flags (engines/kt_sglang.py).

KTransformers places whole modules and can put only routed experts on the CPU; a placement that puts anything
else there cannot be expressed and raises `Unsupported` (the planner then picks llama.cpp).
"""

from __future__ import annotations

import re

import yaml

from .kt_versions import VERSIONS, KtVersion

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


V3 = "ktransformers.models.modeling_deepseek_v3."
OPS = "ktransformers.operators."


def optimize_rules(device_of: dict[str, str], version: KtVersion | None = None, backend: str = "ktransformers",
                   marlin: bool = True) -> str:
    """The optimize-rule YAML for `ktransformers --optimize_config_path`, in the form `version`'s own rule files
    take for `backend` (R: DeepSeek-V3-Chat.yaml for "ktransformers", DeepSeek-V3-Chat-serve.yaml for
    "balance_serve"). `marlin`: the GPU runs Marlin kernels (compute capability >= 8.0); otherwise every GPU
    linear uses KLinearTorch and no experts go to the GPU."""
    version = version or VERSIONS["v0.4.1"]
    expert_dev, gpu = _expert_devices(device_of)
    gpu_blocks = sorted(b for b, d in expert_dev.items() if d != "cpu")
    serve = backend == "balance_serve"
    _check_backend(version, serve, marlin, gpu_blocks)
    dev = {"generate_device": gpu, "prefill_device": gpu}
    rules = _gpu_module_rules(version, serve, marlin, dev)
    rules += _expert_rules(version, serve, gpu, gpu_blocks, cpu_experts=any(d == "cpu" for d in expert_dev.values()))
    rules += _model_rules(version, serve, dev)
    header = (f"# KTransformers {version.name} optimize rules ({backend} backend), compiled by hybridinfer from its "
              "placement. First match wins.\n")
    return header + yaml.safe_dump(rules, sort_keys=False, width=200)


def _expert_devices(device_of: dict[str, str]) -> tuple[dict[int, str], str]:
    """(block -> its routed experts' device, the GPU as cuda:N): only routed experts may be on the CPU, and one GPU
    holds the rest."""
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
    return expert_dev, _cuda(next(iter(gpus))) if gpus else "cuda:0"


def _check_backend(version: KtVersion, serve: bool, marlin: bool, gpu_blocks: list[int]) -> None:
    """The backend exists in `version`, and runs GPU experts if the placement has any."""
    if serve and not version.flashinfer_attn:
        raise Unsupported(f"KTransformers {version.name} has no balance_serve backend (it came with 0.2.4)")
    if gpu_blocks and (serve or not marlin):
        raise Unsupported("routed experts on the GPU run only as KExpertsMarlin under the ktransformers backend "
                          + ("(balance_serve's KTransformersExpertsV2 calls them with batch arguments Marlin lacks)"
                             if serve else "(Marlin needs compute capability 8.0 or newer)"))


def _gpu_module_rules(version: KtVersion, serve: bool, marlin: bool, dev: dict) -> list[dict]:
    """RoPE, the linear layers (lm_head from v0.2.2 on; one shared `replace`, as the release files have it), the
    MoE block and its gate, all on the GPU."""
    linear_op = ("VLinearMarlin" if serve else "KLinearMarlin") if marlin else "KLinearTorch"
    linear = {"class": OPS + "linear.KTransformersLinear",
              "kwargs": {**dev, "generate_op": linear_op, "prefill_op": "KLinearTorch"}}
    rules = [{"match": {"class": V3 + "DeepseekV3RotaryEmbedding"},
              "replace": {"class": OPS + "RoPE.YarnRotaryEmbeddingV3", "kwargs": dict(dev)}}]
    if serve or version.at_least("v0.2.2"):  # R: lm_head as KTransformersLinear from v0.2.2 on
        rules.append({"match": {"name": r"^lm_head$", "class": "torch.nn.Linear"}, "replace": linear})
    rules += [
        {"match": {"name": r"^model\.layers\.(?!.*self_attn\.kv_b_proj).*$", "class": "torch.nn.Linear"},
         "replace": linear},
        {"match": {"name": r"^model\.layers\..*\.mlp$", "class": V3 + "DeepseekV3MoE"},
         "replace": {"class": OPS + ("experts.KDeepseekV3MoEV2" if serve else "experts.KDeepseekV3MoE"),
                     "kwargs": dict(dev)}},
        {"match": {"class": V3 + "MoEGate"}, "replace": {"class": OPS + "gate.KMoEGate", "kwargs": dict(dev)}},
    ]
    return rules


def _expert_rules(version: KtVersion, serve: bool, gpu: str, gpu_blocks: list[int], cpu_experts: bool) -> list[dict]:
    """The routed experts: the GPU blocks' first (Marlin), then every other block's on the CPU."""
    rules = []
    if gpu_blocks:  # earlier rule wins: these layers' experts run on the GPU (Marlin, 4-bit)
        rules.append({"match": {"name": rf"^model\.layers\.{_layers_re(gpu_blocks)}\.mlp\.experts$"},
                      "replace": {"class": OPS + "experts.KTransformersExperts",
                                  "kwargs": {"generate_device": gpu, "generate_op": "KExpertsMarlin",
                                             "prefill_device": gpu, "prefill_op": "KExpertsTorch",
                                             "out_device": gpu}},
                      "recursive": False})
    if cpu_experts:
        kwargs = {"prefill_device": gpu, "prefill_op": "KExpertsTorch", "generate_device": "cpu",
                  "generate_op": "KExpertsCPU", "out_device": gpu}
        if version.expert_backend_kwarg:  # X: read from v0.3 on (llamafile reads the GGUF's own quant types)
            kwargs["backend"] = "llamafile"
        rules.append({"match": {"name": r"^model\.layers\..*\.mlp\.experts$"},
                      "replace": {"class": OPS + ("experts.KTransformersExpertsV2" if serve
                                                  else "experts.KTransformersExperts"), "kwargs": kwargs},
                      "recursive": False})
    return rules


def _model_rules(version: KtVersion, serve: bool, dev: dict) -> list[dict]:
    """Attention, the model wrapper, the embedding on the CPU, and balance_serve's norms and dense MLPs."""
    attn = {"class": (version.flashinfer_attn + ".flashinfer_attn") if serve else OPS + "attention.KDeepseekV2Attention",
            "kwargs": dict(dev)}
    if serve or version.at_least("v0.2.2"):  # R: absorb_for_prefill from v0.2.2 on
        attn["kwargs"]["absorb_for_prefill"] = False
    rules = [
        {"match": {"name": r"^model\.layers\..*\.self_attn$"}, "replace": attn},
        {"match": {"name": r"^model$"},
         "replace": {"class": OPS + "models.KDeepseekV2Model", "kwargs": {"per_layer_prefill_intput_threshold": 0}}},
        {"match": {"name": r"^model.embed_tokens"},
         "replace": {"class": "default", "kwargs": {"generate_device": "cpu", "prefill_device": "cpu"}}},
    ]
    if serve:
        rules += [{"match": {"class": V3 + "DeepseekV3RMSNorm"},
                   "replace": {"class": OPS + "layernorm.RMSNorm", "kwargs": dict(dev)}},
                  {"match": {"class": V3 + "DeepseekV3MLP"},
                   "replace": {"class": OPS + "mlp.kDeepseekV3MLP", "kwargs": dict(dev)}}]
    return rules
