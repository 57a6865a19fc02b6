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
