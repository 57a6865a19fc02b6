"""Qwen3 MoE (GGUF `qwen3moe`: Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-480B): plain GQA on every layer
with per-head q/k norms, routed experts without a shared expert, <think> reasoning.

Tensors (llama.cpp 0.3.36 models/qwen3moe.cpp): attn_{q,k,v,output}, attn_{q,k}_norm, attn_norm, ffn_norm,
ffn_gate_inp, ffn_{gate,up,down}_exps. KV: the generic GQA cache (head_count_kv x (key_length + value_length)).
"""

from __future__ import annotations

from .base import Family


class Qwen3Moe(Family):
    name = "qwen3moe"
    archs = ("qwen3moe", "qwen3vlmoe")
    reasoning = "think"


FAMILY = Qwen3Moe()
