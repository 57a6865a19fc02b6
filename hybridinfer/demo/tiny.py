"""The project's own demo model: a tiny DeepSeek-V3/R1-architecture GGUF (MLA + MoE) that llama.cpp loads.

Random weights, deterministic from a seed, ~7 MB, written in about a second. Its text is meaningless; it exists
so the whole path (plan, expert placement, MLA KV cache, reasoning split, serving, benchmarking) runs on any
box with no download. `default_model()` writes it once into the cache directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from gguf.constants import ExpertGatingFuncType, GGMLQuantizationType as Q
from gguf.quants import quantize

from ..util import cache_dir

VERSION = 2  # bump when the recipe changes, so cached copies are regenerated
ARCH = "deepseek2"

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


@dataclass(frozen=True)
class _Shape:
    """The tiny model's dimensions. Attention has DeepSeek-V3/R1's real per-head dimensions (kv_lora 512, rope 64,
    nope 128, v 128): ik_llama.cpp accepts a mainline MLA GGUF only with key 576 / value 512, rope 64 and heads
    divisible by 4 (src/llama-hparams.cpp, "Detected incompatible DeepSeek model"), and its CPU flash-attention
    kernels exist for exactly these head sizes (576/512 MLA, 192/128 legacy). Only the head count and widths are
    small."""
    mla: bool
    blocks: int
    n_embd: int
    n_expert: int
    n_ff_exp: int
    kv_lora: int
    rope: int
    n_head: int = 4
    q_lora: int = 128
    nope: int = 128
    v_dim: int = 128
    n_ff: int = 512
    n_dense: int = 1
    n_used: int = 2


def write_tiny(path: str | os.PathLike, seed: int = 0, qtype: str = "q8_0", mla: bool = True,
               blocks: int = 4, n_embd: int = 256, n_expert: int = 8, n_ff_exp: int = 128,
               kv_lora: int = 512, rope: int = 64, pre: str = "deepseek-v3") -> str:
    """Write the tiny deepseek2 model. `mla=False` writes the legacy form (attn_kv_b, no *_mla keys); other
    kv_lora/rope give an MLA model ik_llama.cpp refuses (for tests); `pre` names the pre-tokenizer (an unknown one
    makes a model the engine cannot load)."""
    rng = np.random.default_rng(seed)
    s = _Shape(mla=mla, blocks=blocks, n_embd=n_embd, n_expert=n_expert, n_ff_exp=n_ff_exp, kv_lora=kv_lora, rope=rope)
    tokens, merges = _bpe(120)
    specials = [BOS, EOS, USER, ASSISTANT, THINK, END_THINK]
    vocab = tokens + specials
    types = [1] * len(tokens) + [3, 3, 4, 4, 4, 4]  # bos/eos control; chat markers user-defined (rendered)
    qt = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "f16": Q.F16, "f32": Q.F32}[qtype]

    path = str(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = path + ".tmp"
    w = GGUFWriter(tmp, ARCH)
    w.add_name("hybridinfer tiny DeepSeek-R1-architecture demo (random weights)")
    _add_hparams(w, s)
    _add_tokenizer(w, vocab, types, merges, pre)
    _add_tensors(w, s, len(vocab), rng, qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)  # never leave a half-written model where a loader would find it
    return path


def _add_hparams(w: GGUFWriter, s: _Shape) -> None:
    """The deepseek2 hyperparameters, in the order the file has always had them."""
    u = lambda k, v: w.add_uint32(f"{ARCH}.{k}", v)  # noqa: E731
    u("context_length", 4096)
    u("embedding_length", s.n_embd)
    u("feed_forward_length", s.n_ff)
    u("block_count", s.blocks)
    u("attention.head_count", s.n_head)
    u("attention.head_count_kv", 1 if s.mla else s.n_head)
    w.add_float32(f"{ARCH}.rope.freq_base", 10000.0)
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-6)
    u("rope.dimension_count", s.rope)
    u("leading_dense_block_count", s.n_dense)
    u("attention.q_lora_rank", s.q_lora)
    u("attention.kv_lora_rank", s.kv_lora)
    if s.mla:
        u("attention.key_length", s.kv_lora + s.rope)
        u("attention.value_length", s.kv_lora)
        u("attention.key_length_mla", s.nope + s.rope)
        u("attention.value_length_mla", s.v_dim)
    else:
        u("attention.key_length", s.nope + s.rope)
        u("attention.value_length", s.v_dim)
    u("expert_feed_forward_length", s.n_ff_exp)
    u("expert_count", s.n_expert)
    u("expert_used_count", s.n_used)
    u("expert_shared_count", 1)
    w.add_float32(f"{ARCH}.expert_weights_scale", 2.5)
    w.add_bool(f"{ARCH}.expert_weights_norm", True)
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)


def _add_tokenizer(w: GGUFWriter, vocab: list[str], types: list[int], merges: list[str], pre: str) -> None:
    """GPT-2-style byte-level BPE with R1's special tokens and chat template."""
    w.add_uint32(f"{ARCH}.vocab_size", len(vocab))
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


def _add_tensors(w: GGUFWriter, s: _Shape, n_vocab: int, rng: np.random.Generator, qt: Q) -> None:
    """Every tensor, in file order, random weights drawn from `rng` in that order."""

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

    mat("token_embd.weight", n_vocab, s.n_embd, scale=0.5)
    for i in range(s.blocks):
        _add_block(w, s, i, mat, ones)
    ones("output_norm.weight", s.n_embd)
    mat("output.weight", n_vocab, s.n_embd, scale=0.5)


def _add_block(w: GGUFWriter, s: _Shape, i: int, mat, ones) -> None:
    """Block i's tensors: MLA (or legacy) attention, then a dense FFN (leading blocks) or routed + shared experts."""
    p = f"blk.{i}."
    ones(p + "attn_norm.weight", s.n_embd)
    ones(p + "attn_q_a_norm.weight", s.q_lora)
    ones(p + "attn_kv_a_norm.weight", s.kv_lora)
    mat(p + "attn_q_a.weight", s.q_lora, s.n_embd)
    mat(p + "attn_q_b.weight", s.n_head * (s.nope + s.rope), s.q_lora)
    mat(p + "attn_kv_a_mqa.weight", s.kv_lora + s.rope, s.n_embd)
    if s.mla:
        mat(p + "attn_k_b.weight", s.n_head, s.kv_lora, s.nope)
        mat(p + "attn_v_b.weight", s.n_head, s.v_dim, s.kv_lora)
    else:
        mat(p + "attn_kv_b.weight", s.n_head * (s.nope + s.v_dim), s.kv_lora)
    mat(p + "attn_output.weight", s.n_embd, s.n_head * s.v_dim)
    ones(p + "ffn_norm.weight", s.n_embd)
    if i < s.n_dense:
        mat(p + "ffn_gate.weight", s.n_ff, s.n_embd)
        mat(p + "ffn_up.weight", s.n_ff, s.n_embd)
        mat(p + "ffn_down.weight", s.n_embd, s.n_ff)
    else:
        mat(p + "ffn_gate_inp.weight", s.n_expert, s.n_embd, q=Q.F32)
        w.add_tensor(p + "exp_probs_b.bias", np.zeros(s.n_expert, dtype=np.float32))
        mat(p + "ffn_gate_exps.weight", s.n_expert, s.n_ff_exp, s.n_embd)
        mat(p + "ffn_up_exps.weight", s.n_expert, s.n_ff_exp, s.n_embd)
        mat(p + "ffn_down_exps.weight", s.n_expert, s.n_embd, s.n_ff_exp)
        mat(p + "ffn_gate_shexp.weight", s.n_ff_exp, s.n_embd)
        mat(p + "ffn_up_shexp.weight", s.n_ff_exp, s.n_embd)
        mat(p + "ffn_down_shexp.weight", s.n_embd, s.n_ff_exp)


def default_model() -> str:
    """Path of the demo model, generating it on first use (deterministic, ~1 s)."""
    path = cache_dir() / "models" / f"tiny-deepseek2-v{VERSION}-q8_0.gguf"
    if not path.exists():
        write_tiny(path)
    return str(path)
