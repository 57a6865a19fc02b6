"""Qwen3-Next and Qwen3.5 (GGUF `qwen3next`, `qwen35moe`, `qwen35`): hybrid attention — three of every four layers
are linear attention (a gated delta net with a fixed recurrent state), every fourth is full gated attention with a
KV cache — plus routed experts and a gated shared expert.

From llama.cpp 0.3.36 (the tree install.sh builds):
- models/qwen3next.cpp / qwen35moe.cpp load_arch_hparams: `%s.ssm.{conv_kernel,inner_size,state_size,
  time_step_rank,group_count}`; recurrent layers from `%s.attention.recurrent_layers` (per-layer array) or else
  `%s.full_attention_interval` (default 4): layer i is recurrent iff (i + 1) % interval != 0.
- conversion/qwen.py: ssm.conv_kernel = linear_conv_kernel_dim, state_size = linear_key_head_dim, group_count =
  linear_num_key_heads, time_step_rank = linear_num_value_heads, inner_size = linear_value_head_dim x
  linear_num_value_heads.
- llama-hparams.cpp: per recurrent layer and sequence, n_embd_r = (conv_kernel - 1) x (inner_size + 2 x
  group_count x state_size) conv values and n_embd_s = state_size x inner_size state values, both f32
  (llama-model.cpp create_memory: llama_memory_recurrent with GGML_TYPE_F32); the attention layers get a plain
  KV cache (llama_memory_hybrid, filter_attn = !is_recr).
- Tensors (llama-arch.cpp): linear layers attn_qkv, attn_gate, ssm_conv1d, ssm_dt, ssm_a, ssm_ba (or ssm_alpha /
  ssm_beta), ssm_norm, ssm_out; full layers attn_{q,k,v,output}, attn_{q,k}_norm; every layer attn_norm,
  post_attention_norm, ffn_gate_inp, ffn_{gate,up,down}_exps, ffn_{gate,up,down}_shexp, ffn_gate_inp_shexp.
"""

from __future__ import annotations

import re

from .base import NEXTN, STATE_BYTES, Family, KvCache, _per_type, hparam


def recurrent_flags(md: dict, arch: str, n_layer: int) -> list[bool]:
    per_layer = md.get(f"{arch}.attention.recurrent_layers")
    if isinstance(per_layer, list) and per_layer:
        return [bool(x) for x in per_layer[:n_layer]]
    interval = int(hparam(md, arch, "full_attention_interval", 4)) or 4
    return [(i + 1) % interval != 0 for i in range(n_layer)]


class Qwen3Next(Family):
    name = "qwen3next"
    archs = ("qwen3next", "qwen35moe", "qwen35")
    reasoning = "think"
    # The linear-attention weights are that layer's attention (placed with it); ssm_norm stays a norm.
    rules = (("nextn", NEXTN), ("norms", re.compile(r"\.ssm_norm\.")), ("attention", re.compile(r"\.ssm_")))

    def kv_cache(self, md: dict, arch: str) -> KvCache:
        n_layer = self.trunk_layers(md, arch)
        recurrent = sum(recurrent_flags(md, arch, n_layer))
        full = n_layer - recurrent
        vals = self.gqa_values(md, arch)
        conv, inner = int(hparam(md, arch, "ssm.conv_kernel")), int(hparam(md, arch, "ssm.inner_size"))
        state, groups = int(hparam(md, arch, "ssm.state_size")), int(hparam(md, arch, "ssm.group_count"))
        per_layer = (max(0, conv - 1) * (inner + 2 * groups * state) + state * inner) * STATE_BYTES
        return KvCache(form="gqa", values_per_token_per_layer=vals, layers=full,
                       bytes_per_token=_per_type(vals * full), state_layers=recurrent,
                       state_bytes_per_slot=per_layer * recurrent)


FAMILY = Qwen3Next()
