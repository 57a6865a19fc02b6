"""KTransformers' legacy server (releases 0.2.0 - 0.4.1) as an engine: per installed release, its exact command
(`--backend_type` explicit where it exists, a rule set for that backend, `--force_think` in that release's form, a
local config folder as `--model_path`), refusals before launch for what that release cannot run, and `serve`
through the shared supervised-server runner (engines/kt_server.py).

Facts per release live in kt_versions.py (each cited to its tag and file); the rules compiler in
ktransformers_args.py. The kt-kernel + SGLang stack is the sibling engine in kt_sglang.py; what both share is in
kt_common.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..probe import EngineInfo
from ..util import atomic_write, cache_dir, ranges
from .base import GIB, NumaPolicy, RunSettings
from .kt_common import KT_CPU_EXPERTS, KtEngine, ampere_or_newer, hf_repo
from .kt_probe import detail_field, patch_state, probe_legacy
from .kt_versions import VERSIONS, KtVersion, lookup
from .ktransformers_args import Unsupported, optimize_rules

if TYPE_CHECKING:
    from ..inspect_gguf import ModelInfo, Tensor
    from ..plan import Plan, PlanOptions
    from ..probe import HardwareProfile

# KTransformers legacy (0.2-0.4.1): the Python/GPU dequantizer used for every non-expert tensor.
KT_DEQUANT = frozenset({"F32", "F16", "BF16", "Q4_0", "Q5_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"})
# ... and with hybridinfer's patch (patches/ktransformers) the IQ family as well.
KT_DEQUANT_PATCHED = KT_DEQUANT | {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL"}
MARLIN_BITS = 4.25  # KLinearMarlin / KExpertsMarlin requantize to 4-bit, one fp16 scale per 64 weights
TORCH_BYTES = 2  # KLinearTorch and plain nn.Linear keep the dequantized weight in bf16/fp16
UNPLACEABLE = 1 << 50  # a GPU cost no budget meets: rules' auto-fill then keeps such tensors on the CPU
NEWEST = VERSIONS["v0.4.1"]
DEFAULT_PORT = 10002  # configs/config.yaml server.port

def has_kv_b(model: "ModelInfo") -> bool:
    """The GGUF's attention form: attn_kv_b (converted before llama.cpp's MLA change) or attn_k_b/attn_v_b only."""
    return any(t.name.endswith(".attn_kv_b.weight") for t in model.tensors)


def _is_linear(t: "Tensor") -> bool:
    return len(t.shape) == 2 and t.cls not in ("token_embd", "norms", "router", "routed_experts")


def rules_file(text: str) -> str:
    """Write compiled optimize rules to the cache (content-addressed); -> path."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = cache_dir() / "ktransformers" / f"optimize-{digest}.yaml"
    if not path.exists():
        atomic_write(path, text)
    return str(path)


@dataclass(frozen=True, eq=False, repr=False)
class KTransformers(KtEngine):
    name = "ktransformers"
    summary = "KTransformers (legacy server 0.2-0.4.1): attention and KV on CUDA, routed experts on its CPU kernels"
    gpu_runtime_bytes = int(1.2 * GIB)  # CUDA context, cuBLAS, torch
    probe_names = ("ktransformers",)
    install_hint = ("install a legacy KTransformers release (0.2.0-0.4.1, github.com/kvcache-ai/ktransformers), "
                    "or use --engine kt-sglang")

    # What for_box decides for a box (the registry's instance keeps these defaults).
    version: KtVersion = NEWEST
    version_problem: str = ""  # an unknown version recorded for the box
    info: EngineInfo | None = None
    backend: str = "ktransformers"
    numa_copies: bool = True
    patch: str = "unknown"
    kv_type: str = "f16"
    max_slots: int | None = None

    # --- binding to a box ---------------------------------------------------------------------------------
    def bind(self, hw: "HardwareProfile", opts: "PlanOptions", model: "ModelInfo") -> "KTransformers":
        info = self.installed(hw)
        version, version_problem = self.version, ""
        if info is not None:
            try:
                version = lookup(info.version)
            except Exception as e:  # HybridError: unknown version -> a blocker naming the supported ones
                version_problem = f"{e.problem}; {e.fix}" if hasattr(e, "problem") else str(e)
        backends = detail_field(info, "backends")
        has_bs = bool(version.flashinfer_attn) and (backends is None or "balance_serve" in backends)
        marlin = ampere_or_newer(hw)  # unknown ("") is taken as Ampere+: said in the reasons
        # balance_serve: concurrent requests (the ktransformers backend serves one at a time); it needs a
        # USE_BALANCE_SERVE build and flashinfer (Ampere+), and keeps every routed expert on the CPU.
        backend = "balance_serve" if (opts.parallel > 1 and has_bs and marlin) else "ktransformers"
        model_dir = self.model_dir_for(opts, model)
        return replace(self, info=info, version=version, version_problem=version_problem, kv_type=opts.kv_type,
                       marlin=marlin, backend=backend, max_slots=None if backend == "balance_serve" else 1,
                       # the published multi-socket setups build with USE_NUMA=1
                       numa_copies=detail_field(info, "USE_NUMA") != "off", patch=patch_state(info),
                       model_dir=model_dir, model_dir_problem=_config_dir_problem(model_dir, model, hw))

    # --- capabilities -----------------------------------------------------------------------------------
    def runs(self, cls: str, type_: str, device: str) -> bool:
        if cls == "routed_experts" and device == "cpu":
            return type_ in KT_CPU_EXPERTS
        return type_ in KT_DEQUANT_PATCHED  # dequantized on the GPU (Marlin repacks from that)

    def support(self, cls: str, types: set[str]) -> str:
        if cls == "routed_experts":
            bad = sorted(types - KT_CPU_EXPERTS)
            return "ok" if not bad else f"refused: {'/'.join(bad)} not computed by its CPU expert kernel"
        bad = sorted(types - KT_DEQUANT)
        if not bad:
            return "ok"
        if not (types - KT_DEQUANT_PATCHED):
            return f"ok after patch ({'/'.join(bad)})"
        return f"refused: {'/'.join(sorted(types - KT_DEQUANT_PATCHED))} not dequantized"

    def tensor_bytes(self, t: "Tensor", device: str) -> int:
        if device == "cpu":
            return t.nbytes
        if t.cls == "routed_experts":
            if self.backend == "balance_serve" or not self.marlin or (
                    t.type not in KT_DEQUANT and self.patch != "applied"):
                return UNPLACEABLE  # KExpertsMarlin only: ktransformers backend, Ampere+, types it can load
            return max(t.nbytes, int(t.n_elements * MARLIN_BITS / 8))
        if ".attn_kv_b." in t.name or ".attn_k_b." in t.name or ".attn_v_b." in t.name:
            return t.n_elements * TORCH_BYTES  # kv_b_proj stays an nn.Linear (rules exclude it)
        if _is_linear(t) and (t.cls != "output" or self.version.at_least("v0.2.2")):
            return int(t.n_elements * MARLIN_BITS / 8) if self.marlin else t.n_elements * TORCH_BYTES
        if t.cls == "output":
            return t.n_elements * TORCH_BYTES  # lm_head stays nn.Linear before v0.2.2
        return t.nbytes

    def numa_policy(self, nodes: int) -> NumaPolicy:
        how = "a copy of the experts per node (USE_NUMA)" if self.numa_copies else "no NUMA build: threads cross nodes"
        return NumaPolicy("", f"NUMA: {nodes} nodes; {self.name} runs one CPU thread pool per node with {how}")

    def extra_ram(self, cpu_expert_bytes: int, nodes: int) -> tuple[int, str]:
        if nodes < 2 or not self.numa_copies:
            return 0, ""
        return cpu_expert_bytes * (nodes - 1), (
            f"{self.name} legacy with USE_NUMA=1 keeps a copy of the CPU experts per NUMA node: "
            f"{nodes} x {cpu_expert_bytes / GIB:.1f} GiB of RAM")

    # --- this box ---------------------------------------------------------------------------------------
    def probe(self) -> EngineInfo:
        return probe_legacy()

    # --- planning ---------------------------------------------------------------------------------------
    def arch_refusal(self, arch: str) -> str:
        return f"architecture {arch}: hybridinfer compiles its rules for DeepSeek V2/V3/R1 only"

    def blockers(self, model: "ModelInfo", placement: dict[str, str] | None, hw: "HardwareProfile") -> list[str]:
        out = []
        if self.version_problem:
            out.append(self.version_problem)
        if not model.is_moe:
            out.append("dense model: no routed experts to keep on the CPU")
        if self.needs_nvidia_gpu and not any(not g.remote for g in hw.gpus):
            out.append("no NVIDIA GPU: it runs attention on CUDA")
        if any(g.remote for g in hw.gpus):
            out.append("the profile has llama.cpp RPC devices: only llama-server drives them")
        if why := self.runs_arch(model.arch):
            out.append(why)
        if out:
            return out
        routed = set(model.groups["routed_experts"].types)
        bad = sorted(routed - KT_CPU_EXPERTS)
        if bad:
            out.append(f"routed experts in {'/'.join(bad)} are not computed by its CPU kernel (would run silently wrong)")
        nonexp = _non_expert_types(model)
        if nonexp - KT_DEQUANT_PATCHED:
            out.append(f"{'/'.join(sorted(nonexp - KT_DEQUANT_PATCHED))} tensors cannot be dequantized")
        elif nonexp - KT_DEQUANT and self.patch == "not applied":
            out.append(f"{'/'.join(sorted(nonexp - KT_DEQUANT))} tensors need hybridinfer's IQ patch (`ggml_type … not "
                       "implemented` otherwise): run `hybridinfer patch ktransformers --apply`")
        if not has_kv_b(model) and not self.version.attn_from_k_b:
            out.append(f"this GGUF has attn_k_b/attn_v_b but no attn_kv_b, which KTransformers {self.version.name} "
                       "needs (0.3.2+ rebuilds it): upgrade to 0.3.2+, or use a GGUF converted before llama.cpp's MLA "
                       "change")
        if self.kv_type != "f16":
            out.append(f"KTransformers keeps its MLA cache in 16 bits (--kv-type {self.kv_type} is llama.cpp's): "
                       "use --kv-type f16")
        if self.model_dir_problem:
            out.append(self.model_dir_problem)
        if placement is not None and not out:
            out += self._placement_blockers(model, placement)
        return out

    def _placement_blockers(self, model: "ModelInfo", placement: dict[str, str]) -> list[str]:
        on_cpu = [t for t in model.tensors if placement.get(t.name) == "cpu" and t.cls not in ("routed_experts", "token_embd")]
        if on_cpu:
            blocks = sorted({t.block for t in on_cpu if t.block is not None})
            where = f" (blocks {ranges(blocks)})" if blocks else ""
            return [f"this placement keeps {', '.join(sorted({t.cls for t in on_cpu}))} on the CPU{where}; "
                    "it runs only routed experts there"]
        gpu_exp = [t for t in model.tensors if t.cls == "routed_experts" and placement.get(t.name, "cpu") != "cpu"]
        if gpu_exp and not self.marlin:
            return ["routed experts on the GPU run only as KExpertsMarlin, which needs compute capability 8.0+ "
                    "(this GPU is older): use --rules moe-experts-on-cpu"]
        iq = sorted({t.type for t in gpu_exp} - KT_DEQUANT)
        if iq and self.patch != "applied":
            return [f"routed experts on the GPU in {'/'.join(iq)}: KExpertsMarlin dequantizes them first, which needs "
                    "hybridinfer's IQ patch (`ggml_type 19 not implemented` otherwise): run `hybridinfer patch "
                    "ktransformers --apply`, or use --rules moe-experts-on-cpu"]
        try:
            optimize_rules(placement, self.version, self.backend, self.marlin)
        except Unsupported as e:
            return [f"this placement: {e}"]
        return []

    def chosen_because(self, model: "ModelInfo", hw: "HardwareProfile") -> str:
        v = self.version
        why = (f"KTransformers {v.name} ({'installed' if self.info else 'newest supported, assumed'}), "
               f"{self.backend} backend, NVIDIA GPU present, DeepSeek architecture, every routed-expert type runs on "
               f"its CPU kernel")
        if not self.marlin:
            why += "; GPU below compute capability 8.0: KLinearTorch (bf16 weights), no GPU experts"
        elif any(not g.compute_capability for g in hw.gpus):
            why += "; compute capability unknown: assumed 8.0+ (Marlin)"
        iq_experts = sorted(set(model.groups["routed_experts"].types) - KT_DEQUANT) if model.is_moe else []
        if self.backend == "balance_serve":
            why += "; routed experts stay on the CPU (balance_serve runs no GPU experts)"
        elif self.marlin and iq_experts and self.patch != "applied":
            why += (f"; routed experts stay on the CPU: {'/'.join(iq_experts)} on the GPU needs the IQ patch "
                    "(`hybridinfer patch ktransformers --apply`, then record `IQ patch: applied`)")
        if not self.model_dir:
            why += "; pass --kt-model-dir DIR: the model's config folder on that box"
        patch = _non_expert_types(model) - KT_DEQUANT
        if patch and self.patch == "applied":
            why += f"; {'/'.join(sorted(patch))} load through hybridinfer's patch (applied)"
        elif patch:
            why += f"; needs `hybridinfer patch ktransformers --apply` for {'/'.join(sorted(patch))}"
        return why

    def compile(self, plan: "Plan", hw=None) -> dict:
        text = optimize_rules(plan.device_of, self.version, self.backend, self.marlin)
        return {"version": self.version.tag, "backend": self.backend, "marlin": self.marlin,
                "model_dir": self.model_dir or f"<config folder of {hf_repo(plan.model_name)}>",
                "rules_path": rules_file(text), "rules": text,
                "api": {"models_list": self.version.models_list, "stream_usage": self.version.stream_usage,
                        "usage": self.version.usage, "fields": list(self.version.request_fields)}}

    def command(self, plan: "Plan") -> list[str]:
        c = plan.compiled or self.compile(plan)
        v = VERSIONS[c["version"]]
        cmd = ["ktransformers", "--model_path", c["model_dir"], "--gguf_path", str(Path(plan.model_path).parent),
               "--optimize_config_path", c["rules_path"], "--model_name", hf_repo(plan.model_name).split("/")[-1],
               "--cpu_infer", str(plan.threads), "--cache_lens", str(plan.ctx),
               "--max_new_tokens", str(max(256, min(8192, plan.ctx // plan.parallel // 2)))]
        cmd += [v.backend_flag, c["backend"]]  # always explicit: the default changed between releases (C)
        if c["backend"] == "balance_serve":
            cmd += ["--max_batch_size", str(plan.parallel)]
        if v.force_think == "value":
            cmd += ["--force_think", "true"]  # v0.2.1: type=bool, any non-empty value is True
        elif v.force_think == "switch":
            cmd += ["--force_think"]
        if "--use_cuda_graph" in v.flags and any(d != "cpu" for n, d in plan.device_of.items() if "_exps." in n):
            cmd += ["--no-use_cuda_graph"]  # doc/en/FAQ.md: GPU (Marlin) experts conflict with CUDA Graph
        return cmd + self.endpoint_args("127.0.0.1", DEFAULT_PORT)

    def endpoint_args(self, host: str, port: int) -> list[str]:
        return ["--host", host, "--port", str(port)]

    def starts_in_think(self, plan: "Plan") -> bool:
        return "--force_think" in plan.command  # it appends "<think>\n" to the prompt itself

    def runner(self, plan: "Plan", settings: RunSettings):
        from .kt_server import KtDialect
        from .runner import ServerRunner

        return ServerRunner(KtDialect(self, plan), plan, settings)


def _config_dir_problem(model_dir: str | None, model: "ModelInfo", hw: "HardwareProfile") -> str:
    """Why the config folder will not do on this box ("" when it will, or for another box's profile)."""
    if hw.source != "probe":
        return ""
    if not model_dir:
        return (f"it needs the model's config folder (config.json, tokenizer, code; no weights) as --model_path: pass "
                f"--kt-model-dir DIR (get it with `modelscope download --model {hf_repo(model.name)} --exclude "
                f"'*.safetensors' --local_dir DIR`)")
    if not (Path(model_dir) / "config.json").is_file():
        return f"--kt-model-dir {model_dir} has no config.json (the model's Hugging Face folder)"
    return ""


def _non_expert_types(model: "ModelInfo") -> set[str]:
    out = set()
    for name, g in model.groups.items():
        if name != "routed_experts":
            out |= set(g.types)
    return out


ENGINE = KTransformers()
