"""kt-kernel + SGLang, KTransformers' maintained stack, as an engine: SGLang runs the GPU side from the model's
Hugging Face checkpoint (in that checkpoint's format: FP8 for DeepSeek V3/R1), kt-kernel runs the routed experts on
the CPU straight from the GGUF folder (`--kt-method LLAMAFILE`; the AMX methods need weights converted from the HF
checkpoint). The command follows kt-kernel's own launcher (kt_kernel/cli/commands/run.py, kt-kernel 0.7.2) and
is checked against SGLang's real argument parser (tests/test_kt.py, via tests/sglang_args.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..probe import EngineInfo
from .base import GIB, NumaPolicy, RunSettings
from .kt_common import KT_CPU_EXPERTS, KtEngine, ampere_or_newer, hf_repo
from .kt_probe import detail_field, kt_kernel_variant, probe_kt_kernel, probe_sglang
from .ktransformers_args import module_of

if TYPE_CHECKING:
    from ..inspect_gguf import ModelInfo, Tensor
    from ..plan import Plan, PlanOptions
    from ..probe import HardwareProfile

METHOD = "LLAMAFILE"  # kt_kernel/experts.py: reads GGUF (its llamafile kernels' quant types), no conversion
DEFAULT_PORT = 30000  # SGLang's default
FP8_BYTES = 1 + 4 / (128 * 128)  # DeepSeek V3/R1 checkpoints: e4m3 weights, one fp32 scale per 128x128 block
BF16_BYTES = 2


def checkpoint_bytes(model: "ModelInfo", t: "Tensor") -> int:
    """Bytes of a tensor in the HF checkpoint SGLang loads: DeepSeek V3/R1 ship FP8 linear weights (embeddings,
    norms, router and kv_b in bf16); other models bf16."""
    fp8 = model.arch == "deepseek2" and model.expert_count == 256
    if fp8 and len(t.shape) >= 2 and t.cls not in ("token_embd", "output", "router") \
            and ".attn_kv_b." not in t.name and ".attn_k_b." not in t.name and ".attn_v_b." not in t.name:
        return int(t.n_elements * FP8_BYTES)
    return t.n_elements * BF16_BYTES


@dataclass(frozen=True, eq=False, repr=False)
class KtSglang(KtEngine):
    name = "kt-sglang"
    summary = ("kt-kernel + SGLang (KTransformers' maintained stack): GPU side from the HF checkpoint, routed "
               "experts on kt-kernel's CPU kernels from the GGUF")
    probe_names = ("kt-kernel",)
    install_hint = "pip install kt-kernel sglang-kt (or sglang), see github.com/kvcache-ai/ktransformers"

    # What for_box decides for a box (the registry's instance keeps these defaults).
    gpu_runtime_bytes: int = int(1.5 * GIB)  # CUDA context, torch, SGLang's CUDA graphs (+ the embedding, bound)
    model: "ModelInfo | None" = None
    sglang: EngineInfo | None = None
    variant: str = "avx2"
    numa_nodes: int = 1

    def bind(self, hw: "HardwareProfile", opts: "PlanOptions", model: "ModelInfo") -> "KtSglang":
        embed = sum(checkpoint_bytes(model, t) for t in model.tensors if t.cls == "token_embd")
        model_dir = self.model_dir_for(opts, model)
        return replace(self, model=model, numa_nodes=max(1, len(hw.numa_nodes)), sglang=hw.engine("sglang"),
                       variant=detail_field(self.installed(hw), "CPU variant") or kt_kernel_variant(hw.cpu.flags),
                       marlin=ampere_or_newer(hw),
                       gpu_runtime_bytes=self.gpu_runtime_bytes + embed,  # SGLang keeps the embedding on the GPU
                       model_dir=model_dir, model_dir_problem=_checkpoint_problem(model_dir, model, hw))

    # --- capabilities -----------------------------------------------------------------------------------
    def runs(self, cls: str, type_: str, device: str) -> bool:
        if cls == "routed_experts" and device == "cpu":
            return type_ in KT_CPU_EXPERTS  # LLAMAFILE: the llamafile kernels' types
        return True  # the GPU side comes from the HF checkpoint, not from the GGUF

    def support(self, cls: str, types: set[str]) -> str:
        if cls == "routed_experts":
            bad = sorted(types - KT_CPU_EXPERTS)
            return "ok" if not bad else f"refused: {'/'.join(bad)} not computed by kt-kernel's LLAMAFILE method"
        return "ok (HF checkpoint)"

    def tensor_bytes(self, t: "Tensor", device: str) -> int:
        if device == "cpu":
            return t.nbytes
        return checkpoint_bytes(self.model, t) if self.model is not None else t.nbytes

    def numa_policy(self, nodes: int) -> NumaPolicy:
        return NumaPolicy("", f"NUMA: {nodes} nodes; kt-kernel splits the experts across them "
                              f"(--kt-threadpool-count {nodes}, one thread pool per node, no copies)")

    # --- this box ---------------------------------------------------------------------------------------
    def probe(self) -> EngineInfo:
        return probe_kt_kernel()

    def probe_all(self) -> list[EngineInfo]:
        return [probe_kt_kernel(), probe_sglang()]  # it runs as two packages

    # --- planning ---------------------------------------------------------------------------------------
    def arch_refusal(self, arch: str) -> str:
        return f"architecture {arch}: hybridinfer sizes the kt-sglang GPU side for DeepSeek V2/V3/R1 only"

    def blockers(self, model: "ModelInfo", placement: dict[str, str] | None, hw: "HardwareProfile") -> list[str]:
        out = []
        if not hw.gpus:
            out.append("no NVIDIA GPU: SGLang runs the GPU side on CUDA")
        if not model.is_moe:
            out.append("dense model: no routed experts for kt-kernel")
        if why := self.runs_arch(model.arch):
            out.append(why)
        if out:
            return out
        if self.installed(hw) and not self.sglang:
            out.append(f"kt-kernel is installed on {hw.id} but SGLang is not: pip install sglang-kt")
        bad = sorted(set(model.groups["routed_experts"].types) - KT_CPU_EXPERTS)
        if bad:
            out.append(f"routed experts in {'/'.join(bad)}: kt-kernel's {METHOD} method does not compute them")
        if self.model_dir_problem:
            out.append(self.model_dir_problem)
        if placement is not None and not out:
            on_cpu = sorted({t.cls for t in model.tensors if placement.get(t.name) == "cpu"
                             and t.cls not in ("routed_experts", "token_embd")})
            if on_cpu:
                out.append(f"this placement keeps {', '.join(on_cpu)} on the CPU; kt-kernel runs only routed experts")
        return out

    def chosen_because(self, model: "ModelInfo", hw: "HardwareProfile") -> str:
        sg = f"SGLang {self.sglang.version}" if self.sglang else "SGLang"
        return (f"kt-kernel ({self.variant} CPU kernels, method {METHOD} on the GGUF's experts) + {sg}; GPU side in "
                f"the checkpoint's format (FP8 for DeepSeek V3/R1)")

    def compile(self, plan: "Plan", hw=None) -> dict:
        gpu_blocks = sorted({int(n.split(".")[1]) for n, d in plan.device_of.items()
                             if d != "cpu" and module_of(n).endswith(".mlp.experts")})
        # It spreads GPU experts evenly over the layers: whole blocks planned there become a per-layer count.
        per_layer = len(gpu_blocks) * plan.n_expert // max(1, len(plan.moe_blocks))
        gpu = next((d for d in plan.devices if d.device.startswith("gpu")), None)
        frac = 0.9 if gpu is None or not gpu.capacity else min(0.95, max(0.6, round(
            (gpu.weights + gpu.kv_cache) / (gpu.capacity + 0.75 * GIB) + 0.02, 2)))
        return {"model_dir": self.model_dir or f"<Hugging Face checkpoint of {hf_repo(plan.model_name)}>",
                "gpu_experts_per_layer": per_layer, "mem_fraction_static": frac,
                "attention_backend": "flashinfer" if self.marlin else "triton", "cpu_variant": self.variant,
                "numa_nodes": self.numa_nodes,
                "api": {"fields": [], "stream_usage": True, "usage": "real"}}

    def command(self, plan: "Plan") -> list[str]:
        c = plan.compiled or self.compile(plan)
        nodes = c.get("numa_nodes", 1)
        return ["python", "-m", "sglang.launch_server", "--model", c["model_dir"],
                "--kt-weight-path", str(Path(plan.model_path).parent), "--kt-method", METHOD,
                "--kt-cpuinfer", str(plan.threads), "--kt-threadpool-count", str(nodes),
                "--kt-num-gpu-experts", str(c["gpu_experts_per_layer"]),
                "--attention-backend", c["attention_backend"], "--trust-remote-code",
                "--mem-fraction-static", str(c["mem_fraction_static"]), "--chunked-prefill-size", "4096",
                "--max-running-requests", str(plan.parallel), "--max-total-tokens", str(plan.ctx),
                "--disable-shared-experts-fusion", "--served-model-name", hf_repo(plan.model_name).split("/")[-1],
                "--host", "127.0.0.1", "--port", str(DEFAULT_PORT)]

    def runner(self, plan: "Plan", settings: RunSettings):
        from .kt_server import KtDialect
        from .runner import ServerRunner

        return ServerRunner(KtDialect(self, plan, sglang=True), plan, settings)


def _checkpoint_problem(model_dir: str | None, model: "ModelInfo", hw: "HardwareProfile") -> str:
    """Why the checkpoint folder will not do on this box ("" when it will, or for another box's profile)."""
    if hw.source != "probe":
        return ""
    if not model_dir:
        return (f"SGLang loads the GPU side from the model's Hugging Face checkpoint: pass --kt-model-dir DIR "
                f"(`modelscope download --model {hf_repo(model.name)} --local_dir DIR`)")
    d = Path(model_dir)
    if not (d / "config.json").is_file() or not any(d.glob("*.safetensors")):
        return (f"--kt-model-dir {d} is not a Hugging Face checkpoint (config.json and *.safetensors): SGLang loads "
                f"the GPU side from it")
    return ""


ENGINE = KtSglang()
