"""gpt-oss (GGUF `gpt-oss`: gpt-oss-20b, gpt-oss-120b): GQA with attention sinks, a 128-token sliding window on
alternate layers, routed experts in MXFP4 with biases, and the harmony reasoning format.

From llama.cpp 0.3.36 (the tree install.sh builds):
- models/openai-moe.cpp load_arch_hparams: `%s.attention.sliding_window` (n_swa), swa_type standard,
  load_swa_pattern(ml, 2): `%s.attention.sliding_window_pattern` (per-layer array, or a period) else period 2 with
  dense_first = false, so (llama-hparams.cpp set_swa_pattern) layer il is sliding iff il % n < n - 1: the even
  layers slide, the odd ones attend fully.
- load_arch_tensors: attn_norm, post_attention_norm, attn_{q,k,v} (or attn_qkv) with biases, attn_output (+bias),
  attn_sinks (one per head), ffn_gate_inp (+bias), ffn_{gate,up,down}_exps (+biases); conversion/gpt_oss.py splits
  the checkpoint's gate_up_proj into gate and up, so there is no ffn_gate_up_exps. Sinks are attention.
- gpt-oss-120b: 36 layers, 8 KV heads of 64, window 128 (its config.json: num_hidden_layers 36,
  num_key_value_heads 8, head_dim 64, sliding_window 128).
"""

from __future__ import annotations

from .base import Family, KvCache, _per_type, hparam


def swa_flags(md: dict, arch: str, n_layer: int, period: int = 2) -> list[bool]:
    pattern = md.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list) and pattern:
        return [bool(x) for x in pattern[:n_layer]]
    n = int(pattern) if isinstance(pattern, int) else period
    return [n == 0 or i % n < n - 1 for i in range(n_layer)]


class GptOss(Family):
    name = "gpt-oss"
    archs = ("gpt-oss",)
    reasoning = "harmony"

    def kv_cache(self, md: dict, arch: str) -> KvCache:
        n_layer = self.trunk_layers(md, arch)
        window = int(hparam(md, arch, "attention.sliding_window"))
        swa = sum(swa_flags(md, arch, n_layer)) if window else 0
        vals = self.gqa_values(md, arch)
        return KvCache(form="gqa", values_per_token_per_layer=vals, layers=n_layer - swa,
                       bytes_per_token=_per_type(vals * (n_layer - swa)), swa_layers=swa, swa_window=window,
                       swa_bytes_per_token=_per_type(vals * swa) if swa else {})

    def opens_think(self, template) -> bool:
        return False  # harmony: the analysis channel is a channel, not a <think> block the prompt opens


FAMILY = GptOss()
