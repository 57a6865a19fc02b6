"""DeepSeek-V3.2 (GGUF `deepseek32`): DeepSeek V3's MLA and experts plus DeepSeek Sparse Attention — a lightning
indexer per layer that picks the top-k cached tokens each query attends to — and one MTP block kept by the
converter.

From llama.cpp 0.3.36 (the tree install.sh builds):
- src/llama-arch.cpp: the indexer tensors `blk.%d.indexer.{k_norm,proj,attn_k,attn_q_b}` (k_norm with a bias);
  the MTP block's `blk.%d.nextn.{eh_proj,enorm,hnorm,embed_tokens,shared_head_head,shared_head_norm}`.
- models/deepseek32.cpp load_arch_hparams: `%s.attention.indexer.head_count` (64), `.key_length` (128),
  `.top_k` (2048), `%s.expert_gating_func`; MLA keys as deepseek2.
- conversion/deepseek.py DeepseekV32Model: skip_mtp = False, block_count = num_hidden_layers + nextn (61 + 1).
- llama-model.cpp create_memory (LLM_ARCH_DEEPSEEK32) -> llama_kv_cache_dsa: the MLA cache over the trunk layers,
  plus an indexer key cache (llama-kv-cache-dsa.cpp: one key head of indexer key_length values, K only, in the
  cache's type_k) over the same trunk layers; the MTP block is not cached by the main context.
"""

from __future__ import annotations

import re

from .base import NEXTN, Family, KvCache, hparam
from .deepseek2 import mla_cache


class DeepSeek32(Family):
    name = "deepseek32"
    archs = ("deepseek32",)
    reasoning = "think"
    mla = True
    # blk.N.indexer.k_norm is attention too, not a norm; nextn.* by name when the metadata is not at hand
    rules = (("nextn", NEXTN), ("attention", re.compile(r"\.indexer\.")))

    def kv_cache(self, md: dict, arch: str) -> KvCache:
        return mla_cache(md, arch, self.trunk_layers(md, arch),
                         extra_values=int(hparam(md, arch, "attention.indexer.key_length")))


FAMILY = DeepSeek32()
