"""ik_llama.cpp as an engine: ikawrakow's llama.cpp fork with faster CPU kernels for DeepSeek-style MoE (FlashMLA-3
on CPU and CUDA, fused MoE up/gate, run-time repacking into row-interleaved types) and its own quant types
(IQ*_K, IQ*_KS, IQ*_KT, _R4/_R8 layouts). Its server and bench are llama.cpp's with different flags, so this is
the mainline engine with a different binary, flag set and capabilities.

Facts from the tree vendored in PyPI's ik-llama-cpp-python 0.1.5 (`vendor/ik_llama.cpp`), which install.sh builds:
- common/common.cpp: `-mla N` (default 3), `-fa auto|on|off` (default on), fused MoE on by default (`-no-fmoe`
  turns it off; older trees took `-fmoe` to turn it on), `-amb N` (MiB cap on the MLA attention buffer),
  `-rtr` / `--run-time-repack` (also turns mmap off), `-ot`, `--cpu-moe`, `--numa`, `-ctk`. Its --help omits `-ot`
  and the short `-rtr`, which its parser takes: `flags()` adds them.
- src/llama-hparams.cpp: a mainline-converted MLA GGUF (`head_count_kv` 1) loads only with key 576 / value 512,
  rope 64 and heads divisible by 4, else "Detected incompatible DeepSeek model" and an abort; an older GGUF with
  only `attn_kv_b` gets its MLA tensors built at load time, so it caches the compressed latent either way.
- examples/server/server.cpp: binds TCP only (no Unix socket); /health, /metrics (`llamacpp:` names, without
  mainline's n_decode_total, n_busy_slots_per_decode, n_tokens_max, prompt_tokens_cached_total), /tokenize,
  /apply-template, /v1/chat/completions, /v1/completions.
- ggml/src/ggml-cuda.cu supports_op: the quant types its CUDA matmul runs (repacked CPU layouts mostly not).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING

from gguf.constants import GGMLQuantizationType

from ..archs import family_of
from ..ggufio import IK_TYPES
from .llamacpp import LlamaCpp, help_text
from .llamacpp_args import Compiled, buffer_name

if TYPE_CHECKING:
    from ..inspect_gguf import ModelInfo
    from ..plan import Plan
    from ..probe import HardwareProfile

# Types ggml in ik_llama.cpp defines (ggml/include/ggml.h): mainline's up to MXFP4 (it has Q1_0 as Q1_0_G128, id 41;
# not TQ1_0/TQ2_0/NVFP4/Q2_0) plus its own.
_MAINLINE_NOT_IN_IK = {"TQ1_0", "TQ2_0", "NVFP4", "Q2_0"}
CPU_TYPES = frozenset({q.name for q in GGMLQuantizationType} - _MAINLINE_NOT_IN_IK) | {n for n, *_ in IK_TYPES.values()}
# ggml-cuda.cu, ggml_backend_cuda_supports_op, GGML_OP_MUL_MAT / MUL_MAT_ID.
CUDA_TYPES = frozenset("""F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q6_0 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K IQ1_M IQ1_S IQ2_S
    IQ2_XS IQ2_XXS IQ3_S IQ3_XXS IQ4_NL MXFP4 IQ4_XS IQ2_KL IQ3_KS IQ4_KS IQ4_KSS IQ5_KS IQ2_K IQ2_KS IQ1_KT IQ2_KT
    IQ3_KT IQ4_KT IQ3_K IQ4_K IQ5_K IQ6_K IQ1_BN IQ2_BN IQ2_K_R4 IQ3_K_R4 IQ4_K_R4 IQ4_KS_R4 IQ5_K_R4 IQ5_KS_R4 IQ1_S_R4
    IQ1_M_R4 I32 I16 I8""".split())
# Every architecture its tree loads: LLM_ARCH_NAMES in src/llama-arch.cpp of the tree vendored in
# ik-llama-cpp-python 0.1.5 (mainline's giant-MoE archs it lacks include deepseek32, deepseek4, kimi-linear,
# grovemoe, lfm2moe, afmoe, hunyuan-moe-v3, bailingmoe3, minimax-m3).
ARCHS = frozenset("""arctic baichuan bailingmoe2 bert bitnet bitnet-25 bitnet-b1.58 bloom chatglm codeshell cohere2
    command-r dbrx deci deepseek2 dots1 ernie4_5 ernie4_5-moe falcon gemma gemma2 gemma3 gemma4 glm-dsa glm4 glm4moe
    gpt-oss gpt2 gptj gptneox granite granitemoe grok hunyuan-moe internlm2 jais jina-bert-v2 llama llama4 mamba
    mimo2 minicpm minimax-m2 mistral3 mistral4 mpt nomic-bert olmo openelm orion phi2 phi3 plamo qwen qwen2 qwen2moe
    qwen2vl qwen3 qwen35 qwen35moe qwen3moe qwen3next qwen3vl qwen3vlmoe refact seed_oss smollm3 stablelm starcoder
    starcoder2 step35 t5 t5encoder xverse""".split())
AMB_MIB = 512  # the attention-buffer cap R1 users pass with a GPU; it bounds the MLA prefill buffer in VRAM


class IkLlamaCpp(LlamaCpp):
    name = "ik_llama.cpp"
    summary = ("ik_llama.cpp's llama-server: llama.cpp fork with FlashMLA-3, fused MoE and run-time repacking on CPU, "
               "and its IQ*_K/_KS/_KT/_R4 quants")
    # -ngl: layers n_layer-ngl.. go to the GPU, the output only when ngl > n_layer (src/llama.cpp of the
    # ik-llama-cpp-python 0.1.5 tree, llm_load_tensors)
    ngl_counts_output = False
    archs = ARCHS
    server_binary = "ik-llama-server"  # HYBRIDINFER_IK_LLAMA_SERVER, the venv's bin/ (install.sh links it), PATH
    bench_binary = "ik-llama-bench"
    unlisted_flags = frozenset({"-ot", "--override-tensor", "-rtr"})  # common.cpp parses them; --help omits them
    install_hint = ("run ./install.sh (it builds ik_llama.cpp from ik-llama-cpp-python 0.1.5 next to llama.cpp), "
                    "or set HYBRIDINFER_IK_LLAMA_SERVER to its llama-server")
    # Mainline's model with ik's measured prefill gain: on the mid model (R1's UD-IQ1_S mix, 2 AVX2 cores, quiet box,
    # benchmarks/engines.py) ik with -rtr prefilled 33.1 vs 26.2 tok/s. Its decode measured 1.13x mainline's there
    # but is kept equal in the prediction, so on a box nobody measured a tie keeps mainline (engines/measured.py
    # decides where a measurement exists).
    prediction_params = replace(LlamaCpp.prediction_params, prefill_cpu_scale=1.26)
    # examples/server/server.cpp handle_metrics; its server binds TCP only, which the runner detects from --help.
    missing_metrics = ("llamacpp:n_decode_total", "llamacpp:n_busy_slots_per_decode", "llamacpp:n_tokens_max",
                       "llamacpp:prompt_tokens_cached_total")

    # --- capabilities ---------------------------------------------------------------------------------
    def runs(self, cls: str, type_: str, device: str) -> bool:
        return type_ in (CPU_TYPES if device == "cpu" else CUDA_TYPES)

    def kv_form(self, model: "ModelInfo") -> str:
        # Legacy DeepSeek GGUFs (attn_kv_b only) get MLA tensors built at load: the compressed latent is cached.
        return "mla" if is_mla(model.arch) else model.kv.form

    def kv_bytes_per_token(self, model: "ModelInfo", kv_type: str) -> int:
        if model.kv.form == "legacy-mha" and model.kv_lora_rank:
            per_value = model.kv.bytes_per_token[kv_type] / max(1, model.kv.values_per_token_per_layer * model.kv.layers)
            return int(round((model.kv_lora_rank + model.rope_dim) * model.kv.layers * per_value))
        return model.kv.bytes_per_token[kv_type]

    def blockers(self, model: "ModelInfo", placement, hw: "HardwareProfile") -> list[str]:
        bad = incompatible_mla(model)
        return ([bad] if bad else []) + super().blockers(model, placement, hw)

    def runner(self, plan: "Plan", settings):
        from .ik_runner import IkDialect  # httpx & co. load only when something runs
        from .runner import ServerRunner

        return ServerRunner(IkDialect(self), plan, settings)

    def chosen_because(self, model, hw) -> str:
        return "FlashMLA-3 and fused-MoE CPU kernels, run-time repacking when no tensor is on a GPU"

    # --- the command ----------------------------------------------------------------------------------
    def kv_args(self, plan: "Plan", binary: str | None) -> list[str]:
        out = []
        mla = is_mla(plan.arch)
        if mla and self.has_flag(binary, "-mla"):
            out += ["-mla", "3"]  # FlashMLA-3: the compressed latent cache, MLA kernels for prefill and decode
        if self.has_flag(binary, "-fa"):
            # `-fa on|off|auto` in recent trees; a bare switch before.
            out += ["-fa", "on"] if not binary or re.search(r"--flash-attn \(", help_text(binary)) else ["-fa"]
        if binary and "-fmoe" in self.flags(binary):
            out += ["-fmoe"]  # older trees: fused MoE is opt-in (recent ones: on unless -no-fmoe)
        gpu = any(d != "cpu" for d in plan.device_of.values())
        if mla and gpu and self.has_flag(binary, "-amb"):
            out += ["-amb", str(AMB_MIB)]
        if plan.kv_type != "f16":
            # With MLA only K is cached (the latent); V is a view of it.
            out += ["-ctk", plan.kv_type] + ([] if mla else ["-ctv", plan.kv_type])
        return out

    def model_args(self, plan: "Plan", binary: str | None) -> list[str]:
        cmd = super().model_args(plan, binary)
        if self.has_flag(binary, "--log-disable"):
            # Its legacy trace log otherwise goes to ./llama.log in whatever directory serve runs from; the same
            # lines still reach stderr, where the supervisor reads them.
            cmd += ["--log-disable"]
        return cmd

    def calibration_variants(self) -> dict[str, dict]:
        # Both ways it runs: -rtr for CPU-only plans, mapped weights beside a GPU (repacked types have no CUDA kernels).
        return {self.name: {"load_mode": "mmap"}, f"{self.name} -rtr": {}}

    def calibration_key(self, device_of: dict[str, str], streaming: bool, load_mode: str) -> str:
        return f"{self.name} -rtr" if repacks(device_of, streaming, load_mode) else self.name

    def load_args(self, plan: "Plan", binary: str | None) -> list[str]:
        if repacks(plan.device_of, plan.streaming, plan.load_mode) and self.has_flag(binary, "-rtr"):
            return ["-rtr"]  # also turns mmap off (common.cpp), so the mmap flags below are not needed
        return super().load_args(plan, binary)

    # --- its llama-bench: llama.cpp's, with its own defaults -ngl 999, -mla 3, -fa 1, -fmoe 1, -rtr 0 ---------
    def bench_rpc_args(self, plan: "Plan") -> list[str]:
        # install.sh builds it without GGML_RPC, so no plan of it has RPC workers; its -ot names local buffers only.
        return []

    def bench_placement_args(self, plan: "Plan", c: Compiled) -> list[str]:
        out = ["-ot", ",".join(f"{rx}={buffer_name(d)}" for rx, d in c.overrides)] if c.overrides else []  # ','-joined
        return out + (["-mla", "3", "-fa", "1"] if is_mla(plan.arch) else [])

    def bench_kv_args(self, plan: "Plan") -> list[str]:
        if plan.kv_type == "f16":
            return []
        # As the server caches it: with MLA only K (the latent), otherwise K and V (flash attention is its default).
        return ["-ctk", plan.kv_type] + ([] if is_mla(plan.arch) else ["-ctv", plan.kv_type])

    def bench_load_args(self, plan: "Plan", exe: str) -> list[str]:
        """Batch sizes as the server runs them (its llama-bench takes -b/-ub), and run-time repacking."""
        rtr = ["-rtr", "1"] if repacks(plan.device_of, plan.streaming, plan.load_mode) else []
        return self.batch_args(plan) + rtr


def is_mla(arch: str) -> bool:
    """Whether the architecture's family uses DeepSeek's latent attention (where -mla applies)."""
    return family_of(arch).mla


def repacks(device_of: dict[str, str], streaming: bool, load_mode: str) -> bool:
    """Run-time repacking applies when no tensor is on a GPU (repacked types have no CUDA kernels) and the weights
    are read into RAM (repacking needs them there; a streaming plan, or one asked to map them, relies on mmap)."""
    return all(d == "cpu" for d in device_of.values()) and not streaming and load_mode != "mmap"


def incompatible_mla(model: "ModelInfo") -> str:
    """ik_llama.cpp's load-time check for mainline-converted DeepSeek MLA GGUFs (src/llama-hparams.cpp), before
    launch: the reason it would abort, or ""."""
    if model.kv.form != "mla" or model.head_count_kv != 1:
        return ""
    if (model.key_length, model.value_length, model.rope_dim) == (576, 512, 64) and model.head_count % 4 == 0:
        return ""
    return (f"it aborts loading this MLA GGUF (\"Detected incompatible DeepSeek model\", src/llama-hparams.cpp): it needs "
            f"key 576 / value 512 with one KV head, rope 64 and heads divisible by 4; this file has key "
            f"{model.key_length} / value {model.value_length}, rope {model.rope_dim}, {model.head_count} heads")


ENGINE = IkLlamaCpp()
