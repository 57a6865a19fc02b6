"""GLM-4.5 / 4.6 / 4.7 and GLM-4.5-Air (GGUF `glm4moe`): GQA with partial rope, leading dense blocks, shared +
routed experts with a sigmoid router and bias, and one MTP (next-n) block appended after the trunk.

From llama.cpp 0.3.36 (the tree install.sh builds):
- conversion/glm.py: block_count = num_hidden_layers + num_nextn_predict_layers (GLM-4.5: 92 + 1),
  `%s.nextn_predict_layers`, `%s.leading_dense_block_count` (first_k_dense_replace: 3 for GLM-4.5).
- models/glm4-moe.cpp: `%s.expert_gating_func` (sigmoid when absent); the MTP block's tensors are skipped at load
  unless MTP is asked for (mtp_flags |= TENSOR_SKIP when !load_mtp), and n_layer() = block_count - nextn; the
  block has the trunk's tensors plus blk.N.nextn.{eh_proj,enorm,hnorm,embed_tokens,shared_head_head,
  shared_head_norm}.
- llama-model.cpp create_memory: the main context's KV cache covers the trunk layers (the MTP context has its own).
Every tensor of the MTP block is class `nextn` (inspect reads the metadata).
"""

from __future__ import annotations

from .base import NEXTN, Family, KvCache, _per_type


class Glm4Moe(Family):
    name = "glm4moe"
    archs = ("glm4moe",)
    reasoning = "think"
    rules = (("nextn", NEXTN),)

    def kv_cache(self, md: dict, arch: str) -> KvCache:
        n_layer = self.trunk_layers(md, arch)
        vals = self.gqa_values(md, arch)
        return KvCache(form="gqa", values_per_token_per_layer=vals, layers=n_layer,
                       bytes_per_token=_per_type(vals * n_layer))


FAMILY = Glm4Moe()
