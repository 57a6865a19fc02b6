"""What the two KTransformers engines share — the legacy server (ktransformers.py) and kt-kernel + SGLang
(kt_sglang.py): the llamafile CPU expert kernels, DeepSeek's compressed MLA cache, the model folder option
(--kt-model-dir) and where that folder comes from, and the per-box facts both bind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..predict import PredictionParams
from .base import Engine, EngineOption

if TYPE_CHECKING:
    from ..inspect_gguf import ModelInfo
    from ..plan import PlanOptions
    from ..probe import HardwareProfile

# The llamafile CPU expert kernels (x86, incl. tinyblas for the float types) the legacy server runs and kt-kernel's
# LLAMAFILE method loads: any other routed-expert type is silently not computed.
KT_CPU_EXPERTS = frozenset({"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ2_XXS", "Q4_0", "Q4_1",
                            "Q5_0", "Q5_1", "Q8_0", "IQ1_S", "F32", "F16", "BF16"})
MLA_VALUES = 576  # kv_lora_rank 512 + rope 64: the compressed cache it always keeps (args.py: cache_lens*2*576*61)
HF_REPOS = (("r1", "deepseek-ai/DeepSeek-R1"), ("v3", "deepseek-ai/DeepSeek-V3"), ("v2.5", "deepseek-ai/DeepSeek-V2.5"),
            ("lite", "deepseek-ai/DeepSeek-V2-Lite-Chat"), ("v2", "deepseek-ai/DeepSeek-V2-Chat"))
MODEL_DIR = EngineOption("--kt-model-dir", metavar="DIR", help=(
    "KTransformers: the model's Hugging Face folder — config, tokenizer and code for the legacy server (no "
    "weights), the full checkpoint for kt-sglang (default: where `hybridinfer download` put it)"))


def hf_repo(model_name: str | None) -> str:
    """The Hugging Face repo whose config folder matches a DeepSeek GGUF (by its general.name, or a plan's
    model_name, which is that)."""
    name = (model_name or "").lower()
    return next((repo for key, repo in HF_REPOS if key in name), "deepseek-ai/DeepSeek-R1")


def config_dir_for(repo: str) -> str | None:
    """Where hybridinfer's download step recorded this repo's config folder (None: not downloaded)."""
    from ..download.registry import kt_config_dir  # a leaf module: no import of the planner from here

    found = kt_config_dir(repo)
    return str(found) if found else None


def ampere_or_newer(hw: "HardwareProfile") -> bool:
    """Every GPU at compute capability 8.0+ (Marlin kernels, flashinfer); an unknown one ("") is taken as such."""
    return all(_cc(g.compute_capability) >= 8.0 for g in hw.gpus if g.compute_capability)


def _cc(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        return 0.0


@dataclass(frozen=True, eq=False, repr=False)
class KtEngine(Engine):
    """The family's common part. Frozen: `for_box` returns a new instance carrying the box's facts in its fields;
    the registry's instance keeps the defaults (it runs saved plans and reports probe results)."""

    kind = "server"
    needs_nvidia_gpu = True
    serves = True
    # It mirrors the CPU experts on every NUMA node and runs one thread pool per node: a second node adds 0.45 of
    # its own bandwidth/compute (fitted to its published 1- vs 2-socket R1 figures). kt-kernel: the same kernels.
    prediction_params = PredictionParams(cpu_eff=1.0, prefill_gflops_per_core_amx=200.0, numa_extra_node_gain=0.45,
                                         prefill_expert_batch_n0=0.0)
    options = (MODEL_DIR,)

    model_dir: str | None = None
    model_dir_problem: str = ""
    marlin: bool = True  # Ampere+ everywhere: Marlin kernels (legacy) / flashinfer attention (SGLang)

    def model_dir_for(self, opts: "PlanOptions", model: "ModelInfo") -> str | None:
        """--kt-model-dir, else the folder `hybridinfer download` recorded for the model's repo."""
        return opts.engine_options.get(MODEL_DIR.key) or config_dir_for(hf_repo(model.name))

    def kv_bytes_per_token(self, model: "ModelInfo", kv_type: str) -> int:
        # Always the compressed MLA cache in 16 bits, whatever the GGUF's attention form (args.py sizes it so;
        # SGLang keeps it in bf16 too).
        if model.kv.form in ("mla", "legacy-mha"):
            return MLA_VALUES * 2 * model.kv.layers
        return model.kv.bytes_per_token["f16"]

    def kv_form(self, model: "ModelInfo") -> str:
        return "mla" if model.kv.form in ("mla", "legacy-mha") else model.kv.form

    def runs_arch(self, arch: str) -> str | None:
        # Its rules (optimize YAMLs) and the SGLang GPU side are compiled and sized for DeepSeek V2/V3/R1 only.
        return None if arch == "deepseek2" else self.arch_refusal(arch)

    def arch_refusal(self, arch: str) -> str:
        return f"architecture {arch}: hybridinfer drives {self.name} for DeepSeek V2/V3/R1 only"

