"""DeepSeek V2/V3/R1 and Kimi-K2 (GGUF `deepseek2`): multi-head latent attention, shared + routed experts,
leading dense blocks, a router bias (`exp_probs_b`).

Tensors (llama.cpp 0.3.36 src/llama-arch.cpp, models/deepseek2.cpp): attn_q_a / attn_q_b / attn_q (V2-Lite) /
attn_kv_a_mqa / attn_k_b / attn_v_b (MLA form) or attn_kv_b (legacy form) / attn_output, attn_q_a_norm and
attn_kv_a_norm, ffn_{gate,up,down}{,_exps,_shexp}, ffn_gate_inp, exp_probs_b. The converter drops the MTP block
(conversion/deepseek.py: DeepseekV2Model.skip_mtp = True).
"""

from __future__ import annotations

from .base import Family, KvCache, _per_type, hparam


def mla_cache(md: dict, arch: str, n_layer: int, extra_values: int = 0) -> KvCache:
    """MLA form (the GGUF has `attention.key_length_mla`): one compressed latent (kv_lora_rank) plus the rope key
    per token per layer — llama.cpp caches K only for MLA (llama-kv-cache.cpp: has_v = !is_mla). Legacy form
    (attn_kv_b only): llama.cpp caches full per-head K (nope+rope) and V. `extra_values`: further values per token
    per layer of the same cache type (DeepSeek-V3.2's indexer keys)."""
    kv_lora = int(hparam(md, arch, "attention.kv_lora_rank"))
    rope = int(hparam(md, arch, "rope.dimension_count"))
    if f"{arch}.attention.key_length_mla" in md:
        vals, form = kv_lora + rope, "mla"
    else:
        n_head = int(hparam(md, arch, "attention.head_count"))
        vals = n_head * (int(hparam(md, arch, "attention.key_length")) + int(hparam(md, arch, "attention.value_length")))
        form = "legacy-mha"
    return KvCache(form=form, values_per_token_per_layer=vals, layers=n_layer,
                   bytes_per_token=_per_type((vals + extra_values) * n_layer),
                   indexer_values_per_token_per_layer=extra_values)


class DeepSeek2(Family):
    name = "deepseek2"
    archs = ("deepseek2",)
    reasoning = "think"
    mla = True

    def kv_cache(self, md: dict, arch: str) -> KvCache:
        return mla_cache(md, arch, self.trunk_layers(md, arch))


FAMILY = DeepSeek2()
