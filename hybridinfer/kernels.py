"""Which engine kernels can compute which GGUF quant types (facts from the engines' sources, see README).

Kept apart from the planner so `inspect` can report per-group support and `plan` can refuse, rather than run
an engine that silently skips tensors it cannot multiply.
"""

from __future__ import annotations

# llama.cpp (ggml CPU and CUDA backends) computes every type the gguf package knows.
LLAMA_CPP = "all"

# KTransformers legacy (0.2-0.4.1): the Python/GPU dequantizer used for every non-expert tensor.
KT_DEQUANT = frozenset({"F32", "F16", "BF16", "Q4_0", "Q5_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"})
# ... and with hybridinfer's patch (patches/ktransformers) the IQ family as well.
KT_DEQUANT_PATCHED = KT_DEQUANT | {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL"}
# Its CPU expert kernel (llamafile backend, x86): any other routed-expert type is silently not computed.
KT_CPU_EXPERTS = frozenset({"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ2_XXS", "Q4_0", "Q4_1",
                            "Q5_0", "Q5_1", "Q8_0", "IQ1_S"})
# kt-kernel LLAMAFILE method (0.7.x) reads GGUF directly; same type list, and expert FFN % 256 == 0.
KT_KERNEL_LLAMAFILE = KT_CPU_EXPERTS


def support(group: str, types: set[str]) -> dict[str, str]:
    """Per engine: 'ok', 'ok after patch', or a refusal reason, for a tensor group with these types."""
    out = {"llama.cpp": "ok"}
    if group == "routed_experts":
        bad = sorted(types - KT_CPU_EXPERTS)
        out["ktransformers"] = "ok" if not bad else f"refused: {'/'.join(bad)} not computed by its CPU expert kernel"
        out["kt-kernel"] = out["ktransformers"]
    else:
        bad = sorted(types - KT_DEQUANT)
        if not bad:
            out["ktransformers"] = "ok"
        elif not (types - KT_DEQUANT_PATCHED):
            out["ktransformers"] = f"ok after patch ({'/'.join(bad)})"
        else:
            out["ktransformers"] = f"refused: {'/'.join(sorted(types - KT_DEQUANT_PATCHED))} not dequantized"
        out["kt-kernel"] = "ok"  # GPU side runs in SGLang from the HF checkpoint
    return out
