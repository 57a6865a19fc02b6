"""Real-shaped GGUF headers for planning tests: the true tensor names, shapes and a plausible type mix of
published models, written header-only as sparse files (`truncate` to full size), so a 131 GB-shaped
DeepSeek-R1 costs a few MB of disk. Their tensor data reads as zeros; they are for `inspect`/`plan`, not for
running. `python -m hybridinfer.demo.shapes DIR` writes them all.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGMLQuantizationType as Q

from ..ggufio import parse


@dataclass(frozen=True)
class Spec:
    """One tensor: name, ggml shape (fastest dimension first), type."""
    name: str
    shape: tuple[int, ...]
    qtype: Q


def _r1_tensors(mla: bool, experts: Q, experts_down_hi: Q, hi_down_layers: int, base: dict) -> list[Spec]:
    n_embd, n_vocab, n_layer, n_dense, n_exp = 7168, 129280, 61, 3, 256
    n_head, q_lora, kv_lora, nope, rope, vdim, ff_dense, ff_exp = 128, 1536, 512, 128, 64, 128, 18432, 2048
    out = [Spec("token_embd.weight", (n_embd, n_vocab), base["embd"])]
    for i in range(n_layer):
        p = f"blk.{i}."
        out += [
            Spec(p + "attn_norm.weight", (n_embd,), Q.F32),
            Spec(p + "attn_q_a_norm.weight", (q_lora,), Q.F32),
            Spec(p + "attn_kv_a_norm.weight", (kv_lora,), Q.F32),
            Spec(p + "attn_q_a.weight", (n_embd, q_lora), base["attn"]),
            Spec(p + "attn_q_b.weight", (q_lora, n_head * (nope + rope)), base["attn"]),
            Spec(p + "attn_kv_a_mqa.weight", (n_embd, kv_lora + rope), base["attn_hi"]),
        ]
        if mla:
            out += [Spec(p + "attn_k_b.weight", (nope, kv_lora, n_head), Q.Q8_0),
                    Spec(p + "attn_v_b.weight", (kv_lora, vdim, n_head), Q.Q8_0)]
        else:
            out += [Spec(p + "attn_kv_b.weight", (kv_lora, n_head * (nope + vdim)), base["attn_hi"])]
        out += [Spec(p + "attn_output.weight", (n_head * vdim, n_embd), base["attn"]),
                Spec(p + "ffn_norm.weight", (n_embd,), Q.F32)]
        if i < n_dense:
            out += [Spec(p + "ffn_gate.weight", (n_embd, ff_dense), base["ffn"]),
                    Spec(p + "ffn_up.weight", (n_embd, ff_dense), base["ffn"]),
                    Spec(p + "ffn_down.weight", (ff_dense, n_embd), base["ffn_down"])]
        else:
            down = experts_down_hi if i - n_dense < hi_down_layers else experts
            out += [Spec(p + "ffn_gate_inp.weight", (n_embd, n_exp), Q.F32),
                    Spec(p + "exp_probs_b.bias", (n_exp,), Q.F32),
                    Spec(p + "ffn_gate_exps.weight", (n_embd, ff_exp, n_exp), experts),
                    Spec(p + "ffn_up_exps.weight", (n_embd, ff_exp, n_exp), experts),
                    Spec(p + "ffn_down_exps.weight", (ff_exp, n_embd, n_exp), down),
                    Spec(p + "ffn_gate_shexp.weight", (n_embd, ff_exp), base["ffn"]),
                    Spec(p + "ffn_up_shexp.weight", (n_embd, ff_exp), base["ffn"]),
                    Spec(p + "ffn_down_shexp.weight", (ff_exp, n_embd), base["ffn_down"])]
    out += [Spec("output_norm.weight", (n_embd,), Q.F32), Spec("output.weight", (n_embd, n_vocab), base["out"])]
    return out


def _r1_meta(mla: bool) -> dict:
    a = "deepseek2"
    md = {
        "general.name": "DeepSeek R1", f"{a}.context_length": 163840, f"{a}.embedding_length": 7168,
        f"{a}.feed_forward_length": 18432, f"{a}.block_count": 61, f"{a}.attention.head_count": 128,
        f"{a}.attention.head_count_kv": 1 if mla else 128, f"{a}.rope.freq_base": 10000.0,
        f"{a}.attention.layer_norm_rms_epsilon": 1e-6, f"{a}.expert_used_count": 8,
        f"{a}.leading_dense_block_count": 3, f"{a}.vocab_size": 129280, f"{a}.attention.q_lora_rank": 1536,
        f"{a}.attention.kv_lora_rank": 512, f"{a}.attention.key_length": 576 if mla else 192,
        f"{a}.attention.value_length": 512 if mla else 128, f"{a}.expert_feed_forward_length": 2048,
        f"{a}.expert_count": 256, f"{a}.expert_shared_count": 1, f"{a}.expert_weights_scale": 2.5,
        f"{a}.expert_weights_norm": True, f"{a}.expert_gating_func": 2, f"{a}.rope.dimension_count": 64,
    }
    if mla:
        md[f"{a}.attention.key_length_mla"] = 192
        md[f"{a}.attention.value_length_mla"] = 128
    return md


def _moe_gqa(arch, name, n_layer, n_embd, n_vocab, n_head, n_kv, head_dim, n_exp, n_used, ff_exp, ctx,
             q_experts, q_attn, q_other, shared_ff=0, qk_norm=False, ff_dense=0) -> tuple[dict, list[Spec]]:
    a = arch
    md = {"general.name": name, f"{a}.context_length": ctx, f"{a}.embedding_length": n_embd,
          f"{a}.block_count": n_layer, f"{a}.attention.head_count": n_head, f"{a}.attention.head_count_kv": n_kv,
          f"{a}.attention.key_length": head_dim, f"{a}.attention.value_length": head_dim,
          f"{a}.rope.freq_base": 1e6, f"{a}.attention.layer_norm_rms_epsilon": 1e-6,
          f"{a}.feed_forward_length": ff_dense or ff_exp}
    if n_exp:
        md.update({f"{a}.expert_count": n_exp, f"{a}.expert_used_count": n_used,
                   f"{a}.expert_feed_forward_length": ff_exp})
    if shared_ff:
        md[f"{a}.expert_shared_feed_forward_length"] = shared_ff
    t = [Spec("token_embd.weight", (n_embd, n_vocab), q_other)]
    for i in range(n_layer):
        p = f"blk.{i}."
        t += [Spec(p + "attn_norm.weight", (n_embd,), Q.F32),
              Spec(p + "attn_q.weight", (n_embd, n_head * head_dim), q_attn),
              Spec(p + "attn_k.weight", (n_embd, n_kv * head_dim), q_attn),
              Spec(p + "attn_v.weight", (n_embd, n_kv * head_dim), q_other),
              Spec(p + "attn_output.weight", (n_head * head_dim, n_embd), q_attn),
              Spec(p + "ffn_norm.weight", (n_embd,), Q.F32)]
        if qk_norm:
            t += [Spec(p + "attn_q_norm.weight", (head_dim,), Q.F32), Spec(p + "attn_k_norm.weight", (head_dim,), Q.F32)]
        if n_exp:
            t += [Spec(p + "ffn_gate_inp.weight", (n_embd, n_exp), Q.F32),
                  Spec(p + "ffn_gate_exps.weight", (n_embd, ff_exp, n_exp), q_experts),
                  Spec(p + "ffn_up_exps.weight", (n_embd, ff_exp, n_exp), q_experts),
                  Spec(p + "ffn_down_exps.weight", (ff_exp, n_embd, n_exp), q_other)]
            if shared_ff:
                t += [Spec(p + "ffn_gate_inp_shexp.weight", (n_embd,), Q.F32),
                      Spec(p + "ffn_gate_shexp.weight", (n_embd, shared_ff), q_experts),
                      Spec(p + "ffn_up_shexp.weight", (n_embd, shared_ff), q_experts),
                      Spec(p + "ffn_down_shexp.weight", (shared_ff, n_embd), q_other)]
        else:
            t += [Spec(p + "ffn_gate.weight", (n_embd, ff_dense), q_attn),
                  Spec(p + "ffn_up.weight", (n_embd, ff_dense), q_attn),
                  Spec(p + "ffn_down.weight", (ff_dense, n_embd), q_other)]
    t += [Spec("output_norm.weight", (n_embd,), Q.F32), Spec("output.weight", (n_embd, n_vocab), q_other)]
    return md, t


UD = dict(embd=Q.Q4_K, attn=Q.Q4_K, attn_hi=Q.Q6_K, ffn=Q.Q4_K, ffn_down=Q.Q6_K, out=Q.Q6_K)
Q4KM = dict(embd=Q.Q4_K, attn=Q.Q4_K, attn_hi=Q.Q6_K, ffn=Q.Q4_K, ffn_down=Q.Q6_K, out=Q.Q6_K)

# name -> (arch, metadata, tensors, shard count, file stem)
MODELS = {
    # Unsloth UD-IQ1_S: routed gate/up IQ1_S, down IQ1_S with the first MoE blocks' down at IQ2_XXS.
    "r1-ud-iq1_s": ("deepseek2", lambda: (_r1_meta(True), _r1_tensors(True, Q.IQ1_S, Q.IQ2_XXS, 6, UD)), 3,
                    "DeepSeek-R1-UD-IQ1_S/DeepSeek-R1-UD-IQ1_S"),
    "r1-ud-iq1_s-legacy": ("deepseek2", lambda: (_r1_meta(False), _r1_tensors(False, Q.IQ1_S, Q.IQ2_XXS, 6, UD)), 3,
                           "DeepSeek-R1-UD-IQ1_S-legacy/DeepSeek-R1-UD-IQ1_S"),
    "r1-ud-iq1_m": ("deepseek2", lambda: (_r1_meta(True), _r1_tensors(True, Q.IQ1_M, Q.IQ2_XXS, 58, UD)), 4,
                    "DeepSeek-R1-UD-IQ1_M/DeepSeek-R1-UD-IQ1_M"),
    "r1-q4_k_m": ("deepseek2", lambda: (_r1_meta(True), _r1_tensors(True, Q.Q4_K, Q.Q6_K, 29, Q4KM)), 9,
                  "DeepSeek-R1-Q4_K_M/DeepSeek-R1-Q4_K_M"),
    "qwen3moe-30b-a3b-q4_k_m": ("qwen3moe", lambda: _moe_gqa("qwen3moe", "Qwen3 30B A3B", 48, 2048, 151936, 32, 4, 128,
                                                             128, 8, 768, 40960, Q.Q4_K, Q.Q4_K, Q.Q6_K, qk_norm=True), 1,
                                "Qwen3-30B-A3B-Q4_K_M"),
    "qwen2moe-a2.7b-q4_k_m": ("qwen2moe", lambda: _moe_gqa("qwen2moe", "Qwen1.5 MoE A2.7B", 24, 2048, 151936, 16, 16, 128,
                                                           60, 4, 1408, 8192, Q.Q4_K, Q.Q4_K, Q.Q6_K, shared_ff=5632), 1,
                              "Qwen1.5-MoE-A2.7B-Q4_K_M"),
    "mixtral-8x7b-q4_k_m": ("llama", lambda: _moe_gqa("llama", "Mixtral 8x7B Instruct", 32, 4096, 32000, 32, 8, 128,
                                                      8, 2, 14336, 32768, Q.Q4_K, Q.Q4_K, Q.Q6_K), 1,
                            "Mixtral-8x7B-Instruct-Q4_K_M"),
    "llama3-8b-q4_k_m": ("llama", lambda: _moe_gqa("llama", "Llama 3.1 8B Instruct", 32, 4096, 128256, 32, 8, 128,
                                                   0, 0, 0, 131072, Q.Q4_K, Q.Q4_K, Q.Q6_K, ff_dense=14336), 1,
                         "Llama-3.1-8B-Instruct-Q4_K_M"),
}


# ---------------------------------------------------------------------------------------------------------------
# Flagships: the giant MoE families people run at home, each as its popular published quant. Shapes come from the
# model's config.json, tensor names and metadata keys exactly as llama.cpp writes and reads them
# (gguf-py/gguf/constants.py MODEL_TENSORS/Keys in gguf 0.19.0, src/llama-arch.cpp, src/llama-model.cpp), and each
# type mix is tuned so the total lands within 1 % of the published file size (tests/test_flagships.py). Published
# sizes are decimal GB as the hub lists them; each figure's source is cited where it is defined.


def _more_bits(i: int, n: int) -> bool:
    """llama-quantize's use_more_bits (src/llama-quant.cpp): the first and last eighth of the blocks and every third
    one between get the higher type for attn_v / ffn_down in the _M mixes."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _kq(q: Q, row: int) -> Q:
    """llama-quantize's fallback for a row length that is not a multiple of the 256-value K super-block
    (src/llama-quant.cpp: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K/IQ* -> IQ4_NL)."""
    if row % 256 == 0 or q in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.MXFP4, Q.IQ4_NL):
        return q
    return {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}.get(q, Q.IQ4_NL)


def _qwen3_235b() -> tuple[dict, list[Spec]]:
    """Qwen3-235B-A22B-Instruct-2507, unsloth Q4_K_M (qwen3moe). Shapes: Qwen/Qwen3-235B-A22B-Instruct-2507
    config.json — hidden 4096, 94 layers, 64 heads / 4 KV heads of 128, 128 experts (8 used) of 1536, vocab 151936,
    context 262144, rope theta 5e6, q/k norm, no shared expert.
    Q4_K_M is llama-quantize's standard mix (no Unsloth dynamic upcasting): routed gate/up Q4_K, ffn_down_exps and
    attn_v Q6_K on the use_more_bits blocks (46 of 94) else Q4_K, other attention and the embedding Q4_K, output
    Q6_K, norms and the router F32 (llama-quantize never quantizes ffn_gate_inp)."""
    a, n_layer, n_embd, n_vocab, n_head, n_kv, hd, n_exp, ff = "qwen3moe", 94, 4096, 151936, 64, 4, 128, 128, 1536
    md = {"general.name": "Qwen3 235B A22B Instruct 2507", f"{a}.context_length": 262144, f"{a}.embedding_length": n_embd,
          f"{a}.feed_forward_length": 12288, f"{a}.block_count": n_layer, f"{a}.attention.head_count": n_head,
          f"{a}.attention.head_count_kv": n_kv, f"{a}.attention.key_length": hd, f"{a}.attention.value_length": hd,
          f"{a}.rope.freq_base": 5e6, f"{a}.attention.layer_norm_rms_epsilon": 1e-6, f"{a}.expert_count": n_exp,
          f"{a}.expert_used_count": 8, f"{a}.expert_feed_forward_length": ff}
    t = [Spec("token_embd.weight", (n_embd, n_vocab), Q.Q4_K)]
    for i in range(n_layer):
        p, hi = f"blk.{i}.", _more_bits(i, n_layer)
        t += [Spec(p + "attn_norm.weight", (n_embd,), Q.F32),
              Spec(p + "attn_q.weight", (n_embd, n_head * hd), Q.Q4_K),
              Spec(p + "attn_k.weight", (n_embd, n_kv * hd), Q.Q4_K),
              Spec(p + "attn_v.weight", (n_embd, n_kv * hd), Q.Q6_K if hi else Q.Q4_K),
              Spec(p + "attn_output.weight", (n_head * hd, n_embd), Q.Q4_K),
              Spec(p + "attn_q_norm.weight", (hd,), Q.F32), Spec(p + "attn_k_norm.weight", (hd,), Q.F32),
              Spec(p + "ffn_norm.weight", (n_embd,), Q.F32),
              Spec(p + "ffn_gate_inp.weight", (n_embd, n_exp), Q.F32),
              Spec(p + "ffn_gate_exps.weight", (n_embd, ff, n_exp), Q.Q4_K),
              Spec(p + "ffn_up_exps.weight", (n_embd, ff, n_exp), Q.Q4_K),
              Spec(p + "ffn_down_exps.weight", (ff, n_embd, n_exp), Q.Q6_K if hi else Q.Q4_K)]
    t += [Spec("output_norm.weight", (n_embd,), Q.F32), Spec("output.weight", (n_embd, n_vocab), Q.Q6_K)]
    return md, t


def _qwen3_next() -> tuple[dict, list[Spec]]:
    """Qwen3-Next-80B-A3B (Thinking; the Instruct model has the same shapes), Q4_K_M (qwen3next). Shapes:
    Qwen/Qwen3-Next-80B-A3B-Instruct config.json — hidden 2048, 48 layers, full attention every 4th layer
    (full_attention_interval 4: blocks 3, 7, ..., 47; the other 36 are Gated DeltaNet linear attention), gated
    attention 16 heads / 2 KV heads of 256 with rotary on a quarter (64), linear attention 16 key heads and 32 value
    heads of 128 with a 4-wide causal conv, 512 experts (10 used) of 512 plus one shared expert of 512, vocab
    151936, context 262144, rope theta 1e7.
    Tensors as llama.cpp's qwen3next loader creates them (src/llama-model.cpp): full-attention blocks carry attn_q
    with the output gate folded in (2 x heads x 256 rows), attn_k/attn_v/attn_output and q/k norms; linear blocks
    carry ssm_in (q, k, v and z projections fused: 2 x 2048 + 2 x 4096 rows, the form published GGUFs carry; newer
    converters split it into attn_qkv + attn_gate), ssm_conv1d (4 x 8192), ssm_dt bias and ssm_a (32), ssm_ba
    (beta/alpha, 64 rows), ssm_norm (128) and ssm_out (4096 -> 2048). Every block has post_attention_norm and the
    MoE with a sigmoid-gated shared expert (ffn_gate_inp_shexp).
    Q4_K_M: routed gate/up Q4_K, ffn_down_exps Q6_K on the use_more_bits blocks (24 of 48) else Q4_K, attention,
    linear-attention projections, shared experts and the embedding Q4_K (attn_v and the shared down Q6_K on the
    use_more_bits blocks), output Q6_K; norms, conv, ssm_a/ssm_dt and the routers F32."""
    a, n_layer, n_embd, n_vocab, n_head, n_kv, hd = "qwen3next", 48, 2048, 151936, 16, 2, 256
    n_exp, ff, ff_sh, d_state, n_group, dt_rank, d_conv = 512, 512, 512, 128, 16, 32, 4
    key_dim, value_dim = d_state * n_group, d_state * dt_rank
    md = {"general.name": "Qwen3 Next 80B A3B Thinking", f"{a}.context_length": 262144, f"{a}.embedding_length": n_embd,
          f"{a}.feed_forward_length": 5120, f"{a}.block_count": n_layer, f"{a}.attention.head_count": n_head,
          f"{a}.attention.head_count_kv": n_kv, f"{a}.attention.key_length": hd, f"{a}.attention.value_length": hd,
          f"{a}.rope.dimension_count": 64, f"{a}.rope.freq_base": 1e7, f"{a}.attention.layer_norm_rms_epsilon": 1e-6,
          f"{a}.expert_count": n_exp, f"{a}.expert_used_count": 10, f"{a}.expert_feed_forward_length": ff,
          f"{a}.expert_shared_feed_forward_length": ff_sh, f"{a}.full_attention_interval": 4,
          f"{a}.ssm.conv_kernel": d_conv, f"{a}.ssm.inner_size": value_dim, f"{a}.ssm.state_size": d_state,
          f"{a}.ssm.time_step_rank": dt_rank, f"{a}.ssm.group_count": n_group}
    t = [Spec("token_embd.weight", (n_embd, n_vocab), Q.Q4_K)]
    for i in range(n_layer):
        p, hi = f"blk.{i}.", _more_bits(i, n_layer)
        t.append(Spec(p + "attn_norm.weight", (n_embd,), Q.F32))
        if (i + 1) % 4 == 0:  # full (gated) attention
            t += [Spec(p + "attn_q.weight", (n_embd, n_head * hd * 2), Q.Q4_K),
                  Spec(p + "attn_k.weight", (n_embd, n_kv * hd), Q.Q4_K),
                  Spec(p + "attn_v.weight", (n_embd, n_kv * hd), Q.Q6_K if hi else Q.Q4_K),
                  Spec(p + "attn_output.weight", (n_head * hd, n_embd), Q.Q4_K),
                  Spec(p + "attn_q_norm.weight", (hd,), Q.F32), Spec(p + "attn_k_norm.weight", (hd,), Q.F32)]
        else:  # Gated DeltaNet: recurrent state instead of a KV cache
            t += [Spec(p + "ssm_in.weight", (n_embd, 2 * key_dim + 2 * value_dim), Q.Q4_K),
                  Spec(p + "ssm_conv1d.weight", (d_conv, 2 * key_dim + value_dim), Q.F32),
                  Spec(p + "ssm_dt.bias", (dt_rank,), Q.F32), Spec(p + "ssm_a", (dt_rank,), Q.F32),
                  Spec(p + "ssm_ba.weight", (n_embd, 2 * dt_rank), Q.Q4_K),
                  Spec(p + "ssm_norm.weight", (d_state,), Q.F32),
                  Spec(p + "ssm_out.weight", (value_dim, n_embd), Q.Q4_K)]
        t += [Spec(p + "post_attention_norm.weight", (n_embd,), Q.F32),
              Spec(p + "ffn_gate_inp.weight", (n_embd, n_exp), Q.F32),
              Spec(p + "ffn_gate_exps.weight", (n_embd, ff, n_exp), Q.Q4_K),
              Spec(p + "ffn_up_exps.weight", (n_embd, ff, n_exp), Q.Q4_K),
              Spec(p + "ffn_down_exps.weight", (ff, n_embd, n_exp), Q.Q6_K if hi else Q.Q4_K),
              Spec(p + "ffn_gate_inp_shexp.weight", (n_embd,), Q.F32),
              Spec(p + "ffn_gate_shexp.weight", (n_embd, ff_sh), Q.Q4_K),
              Spec(p + "ffn_up_shexp.weight", (n_embd, ff_sh), Q.Q4_K),
              Spec(p + "ffn_down_shexp.weight", (ff_sh, n_embd), Q.Q6_K if hi else Q.Q4_K)]
    t += [Spec("output_norm.weight", (n_embd,), Q.F32), Spec("output.weight", (n_embd, n_vocab), Q.Q6_K)]
    return md, t


def _glm46() -> tuple[dict, list[Spec]]:
    """GLM-4.6, unsloth UD-Q2_K_XL (glm4moe). Shapes: zai-org/GLM-4.6 config.json — hidden 5120, 92 layers plus
    one MTP layer (num_nextn_predict_layers 1: llama.cpp writes block_count 93 and the nextn tensors on blk.92),
    first_k_dense_replace 3 (leading_dense_block_count), 96 heads / 8 KV heads of 128 with q/k/v biases and q/k
    norm, partial rotary 0.5 (64), dense FFN 12288, 160 routed experts (8 used) of 1536 plus 1 shared, sigmoid
    gating with a correction bias (exp_probs_b), routed scaling 2.5, vocab 151552, context 202752.
    UD-Q2_K_XL mix (Unsloth dynamic: the small, always-read tensors stay high, the routed experts go low): routed
    gate/up Q2_K and down Q3_K (routed experts 2.90 bits/weight, 92 % of the bytes); attention Q4_K with attn_v Q6_K and
    attn_output Q5_K; dense FFN and shared experts Q4_K (down Q6_K); the MTP layer's eh_proj Q8_0 and its own
    embedding/head like the model's (Q4_K / Q6_K); token_embd Q4_K, output Q6_K; norms, biases, router F32."""
    a, n_layer, n_embd, n_vocab, n_head, n_kv, hd = "glm4moe", 93, 5120, 151552, 96, 8, 128
    n_exp, ff, ff_dense, n_dense = 160, 1536, 12288, 3
    md = {"general.name": "GLM 4.6", f"{a}.context_length": 202752, f"{a}.embedding_length": n_embd,
          f"{a}.feed_forward_length": ff_dense, f"{a}.block_count": n_layer, f"{a}.attention.head_count": n_head,
          f"{a}.attention.head_count_kv": n_kv, f"{a}.attention.key_length": hd, f"{a}.attention.value_length": hd,
          f"{a}.rope.dimension_count": 64, f"{a}.rope.freq_base": 1e6, f"{a}.attention.layer_norm_rms_epsilon": 1e-5,
          f"{a}.expert_count": n_exp, f"{a}.expert_used_count": 8, f"{a}.expert_shared_count": 1,
          f"{a}.expert_feed_forward_length": ff, f"{a}.leading_dense_block_count": n_dense,
          f"{a}.expert_weights_scale": 2.5, f"{a}.expert_weights_norm": True, f"{a}.expert_gating_func": 2,
          f"{a}.nextn_predict_layers": 1}
    t = [Spec("token_embd.weight", (n_embd, n_vocab), Q.Q4_K)]
    for i in range(n_layer):
        p = f"blk.{i}."
        t += [Spec(p + "attn_norm.weight", (n_embd,), Q.F32),
              Spec(p + "attn_q.weight", (n_embd, n_head * hd), Q.Q4_K), Spec(p + "attn_q.bias", (n_head * hd,), Q.F32),
              Spec(p + "attn_k.weight", (n_embd, n_kv * hd), Q.Q4_K), Spec(p + "attn_k.bias", (n_kv * hd,), Q.F32),
              Spec(p + "attn_v.weight", (n_embd, n_kv * hd), Q.Q6_K), Spec(p + "attn_v.bias", (n_kv * hd,), Q.F32),
              Spec(p + "attn_output.weight", (n_head * hd, n_embd), Q.Q5_K),
              Spec(p + "attn_q_norm.weight", (hd,), Q.F32), Spec(p + "attn_k_norm.weight", (hd,), Q.F32),
              Spec(p + "post_attention_norm.weight", (n_embd,), Q.F32)]
        if i < n_dense:
            t += [Spec(p + "ffn_gate.weight", (n_embd, ff_dense), Q.Q4_K),
                  Spec(p + "ffn_up.weight", (n_embd, ff_dense), Q.Q4_K),
                  Spec(p + "ffn_down.weight", (ff_dense, n_embd), Q.Q6_K)]
            continue
        t += [Spec(p + "ffn_gate_inp.weight", (n_embd, n_exp), Q.F32),
              Spec(p + "exp_probs_b.bias", (n_exp,), Q.F32),
              Spec(p + "ffn_gate_exps.weight", (n_embd, ff, n_exp), Q.Q2_K),
              Spec(p + "ffn_up_exps.weight", (n_embd, ff, n_exp), Q.Q2_K),
              Spec(p + "ffn_down_exps.weight", (ff, n_embd, n_exp), Q.Q3_K),
              Spec(p + "ffn_gate_shexp.weight", (n_embd, ff), Q.Q4_K),
              Spec(p + "ffn_up_shexp.weight", (n_embd, ff), Q.Q4_K),
              Spec(p + "ffn_down_shexp.weight", (ff, n_embd), Q.Q6_K)]
        if i == n_layer - 1:  # the MTP (nextn) layer: llama.cpp loads it, skips it when not drafting
            t += [Spec(p + "nextn.eh_proj.weight", (2 * n_embd, n_embd), Q.Q8_0),
                  Spec(p + "nextn.embed_tokens.weight", (n_embd, n_vocab), Q.Q4_K),
                  Spec(p + "nextn.enorm.weight", (n_embd,), Q.F32), Spec(p + "nextn.hnorm.weight", (n_embd,), Q.F32),
                  Spec(p + "nextn.shared_head_head.weight", (n_embd, n_vocab), Q.Q6_K),
                  Spec(p + "nextn.shared_head_norm.weight", (n_embd,), Q.F32)]
    t += [Spec("output_norm.weight", (n_embd,), Q.F32), Spec("output.weight", (n_embd, n_vocab), Q.Q6_K)]
    return md, t


def _gpt_oss_120b() -> tuple[dict, list[Spec]]:
    """gpt-oss-120b, unsloth Q4_K_M (gpt-oss). Shapes: openai/gpt-oss-120b config.json — hidden 2880, 36 layers
    alternating sliding-window (128 tokens) and full attention (llama.cpp: `gpt-oss.attention.sliding_window` and a
    hard-coded pattern of 2, src/llama-model.cpp), 64 heads / 8 KV heads of 64 with biases and a learned sink per
    head (attn_sinks), 128 experts (4 used) of 2880 with biases, router with bias, vocab 201088, context 131072,
    rope theta 150000 with YaRN x32 over 4096.
    Type mix: the routed experts ship as MXFP4 (OpenAI's own 4.25-bit format; every quant of this model keeps it —
    which is why unsloth's Q4_K_M is barely smaller than its F16). The rest follows llama-quantize's Q4_K_M with its
    fallback for 2880-wide rows, which no K super-block divides: attn_q/attn_k Q4_K -> Q5_0, attn_v Q6_K -> Q8_0,
    token_embd Q4_K -> Q5_0, output Q6_K -> Q8_0; attn_output's rows are 4096 wide and stay Q4_K. Biases, sinks,
    norms and the router F32."""
    a, n_layer, n_embd, n_vocab, n_head, n_kv, hd, n_exp, ff = "gpt-oss", 36, 2880, 201088, 64, 8, 64, 128, 2880
    md = {"general.name": "Gpt-Oss-120B", f"{a}.context_length": 131072, f"{a}.embedding_length": n_embd,
          f"{a}.feed_forward_length": ff, f"{a}.block_count": n_layer, f"{a}.attention.head_count": n_head,
          f"{a}.attention.head_count_kv": n_kv, f"{a}.attention.key_length": hd, f"{a}.attention.value_length": hd,
          f"{a}.rope.freq_base": 150000.0, f"{a}.rope.scaling.type": "yarn", f"{a}.rope.scaling.factor": 32.0,
          f"{a}.rope.scaling.original_context_length": 4096, f"{a}.attention.layer_norm_rms_epsilon": 1e-5,
          f"{a}.attention.sliding_window": 128, f"{a}.expert_count": n_exp, f"{a}.expert_used_count": 4,
          f"{a}.expert_feed_forward_length": ff}
    t = [Spec("token_embd.weight", (n_embd, n_vocab), _kq(Q.Q4_K, n_embd))]
    for i in range(n_layer):
        p = f"blk.{i}."
        t += [Spec(p + "attn_norm.weight", (n_embd,), Q.F32),
              Spec(p + "attn_q.weight", (n_embd, n_head * hd), _kq(Q.Q4_K, n_embd)),
              Spec(p + "attn_q.bias", (n_head * hd,), Q.F32),
              Spec(p + "attn_k.weight", (n_embd, n_kv * hd), _kq(Q.Q4_K, n_embd)),
              Spec(p + "attn_k.bias", (n_kv * hd,), Q.F32),
              Spec(p + "attn_v.weight", (n_embd, n_kv * hd), _kq(Q.Q6_K, n_embd)),
              Spec(p + "attn_v.bias", (n_kv * hd,), Q.F32),
              Spec(p + "attn_output.weight", (n_head * hd, n_embd), Q.Q4_K),
              Spec(p + "attn_output.bias", (n_embd,), Q.F32),
              Spec(p + "attn_sinks.weight", (n_head,), Q.F32),
              Spec(p + "post_attention_norm.weight", (n_embd,), Q.F32),
              Spec(p + "ffn_gate_inp.weight", (n_embd, n_exp), Q.F32), Spec(p + "ffn_gate_inp.bias", (n_exp,), Q.F32),
              Spec(p + "ffn_gate_exps.weight", (n_embd, ff, n_exp), Q.MXFP4),
              Spec(p + "ffn_gate_exps.bias", (ff, n_exp), Q.F32),
              Spec(p + "ffn_up_exps.weight", (n_embd, ff, n_exp), Q.MXFP4),
              Spec(p + "ffn_up_exps.bias", (ff, n_exp), Q.F32),
              Spec(p + "ffn_down_exps.weight", (ff, n_embd, n_exp), Q.MXFP4),
              Spec(p + "ffn_down_exps.bias", (n_embd, n_exp), Q.F32)]
    t += [Spec("output_norm.weight", (n_embd,), Q.F32), Spec("output.weight", (n_embd, n_vocab), _kq(Q.Q6_K, n_embd))]
    return md, t


# DeepSeek-V3.1 UD-Q2_K_XL: R1's shape (deepseek-ai/DeepSeek-V3.1 config.json is V3's: 61 layers, 3 dense; its MTP
# layer is dropped by llama.cpp's deepseek2 converter), routed gate/up Q2_K and down Q3_K on the first 51 MoE blocks,
# Q2_K on the last 7 (Unsloth does not publish its per-block choices; the split is tuned to the published 245 GB);
# attention, shared experts and dense FFN as in R1's dynamic quants (Q4_K, the sensitive kv_a/kv_b and down
# projections Q6_K), MLA k_b/v_b Q8_0, token_embd Q4_K, output Q6_K.
UD_Q2 = dict(embd=Q.Q4_K, attn=Q.Q4_K, attn_hi=Q.Q6_K, ffn=Q.Q4_K, ffn_down=Q.Q6_K, out=Q.Q6_K)


def _v31_meta() -> dict:
    md = _r1_meta(True)
    md["general.name"] = "DeepSeek V3.1"
    return md


# DeepSeek-V3.2 (GGUF `deepseek32`). Shapes: deepseek-ai/DeepSeek-V3.2 config.json (DeepseekV32ForCausalLM) — V3's
# trunk (hidden 7168, 61 layers, first_k_dense_replace 3, 128 heads, q_lora 1536, kv_lora 512, nope 128 / rope 64 /
# v 128, 256 experts (8 used) of 2048 + 1 shared, vocab 129280, context 163840) plus the DSA lightning indexer
# (index_n_heads 64, index_head_dim 128, index_topk 2048) and num_nextn_predict_layers 1. Config as quoted in a
# public DeepSeek-V3.2 architecture write-up (GitHub, found by find_string '"index_n_heads": 64'); the same three
# index_* values appear in a public Rust test fixture of DeepseekV32ForCausalLM.
# Tensors and keys as the tree install.sh builds writes and reads them (llama.cpp 0.3.36):
# - models/deepseek32.cpp load_arch_tensors: every block, the MTP one included, carries MLA attention plus
#   indexer.k_norm {128} (weight and bias), indexer.proj {7168, 64}, indexer.attn_k {7168, 128} and
#   indexer.attn_q_b {1536, 64*128}; blocks >= n_layer add nextn.{eh_proj {2*7168, 7168}, enorm, hnorm,
#   embed_tokens {7168, vocab}, shared_head_head {7168, vocab}, shared_head_norm}.
# - conversion/deepseek.py DeepseekV32Model: skip_mtp = False, block_count = 61 + 1 (the MTP layer is blk.61),
#   nextn_predict_layers 1, attention.indexer.{head_count, key_length, top_k} from index_n_heads / index_head_dim /
#   index_topk.
# - src/llama-quant.cpp quantizes the indexer projections for deepseek32 (only GLM5_NEXT keeps them unquantized).
# Type mix: NO published size of a DSA-carrying DeepSeek-V3.2 UD-Q2_K_XL (or other 2-bit) could be found through the
# tools used here (searched: pages/docs/issues corpora for "unsloth DeepSeek-V3.2 GGUF UD-Q2_K_XL size", "DeepSeek-V3.2
# how to run locally unsloth", the unsloth/DeepSeek-V3.2-GGUF tree pages; find_string for "DeepSeek-V3.2-UD-Q2_K_XL",
# "DeepSeek-V3.2-UD-", "DeepSeek-V3.2-GGUF", "DeepSeek-V3.2-Q4_K_M": only file names and third-party notes turned up,
# one of which says an early unsloth V3.2 upload (UD-TQ1_0) carries no indexer at all, i.e. was converted as
# deepseek2 — so an unsloth size may not even be of this architecture). So no size is invented: the mix is V3.1
# UD-Q2_K_XL's exactly (_r1_tensors(True, Q2_K, Q3_K, 51, UD_Q2)) plus what V3.2 adds — the indexer per block at
# the attention types (projections Q4_K, k_norm F32) and the MTP block blk.61 as a V3.1 MoE block with Q3_K down
# plus its nextn tensors (eh_proj Q8_0 as GLM's, embed_tokens Q4_K and shared_head_head Q6_K as the model's own).
# tests/test_flagships.py holds the total to V3.1's plus exactly those bytes.
V32_INDEXER = dict(n_head=64, head_dim=128, top_k=2048)


def _v32_meta() -> dict:
    a = "deepseek32"
    md = {k.replace("deepseek2.", a + ".", 1): v for k, v in _r1_meta(True).items()}
    md.update({"general.name": "DeepSeek V3.2", f"{a}.block_count": 62, f"{a}.nextn_predict_layers": 1,
               f"{a}.attention.indexer.head_count": V32_INDEXER["n_head"],
               f"{a}.attention.indexer.key_length": V32_INDEXER["head_dim"],
               f"{a}.attention.indexer.top_k": V32_INDEXER["top_k"]})
    return md


def _v32_indexer(i: int) -> list[Spec]:
    n_embd, q_lora, n_ih, ihd = 7168, 1536, V32_INDEXER["n_head"], V32_INDEXER["head_dim"]
    p = f"blk.{i}.indexer."
    return [Spec(p + "k_norm.weight", (ihd,), Q.F32), Spec(p + "k_norm.bias", (ihd,), Q.F32),
            Spec(p + "proj.weight", (n_embd, n_ih), UD_Q2["attn"]),
            Spec(p + "attn_k.weight", (n_embd, ihd), UD_Q2["attn"]),
            Spec(p + "attn_q_b.weight", (q_lora, n_ih * ihd), UD_Q2["attn"])]


def _v32_extra() -> list[Spec]:
    """What V3.2 UD-Q2_K_XL holds beyond V3.1's tensors: the indexer of the 61 trunk blocks and the MTP block."""
    n_embd, n_vocab = 7168, 129280
    out = [s for i in range(61) for s in _v32_indexer(i)]
    # blk.61: a full MoE block as _r1_tensors writes block 3 (with Q3_K down), renumbered, plus indexer and nextn
    blk3 = [s for s in _r1_tensors(True, Q.Q2_K, Q.Q3_K, 51, UD_Q2) if s.name.startswith("blk.3.")]
    out += [Spec("blk.61." + s.name[len("blk.3."):], s.shape, s.qtype) for s in blk3] + _v32_indexer(61)
    p = "blk.61.nextn."
    out += [Spec(p + "eh_proj.weight", (2 * n_embd, n_embd), Q.Q8_0),
            Spec(p + "enorm.weight", (n_embd,), Q.F32), Spec(p + "hnorm.weight", (n_embd,), Q.F32),
            Spec(p + "embed_tokens.weight", (n_embd, n_vocab), UD_Q2["embd"]),
            Spec(p + "shared_head_head.weight", (n_embd, n_vocab), UD_Q2["out"]),
            Spec(p + "shared_head_norm.weight", (n_embd,), Q.F32)]
    return out


def _v32() -> tuple[dict, list[Spec]]:
    """DeepSeek-V3.2 UD-Q2_K_XL-shaped: V3.1's tensors with each block's indexer after its ffn_norm, the MTP block
    blk.61 before output_norm/output (the order the converter writes blocks in)."""
    extra = _v32_extra()
    by_block: dict[int, list[Spec]] = {}
    for s in extra:
        by_block.setdefault(int(s.name.split(".")[1]), []).append(s)
    t: list[Spec] = []
    for s in _r1_tensors(True, Q.Q2_K, Q.Q3_K, 51, UD_Q2):
        if s.name == "output_norm.weight":
            t += by_block[61]
        t.append(s)
        if s.name.endswith(".ffn_norm.weight"):
            t += [x for x in by_block[int(s.name.split(".")[1])] if ".indexer." in x.name]
    return _v32_meta(), t


# name -> (repo, quant, published bytes, source) for every flagship: what `download --list` shows and what
# tests/test_flagships.py holds each header to (total within 1 %). Published bytes None: no published size was found
# (the source says what was searched); the test holds that header to its computed size instead.
FLAGSHIPS = {
    "qwen3-235b-a22b-2507-q4_k_m": (
        "unsloth/Qwen3-235B-A22B-Instruct-2507-GGUF", "Q4_K_M", 142e9,
        "142 GB: 'size_in_gb': 142 for unsloth's Q4_K_M/Qwen3-235B-A22B-Instruct-2507-Q4_K_M-0000[1-3]-of-00003.gguf in "
        "a public benchmark inventory (GitHub, found by find_string); ~142 GB also quoted by two other "
        "public notes. The HF tree page itself could not be read through the tools here."),
    "qwen3-next-80b-a3b-q4_k_m": (
        "Qwen/Qwen3-Next-80B-A3B-Thinking-GGUF", "Q4_K_M", 48.4e9,
        "48.4 GB: https://huggingface.co/Qwen/Qwen3-Next-80B-A3B-Thinking-GGUF/tree/main "
        "(Qwen3-Next-80B-A3B-Thinking-Q4_K_M.gguf)"),
    "glm-4.6-ud-q2_k_xl": (
        "unsloth/GLM-4.6-GGUF", "UD-Q2_K_XL", 135e9,
        "135 GB: https://unsloth.ai/docs/models/tutorials/glm-4.6-how-to-run-locally ('Dynamic 2-bit GGUF reduces "
        "the size to 135GB') and u/danielhanchen on r/LocalLLaMA 'GLM-4.6-GGUF is out' ('The 2-bit is 135GB')"),
    "gpt-oss-120b-q4_k_m": (
        "unsloth/gpt-oss-120b-GGUF", "Q4_K_M", 62.9e9,
        "62.9 GB: 'size_in_gb': 62.9 for unsloth's Q4_K_M/gpt-oss-120b-Q4_K_M-0000[1-2]-of-00002.gguf in the same "
        "public benchmark inventory; the HF tree page could not be read through the tools here"),
    "deepseek-v3.1-ud-q2_k_xl": (
        "unsloth/DeepSeek-V3.1-GGUF", "UD-Q2_K_XL", 245e9,
        "245 GB: https://unsloth.ai/docs/models/tutorials/deepseek-v3.1-how-to-run-locally ('The quantized "
        "dynamic 2-bit version uses 245GB'; its recommended 2-bit is UD-Q2_K_XL)"),
    "deepseek-v3.2-ud-q2_k_xl": (
        "unsloth/DeepSeek-V3.2-GGUF", "UD-Q2_K_XL", None,
        "no published size found: searched unsloth's docs and the unsloth/DeepSeek-V3.2-GGUF tree pages, public "
        "issues and code for DeepSeek-V3.2 UD-Q2_K_XL; the header is V3.1 UD-Q2_K_XL's mix plus the indexer "
        "tensors and the MTP block (see the comment above _v32_meta)"),
}

MODELS.update({
    "qwen3-235b-a22b-2507-q4_k_m": ("qwen3moe", _qwen3_235b, 3,
                                    "Q4_K_M/Qwen3-235B-A22B-Instruct-2507-Q4_K_M"),
    "qwen3-next-80b-a3b-q4_k_m": ("qwen3next", _qwen3_next, 1, "Qwen3-Next-80B-A3B-Thinking-Q4_K_M"),
    "glm-4.6-ud-q2_k_xl": ("glm4moe", _glm46, 3, "UD-Q2_K_XL/GLM-4.6-UD-Q2_K_XL"),
    "gpt-oss-120b-q4_k_m": ("gpt-oss", _gpt_oss_120b, 2, "Q4_K_M/gpt-oss-120b-Q4_K_M"),
    "deepseek-v3.1-ud-q2_k_xl": ("deepseek2", lambda: (_v31_meta(), _r1_tensors(True, Q.Q2_K, Q.Q3_K, 51, UD_Q2)), 6,
                                 "UD-Q2_K_XL/DeepSeek-V3.1-UD-Q2_K_XL"),
    "deepseek-v3.2-ud-q2_k_xl": ("deepseek32", _v32, 6, "UD-Q2_K_XL/DeepSeek-V3.2-UD-Q2_K_XL"),
})


def _tokenizer(w: GGUFWriter, n_vocab: int) -> None:
    # Vocabulary of the true size (the header's largest part); contents are placeholders.
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(n_vocab)])
    w.add_token_types([1] * n_vocab)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")


def write_model(name: str, out_dir: str | os.PathLike) -> str:
    """Write the named shape (all shards) under out_dir; returns the path to give `inspect` (first shard)."""
    arch, build, n_shards, stem = MODELS[name]
    md, tensors = build()
    out = Path(out_dir) / stem
    out.parent.mkdir(parents=True, exist_ok=True)
    total = sum(_nbytes(t) for t in tensors)
    per_shard = total / n_shards
    shards: list[list[Spec]] = [[]]
    acc = 0
    for t in tensors:  # fill shards in tensor order, like gguf-split --split-max-size
        if acc >= per_shard * len(shards) and len(shards) < n_shards:
            shards.append([])
        shards[-1].append(t)
        acc += _nbytes(t)
    vocab = next(t.shape[1] for t in tensors if t.name == "token_embd.weight")
    paths = []
    for i, group in enumerate(shards):
        path = f"{out}-{i + 1:05d}-of-{n_shards:05d}.gguf" if n_shards > 1 else f"{out}.gguf"
        w = GGUFWriter(path, arch)
        if i == 0:
            for k, v in md.items():
                _add(w, k, v)
            _tokenizer(w, vocab)
        if n_shards > 1:
            w.add_uint16("split.no", i)
            w.add_uint16("split.count", n_shards)
            w.add_int32("split.tensors.count", len(tensors))
        for t in group:
            w.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), _nbytes(t), raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        _, _, end, _ = parse(path)
        os.truncate(path, end)  # sparse: the data region costs no disk
        paths.append(path)
    return paths[0]


def _nbytes(t: Spec) -> int:
    from gguf.constants import GGML_QUANT_SIZES
    bs, ts = GGML_QUANT_SIZES[t.qtype]
    return int(np.prod(t.shape)) // bs * ts


def _add(w: GGUFWriter, k: str, v) -> None:
    if isinstance(v, bool):
        w.add_bool(k, v)
    elif isinstance(v, int):
        w.add_uint32(k, v)
    elif isinstance(v, float):
        w.add_float32(k, v)
    else:
        w.add_string(k, str(v))


def ensure_models(out_dir: str | os.PathLike, names=None) -> dict[str, str]:
    """Write the shapes not yet present (cheap: headers only); -> name -> path for `inspect`."""
    out = {}
    for name in names or MODELS:
        arch, _, n, stem = MODELS[name]
        first = Path(out_dir) / (f"{stem}-00001-of-{n:05d}.gguf" if n > 1 else f"{stem}.gguf")
        out[name] = str(first) if first.exists() else write_model(name, out_dir)
    return out


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "fixtures"
    for n, p in ensure_models(target).items():
        print(f"{n}: {p}")
