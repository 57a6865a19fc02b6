"""The project's own demo model: a tiny DeepSeek-V3/R1-architecture GGUF (MLA + MoE) that llama.cpp loads.

Random weights, deterministic from a seed, ~7 MB, written in about a second. Its text is meaningless; it exists
so the whole path (plan, expert placement, MLA KV cache, reasoning split, serving, benchmarking) runs on any
box with no download. `default_model()` writes it once into the cache directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from gguf.constants import ExpertGatingFuncType, GGMLQuantizationType as Q
from gguf.quants import quantize

from ..util import cache_dir

VERSION = 2  # bump when the recipe changes, so cached copies are regenerated

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT, THINK, END_THINK = "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"
# R1's template reduced to its behaviour: no system role of its own, earlier thoughts dropped from history,
# and the generation prompt opens the thought, so the model's output starts inside <think>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ m['content'] }}"
    "{%- elif m['role'] == 'user' -%}" + USER + "{{ m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}" + ASSISTANT + "{{ m['content'].split('</think>')[-1] }}" + EOS +
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + "<think>\n{%- endif -%}"
)
_CORPUS = (
    "the quick brown fox jumps over the lazy dog. a mixture of experts model routes each token to a few experts "
    "and the rest of the weights stay idle. attention and the cache live on the gpu while the experts live on the "
    "cpu. hello world, this is a tiny model for tests and it thinks before it answers. "
)


def _byte_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode map, which `tokenizer.ggml.model = gpt2` expects."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(n_merges: int) -> tuple[list[str], list[str]]:
    """Train a few byte-level BPE merges on a fixed corpus (deterministic)."""
    b2u = _byte_unicode()
    words = [[b2u[b] for b in (" " + w if i else w).encode()] for i, w in enumerate(_CORPUS.split(" "))]
    tokens = [b2u[b] for b in range(256)]
    merges = []
    for _ in range(n_merges):
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for a, b in zip(w, w[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        if not counts:
            break
        pair = max(sorted(counts), key=lambda p: counts[p])
        merges.append(f"{pair[0]} {pair[1]}")
        tokens.append(pair[0] + pair[1])
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == pair:
                    w[i:i + 2] = [pair[0] + pair[1]]
                else:
                    i += 1
    return tokens, merges


def write_tiny(path: str | os.PathLike, seed: int = 0, qtype: str = "q8_0", mla: bool = True,
               blocks: int = 4, n_embd: int = 256, n_expert: int = 8, n_ff_exp: int = 128,
               kv_lora: int = 512, rope: int = 64, pre: str = "deepseek-v3") -> str:
    """Write the tiny deepseek2 model. `mla=False` writes the legacy form (attn_kv_b, no *_mla keys); other
    kv_lora/rope give an MLA model ik_llama.cpp refuses (for tests); `pre` names the pre-tokenizer (an unknown one
    makes a model the engine cannot load)."""
    rng = np.random.default_rng(seed)
    arch = "deepseek2"
    # Attention has DeepSeek-V3/R1's real per-head dimensions (kv_lora 512, rope 64, nope 128, v 128): ik_llama.cpp
    # accepts a mainline MLA GGUF only with key 576 / value 512, rope 64 and heads divisible by 4
    # (src/llama-hparams.cpp, "Detected incompatible DeepSeek model"), and its CPU flash-attention kernels exist
    # for exactly these head sizes (576/512 MLA, 192/128 legacy). Only the head count and widths are small.
    n_head, q_lora, nope, v_dim, n_ff, n_dense, n_used = 4, 128, 128, 128, 512, 1, 2
    tokens, merges = _bpe(120)
    specials = [BOS, EOS, USER, ASSISTANT, THINK, END_THINK]
    vocab = tokens + specials
    types = [1] * len(tokens) + [3, 3, 4, 4, 4, 4]  # bos/eos control; chat markers user-defined (rendered)
    qt = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "f16": Q.F16, "f32": Q.F32}[qtype]

    path = str(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = path + ".tmp"
    w = GGUFWriter(tmp, arch)
    w.add_name("hybridinfer tiny DeepSeek-R1-architecture demo (random weights)")
    u = lambda k, v: w.add_uint32(f"{arch}.{k}", v)  # noqa: E731
    u("context_length", 4096)
    u("embedding_length", n_embd)
    u("feed_forward_length", n_ff)
    u("block_count", blocks)
    u("attention.head_count", n_head)
    u("attention.head_count_kv", 1 if mla else n_head)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    u("rope.dimension_count", rope)
    u("leading_dense_block_count", n_dense)
    u("attention.q_lora_rank", q_lora)
    u("attention.kv_lora_rank", kv_lora)
    if mla:
        u("attention.key_length", kv_lora + rope)
        u("attention.value_length", kv_lora)
        u("attention.key_length_mla", nope + rope)
        u("attention.value_length_mla", v_dim)
    else:
        u("attention.key_length", nope + rope)
        u("attention.value_length", v_dim)
    u("expert_feed_forward_length", n_ff_exp)
    u("expert_count", n_expert)
    u("expert_used_count", n_used)
    u("expert_shared_count", 1)
    w.add_float32(f"{arch}.expert_weights_scale", 2.5)
    w.add_bool(f"{arch}.expert_weights_norm", True)
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
    u("vocab_size", len(vocab))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocab)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab.index(BOS))
    w.add_eos_token_id(vocab.index(EOS))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def mat(name, *np_shape, scale=0.06, q=qt):
        a = (rng.standard_normal(np_shape) * scale).astype(np.float32)
        if q in (Q.F32,):
            w.add_tensor(name, a)
        elif q == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, quantize(a, q), raw_dtype=q)

    def ones(name, n):
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    mat("token_embd.weight", len(vocab), n_embd, scale=0.5)
    for i in range(blocks):
        p = f"blk.{i}."
        ones(p + "attn_norm.weight", n_embd)
        ones(p + "attn_q_a_norm.weight", q_lora)
        ones(p + "attn_kv_a_norm.weight", kv_lora)
        mat(p + "attn_q_a.weight", q_lora, n_embd)
        mat(p + "attn_q_b.weight", n_head * (nope + rope), q_lora)
        mat(p + "attn_kv_a_mqa.weight", kv_lora + rope, n_embd)
        if mla:
            mat(p + "attn_k_b.weight", n_head, kv_lora, nope)
            mat(p + "attn_v_b.weight", n_head, v_dim, kv_lora)
        else:
            mat(p + "attn_kv_b.weight", n_head * (nope + v_dim), kv_lora)
        mat(p + "attn_output.weight", n_embd, n_head * v_dim)
        ones(p + "ffn_norm.weight", n_embd)
        if i < n_dense:
            mat(p + "ffn_gate.weight", n_ff, n_embd)
            mat(p + "ffn_up.weight", n_ff, n_embd)
            mat(p + "ffn_down.weight", n_embd, n_ff)
        else:
            mat(p + "ffn_gate_inp.weight", n_expert, n_embd, q=Q.F32)
            w.add_tensor(p + "exp_probs_b.bias", np.zeros(n_expert, dtype=np.float32))
            mat(p + "ffn_gate_exps.weight", n_expert, n_ff_exp, n_embd)
            mat(p + "ffn_up_exps.weight", n_expert, n_ff_exp, n_embd)
            mat(p + "ffn_down_exps.weight", n_expert, n_embd, n_ff_exp)
            mat(p + "ffn_gate_shexp.weight", n_ff_exp, n_embd)
            mat(p + "ffn_up_shexp.weight", n_ff_exp, n_embd)
            mat(p + "ffn_down_shexp.weight", n_embd, n_ff_exp)
    ones("output_norm.weight", n_embd)
    mat("output.weight", len(vocab), n_embd, scale=0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)  # never leave a half-written model where a loader would find it
    return path


def default_model() -> str:
    """Path of the demo model, generating it on first use (deterministic, ~1 s)."""
    path = cache_dir() / "models" / f"tiny-deepseek2-v{VERSION}-q8_0.gguf"
    if not path.exists():
        write_tiny(path)
    return str(path)
