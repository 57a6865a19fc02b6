"""KTransformers as an engine: the plan as its launch command (legacy engine + compiled optimize rules, or
kt-kernel/SGLang), and what its kernels can run.

hybridinfer does not run KTransformers itself yet (`serves = False`); `plan` prints the exact command and the rules file.
Type facts from its sources (see README): the legacy GPU dequantizer used for every non-expert tensor, and the
llamafile CPU expert kernel.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from ..predict import PredictionParams
from ..probe import EngineInfo
from ..util import atomic_write, cache_dir, ranges
from .base import GIB, Engine, NumaPolicy
from .ktransformers_args import Unsupported, kt_kernel_flags, optimize_rules

if TYPE_CHECKING:
    from ..inspect_gguf import ModelInfo, Tensor
    from ..plan import Plan
    from ..probe import HardwareProfile

# KTransformers legacy (0.2-0.4.1): the Python/GPU dequantizer used for every non-expert tensor.
KT_DEQUANT = frozenset({"F32", "F16", "BF16", "Q4_0", "Q5_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"})
# ... and with hybridinfer's patch (patches/ktransformers) the IQ family as well.
KT_DEQUANT_PATCHED = KT_DEQUANT | {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL"}
# Its CPU expert kernel (llamafile backend, x86): any other routed-expert type is silently not computed.
KT_CPU_EXPERTS = frozenset({"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ2_XXS", "Q4_0", "Q4_1",
                            "Q5_0", "Q5_1", "Q8_0", "IQ1_S"})
# kt-kernel LLAMAFILE method (0.7.x) reads GGUF directly; same type list, and expert FFN % 256 == 0.
KT_KERNEL_LLAMAFILE = KT_CPU_EXPERTS
KT_MARLIN_BITS = 4.25  # GPU-resident experts run as Marlin int4 (+ group scales), whatever the file's type
PYTHON_PACKAGES = {"ktransformers": "ktransformers", "kt-kernel": "kt-kernel", "sglang": "sglang"}  # row -> dist
PATCH_APPLIED = "IQ patch: applied"


def kt_patch_state() -> str:
    """Whether the installed legacy KTransformers carries hybridinfer's IQ patch (read from its files)."""
    from ..errors import HybridError
    from .ktransformers_patch import detect, find

    try:
        state = detect(find(None)).state
    except HybridError as e:
        return f"IQ patch: not applicable ({e.problem})"
    return {"patched": PATCH_APPLIED,
            "unpatched": "IQ patch: not applied (hybridinfer patch ktransformers --apply)"}.get(state, f"IQ patch: {state}")


def rules_file(device_of: dict[str, str]) -> tuple[str, str]:
    """Write the compiled optimize rules to the cache (content-addressed); -> (path, yaml text)."""
    text = optimize_rules(device_of)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = cache_dir() / "ktransformers" / f"optimize-{digest}.yaml"
    if not path.exists():
        atomic_write(path, text)
    return str(path), text


class KTransformers(Engine):
    name = "ktransformers"
    summary = "KTransformers: attention and KV on CUDA, routed experts on its CPU kernels (llamafile/AMX)"
    kind = "server"
    needs_nvidia_gpu = True
    serves = False  # hybridinfer plans it and prints the command; it does not run it yet
    gpu_runtime_bytes = int(1.2 * GIB)  # CUDA context, cuBLAS, torch
    probe_names = ("ktransformers", "kt-kernel")
    install_hint = "install KTransformers (see its README: pip install ktransformers, or kt-kernel + sglang)"
    # Its llamafile/AMX expert kernels are the reference for CPU-resident MoE; AMX tiles speed up prefill (>= 0.3).
    prediction_params = PredictionParams(cpu_eff=1.0, prefill_gflops_per_core_amx=200.0)

    # --- capabilities -----------------------------------------------------------------------------------
    def runs(self, cls: str, type_: str, device: str) -> bool:
        if cls == "routed_experts" and device == "cpu":
            return type_ in KT_CPU_EXPERTS
        return type_ in KT_DEQUANT_PATCHED  # dequantized on the GPU (Marlin repacks experts from that)

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
        if device != "cpu" and t.cls == "routed_experts":
            return max(t.nbytes, int(t.n_elements * KT_MARLIN_BITS / 8))
        return t.nbytes

    def numa_policy(self, nodes: int) -> NumaPolicy:
        return NumaPolicy("", f"NUMA: {nodes} nodes; one {self.name} thread pool per node")

    def extra_ram(self, cpu_expert_bytes: int, nodes: int) -> tuple[int, str]:
        if nodes < 2:
            return 0, ""
        return cpu_expert_bytes * (nodes - 1), (
            f"{self.name} legacy with USE_NUMA=1 keeps a copy of the CPU experts per NUMA node: "
            f"{nodes} x {cpu_expert_bytes / GIB:.1f} GiB of RAM")

    # --- this box ---------------------------------------------------------------------------------------
    def probe_all(self) -> list[EngineInfo]:
        rows = []
        for label, dist in PYTHON_PACKAGES.items():
            try:
                version = metadata.version(dist)
            except metadata.PackageNotFoundError:
                rows.append(EngineInfo(name=label, installed=False, detail="not installed"))
                continue
            rows.append(EngineInfo(name=label, installed=True, version=version,
                                   detail=kt_patch_state() if label == "ktransformers" else ""))
        return rows

    def probe(self) -> EngineInfo | None:
        return self.probe_all()[0]

    # --- planning ---------------------------------------------------------------------------------------
    def blockers(self, model: "ModelInfo", placement: dict[str, str] | None, hw: "HardwareProfile") -> list[str]:
        out = []
        if not model.is_moe:
            out.append("dense model: no routed experts to keep on the CPU")
        if self.needs_nvidia_gpu and not any(not g.remote for g in hw.gpus):
            out.append("no NVIDIA GPU: it runs attention on CUDA")
        if any(g.remote for g in hw.gpus):
            out.append("the profile has llama.cpp RPC devices: only llama-server drives them")
        if model.arch != "deepseek2":
            out.append(f"architecture {model.arch}: hybridinfer compiles its rules for DeepSeek V2/V3/R1 only")
        # Its point is CPU-resident experts: every routed-expert type must run on its CPU kernel.
        routed = model.groups["routed_experts"].types if model.is_moe else {}
        bad = sorted(t for t in routed if not self.runs("routed_experts", t, "cpu"))
        if bad:
            out.append(f"routed experts in {'/'.join(bad)} are not computed by its CPU kernel (would run silently wrong)")
        undeq = sorted({t for cls, g in model.groups.items() if cls != "routed_experts" for t in g.types
                        if not self.runs(cls, t, "gpu")})
        if undeq:
            out.append(f"{'/'.join(undeq)} tensors cannot be dequantized")
        if placement is not None and not out:
            on_cpu: dict[str, set[int]] = {}
            for t in model.tensors:
                if placement.get(t.name) == "cpu" and t.cls not in ("routed_experts", "token_embd"):
                    on_cpu.setdefault(t.cls, set()).add(t.block if t.block is not None else -1)
            if on_cpu:
                blocks = {b for bs in on_cpu.values() for b in bs if b >= 0}
                where = f" (blocks {ranges(blocks)})" if blocks else ""
                out.append(f"this placement keeps {', '.join(sorted(on_cpu))} on the CPU{where}; "
                           "it runs only routed experts there")
            else:
                try:
                    optimize_rules(placement)
                except Unsupported as e:
                    out.append(f"this placement: {e}")
        return out

    @staticmethod
    def _non_expert_types(model: "ModelInfo") -> set[str]:
        out = set()
        for name, g in model.groups.items():
            if name != "routed_experts":
                out |= set(g.types)
        return out

    def chosen_because(self, model: "ModelInfo", hw: "HardwareProfile") -> str:
        why = "installed, NVIDIA GPU present, DeepSeek architecture, every routed-expert type runs on its CPU kernel"
        patch = self._non_expert_types(model) - KT_DEQUANT
        kt = self.installed(hw)
        if patch and PATCH_APPLIED in (kt.detail if kt else ""):
            why += f"; {'/'.join(sorted(patch))} load through hybridinfer's patch (applied)"
        elif patch:
            why += f"; needs `hybridinfer patch ktransformers --apply` for {'/'.join(sorted(patch))}"
        return why

    def compile(self, plan: "Plan") -> dict:
        path, text = rules_file(plan.device_of)
        return {"rules_path": path, "rules": text}

    def command(self, plan: "Plan", host: str = "127.0.0.1", port: int = 10002) -> list[str]:
        rules_path = (plan.compiled or self.compile(plan))["rules_path"]
        return ["ktransformers", "--model_path", "deepseek-ai/DeepSeek-R1", "--gguf_path", str(Path(plan.model_path).parent),
                "--optimize_config_path", rules_path, "--host", host, "--port", str(port),
                "--cpu_infer", str(plan.threads), "--cache_lens", str(plan.ctx), "--max_batch_size", str(plan.parallel),
                "--max_new_tokens", "8192", "--backend_type", "balance_serve", "--force_think"]

    def endpoint_args(self, host: str, port: int) -> list[str]:
        return ["--host", host, "--port", str(port)]


def kt_kernel_command(plan: "Plan", numa_nodes: int, port: int = 30000) -> list[str]:
    return ["python", "-m", "sglang.launch_server", "--model", "deepseek-ai/DeepSeek-R1",
            "--kt-weight-path", str(Path(plan.model_path).parent), "--port", str(port)] + kt_kernel_flags(
        plan.device_of, plan.n_expert, len(plan.moe_blocks), plan.threads, numa_nodes, set(plan.routed_types))


ENGINE = KTransformers()
