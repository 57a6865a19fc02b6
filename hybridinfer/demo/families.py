"""Tiny random-weights GGUFs, one per giant-MoE family people run at home, that llama.cpp (and ik_llama.cpp where
its tree knows the architecture) load and serve.

Each is written in the style of `tiny.py`: gguf-py's `GGUFWriter`, small dimensions, but the family's exact GGUF
metadata keys, tensor names and shapes (as each engine's loader requires them), a small byte-level BPE tokenizer
with the family's special tokens and pre-tokenizer name, and the family's chat template reduced to its behaviour
(where the thought opens, which markers frame a turn). Weights are random: the text is meaningless; the files
exist so plan, placement, serving and the reasoning split run per family on any box with no download.

Sources (cited per family below): llama.cpp as vendored in llama-cpp-python 0.3.36 (`src/models/<arch>.cpp`
load_arch_hparams / load_arch_tensors, `src/llama-vocab.cpp`, `common/parsers/gpt-oss.cpp`) and ik_llama.cpp as
vendored in ik-llama-cpp-python 0.1.5 (`src/llama-hparams.cpp`, `src/llama-load-tensors.cpp`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGUFWriter, LlamaFileType
from gguf.constants import ExpertGatingFuncType, GGMLQuantizationType as Q
from gguf.quants import quantize

from ..util import cache_dir
from . import tiny

VERSION = 1  # bump when any recipe changes, so cached copies are regenerated


@dataclass(frozen=True)
class Family:
    name: str          # what `hybridinfer demo --family NAME` takes
    arch: str          # general.architecture
    what: str          # one line for --help
    reasoning: str     # "think" | "harmony" | "none": how its answers carry the thought
    ik: bool           # ik_llama.cpp 0.1.5 knows the architecture
    write: Callable[[str, int], None]


# --- tokenizer -------------------------------------------------------------------------------------------------

def _tokenizer(w: GGUFWriter, arch: str, specials: list[tuple[str, int]], pre: str, bos: str | None, eos: str,
               template: str, add_bos: bool = False, pad: str | None = None) -> int:
    """tiny.py's byte-level BPE (256 byte tokens + 120 merges) plus the family's special tokens (text, token type:
    3 control, 4 user-defined); -> vocabulary size."""
    tokens, merges = tiny._bpe(120)
    vocab = tokens + [t for t, _ in specials]
    types = [1] * len(tokens) + [ty for _, ty in specials]
    w.add_uint32(f"{arch}.vocab_size", len(vocab))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocab)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if bos is not None:
        w.add_bos_token_id(vocab.index(bos))
    w.add_eos_token_id(vocab.index(eos))
    if pad is not None:
        w.add_pad_token_id(vocab.index(pad))
    w.add_add_bos_token(add_bos)
    w.add_chat_template(template)
    return len(vocab)


class _Tensors:
    """Random tensors in file order; shapes are given in numpy order (ggml's reversed), like tiny.py."""

    def __init__(self, w: GGUFWriter, seed: int, qt: Q = Q.Q8_0):
        self.w, self.rng, self.qt = w, np.random.default_rng(seed), qt

    def mat(self, name: str, *shape: int, scale: float = 0.06, q: Q | None = None) -> None:
        q = self.qt if q is None else q
        a = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        if q == Q.F32:
            self.w.add_tensor(name, a)
        elif q == Q.F16:
            self.w.add_tensor(name, a.astype(np.float16))
        else:
            self.w.add_tensor(name, quantize(a, q), raw_dtype=q)

    def qkv(self, p: str, q_rows: int, kv_rows: int, n_embd: int, bias: bool = False) -> None:
        """A block's attn_q/k/v (and their biases, after the three weights: the file order the families share)."""
        self.mat(p + "attn_q.weight", q_rows, n_embd)
        self.mat(p + "attn_k.weight", kv_rows, n_embd)
        self.mat(p + "attn_v.weight", kv_rows, n_embd)
        if bias:
            self.vec(p + "attn_q.bias", q_rows)
            self.vec(p + "attn_k.bias", kv_rows)
            self.vec(p + "attn_v.bias", kv_rows)

    def vec(self, name: str, *shape: int, value: float | None = None) -> None:
        a = (np.full(shape, value, dtype=np.float32) if value is not None
             else (self.rng.standard_normal(shape) * 0.02).astype(np.float32))
        self.w.add_tensor(name, a)


def _open(path: str, arch: str, name: str, ftype: LlamaFileType = LlamaFileType.MOSTLY_Q8_0) -> tuple[GGUFWriter, str]:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = path + ".tmp"
    w = GGUFWriter(tmp, arch)
    w.add_name(name)
    w.add_file_type(ftype)  # what the engines print as the model's type
    return w, tmp


def _close(w: GGUFWriter, tmp: str, path: str) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)  # never leave a half-written model where a loader would find it


def _common(w: GGUFWriter, arch: str, *, blocks: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int,
            head: int, rope: int | None = None, rope_base: float = 1e6, n_expert: int = 8, n_used: int = 2,
            n_ff_exp: int = 128) -> None:
    u = lambda k, v: w.add_uint32(f"{arch}.{k}", v)  # noqa: E731
    u("context_length", 4096)
    u("embedding_length", n_embd)
    u("feed_forward_length", n_ff)
    u("block_count", blocks)
    u("attention.head_count", n_head)
    u("attention.head_count_kv", n_head_kv)
    u("attention.key_length", head)
    u("attention.value_length", head)
    if rope is not None:
        u("rope.dimension_count", rope)
    w.add_float32(f"{arch}.rope.freq_base", rope_base)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    u("expert_count", n_expert)
    u("expert_used_count", n_used)
    u("expert_feed_forward_length", n_ff_exp)


def _experts(t: _Tensors, p: str, n_embd: int, n_expert: int = 8, n_ff_exp: int = 128, q: Q | None = None) -> None:
    t.mat(p + "ffn_gate_inp.weight", n_expert, n_embd, q=Q.F32)
    t.mat(p + "ffn_gate_exps.weight", n_expert, n_ff_exp, n_embd, q=q)
    t.mat(p + "ffn_up_exps.weight", n_expert, n_ff_exp, n_embd, q=q)
    t.mat(p + "ffn_down_exps.weight", n_expert, n_embd, n_ff_exp, q=q)


# --- chat templates (reduced to their behaviour) ----------------------------------------------------------------

# Qwen3 (hybrid thinking, 2504 releases): ChatML; the model writes <think> itself; enable_thinking=false closes an
# empty thought in the prompt; earlier thoughts are dropped from the history.
QWEN3_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "<|im_start|>assistant\n{{ m['content'].split('</think>')[-1].lstrip('\n') }}<|im_end|>\n"
    "{%- else -%}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false -%}<think>\n\n</think>\n\n{%- endif -%}"
    "{%- endif -%}"
)
# Qwen3-Next-80B-A3B-Thinking / Qwen3-2507-Thinking: ChatML, and the generation prompt opens the thought (like R1).
QWEN3_THINKING_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "<|im_start|>assistant\n{{ m['content'].split('</think>')[-1].lstrip('\n') }}<|im_end|>\n"
    "{%- else -%}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n<think>\n{%- endif -%}"
)
# GLM-4.5 / 4.6: [gMASK]<sop>, role markers without newlines before them; the model writes <think> after
# <|assistant|>; /nothink (enable_thinking=false) closes an empty thought in the prompt.
GLM45_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}<|assistant|>\n{{ m['content'].split('</think>')[-1].strip() }}"
    "{%- else -%}<|{{ m['role'] }}|>\n{{ m['content'] }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>"
    "{%- if enable_thinking is defined and enable_thinking is false -%}\n<think></think>{%- endif -%}"
    "{%- endif -%}"
)
# gpt-oss harmony: <|start|>ROLE<|message|>…<|end|>; the assistant writes <|channel|>analysis<|message|>…<|end|>
# then <|start|>assistant<|channel|>final<|message|>…<|return|>. llama.cpp recognises the format by "<|channel|>"
# in the template (common/chat.cpp) and parses it in common/parsers/gpt-oss.cpp.
HARMONY_TEMPLATE = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Reasoning: {{ reasoning_effort | default('medium') }}\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' or m['role'] == 'developer' -%}"
    "<|start|>developer<|message|># Instructions\n\n{{ m['content'] }}<|end|>"
    "{%- elif m['role'] == 'assistant' -%}"
    "<|start|>assistant<|channel|>final<|message|>{{ m['content'] }}<|end|>"
    "{%- else -%}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"
)

_QWEN_SPECIALS = [("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3), ("<think>", 4), ("</think>", 4)]


# --- qwen3moe (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-480B-A35B) ------------------------------------------

def write_qwen3moe(path: str, seed: int = 0) -> None:
    """llama.cpp 0.3.36 src/models/qwen3moe.cpp: attn_q/k/v/output, attn_q_norm/attn_k_norm (head dim), routed
    experts only (no shared expert), router `ffn_gate_inp`; ik 0.1.5 src/llama-hparams.cpp LLM_ARCH_QWEN3MOE."""
    arch, E, H, D = "qwen3moe", 256, 4, 128
    w, tmp = _open(path, arch, "hybridinfer tiny Qwen3-MoE-architecture demo (random weights)")
    _common(w, arch, blocks=4, n_embd=E, n_ff=512, n_head=H, n_head_kv=2, head=D)
    n_vocab = _tokenizer(w, arch, _QWEN_SPECIALS, "qwen2", None, "<|im_end|>", QWEN3_TEMPLATE, pad="<|endoftext|>")
    t = _Tensors(w, seed)
    t.mat("token_embd.weight", n_vocab, E, scale=0.5)
    for i in range(4):
        p = f"blk.{i}."
        t.vec(p + "attn_norm.weight", E, value=1.0)
        t.qkv(p, H * D, 2 * D, E)
        t.mat(p + "attn_output.weight", E, H * D)
        t.vec(p + "attn_q_norm.weight", D, value=1.0)
        t.vec(p + "attn_k_norm.weight", D, value=1.0)
        t.vec(p + "ffn_norm.weight", E, value=1.0)
        _experts(t, p, E)
    t.vec("output_norm.weight", E, value=1.0)
    t.mat("output.weight", n_vocab, E, scale=0.5)
    _close(w, tmp, path)


# --- glm4moe (GLM-4.5, GLM-4.5-Air, GLM-4.6) ----------------------------------------------------------------------

def write_glm4moe(path: str, seed: int = 0) -> None:
    """llama.cpp 0.3.36 src/models/glm4-moe.cpp and ik 0.1.5 src/llama-load-tensors.cpp create_glm4_moe_tensors:
    q/k/v with biases, optional q/k norms, `post_attention_norm` (no ffn_norm), leading dense blocks, sigmoid-gated
    routed experts with `exp_probs_b` and a shared expert; the last block is the NextN (MTP) layer, counted in
    block_count and named by `nextn_predict_layers` — both engines skip it unless asked to load MTP. ik requires
    expert_weights_scale (ik src/llama-hparams.cpp LLM_ARCH_GLM4_MOE)."""
    arch, E, H, KV, D, trunk = "glm4moe", 256, 4, 2, 128, 3
    blocks = trunk + 1
    w, tmp = _open(path, arch, "hybridinfer tiny GLM-4.5-architecture demo (random weights)")
    _common(w, arch, blocks=blocks, n_embd=E, n_ff=512, n_head=H, n_head_kv=KV, head=D, rope=D // 2)
    w.add_uint32(f"{arch}.leading_dense_block_count", 1)
    w.add_uint32(f"{arch}.expert_shared_count", 1)
    w.add_float32(f"{arch}.expert_weights_scale", 2.5)
    w.add_bool(f"{arch}.expert_weights_norm", True)
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
    w.add_uint32(f"{arch}.nextn_predict_layers", 1)
    specials = [("<|endoftext|>", 3), ("[MASK]", 3), ("[gMASK]", 3), ("[sMASK]", 3), ("<sop>", 3), ("<eop>", 3),
                ("<|system|>", 3), ("<|user|>", 3), ("<|assistant|>", 3), ("<|observation|>", 3),
                ("<think>", 4), ("</think>", 4)]
    n_vocab = _tokenizer(w, arch, specials, "glm4", "[gMASK]", "<|user|>", GLM45_TEMPLATE, pad="<|endoftext|>")
    t = _Tensors(w, seed)
    t.mat("token_embd.weight", n_vocab, E, scale=0.5)
    for i in range(blocks):
        p = f"blk.{i}."
        t.vec(p + "attn_norm.weight", E, value=1.0)
        t.qkv(p, H * D, KV * D, E, bias=True)
        t.mat(p + "attn_output.weight", E, H * D)
        t.vec(p + "attn_q_norm.weight", D, value=1.0)
        t.vec(p + "attn_k_norm.weight", D, value=1.0)
        t.vec(p + "post_attention_norm.weight", E, value=1.0)
        if i < 1:
            t.mat(p + "ffn_gate.weight", 512, E)
            t.mat(p + "ffn_up.weight", 512, E)
            t.mat(p + "ffn_down.weight", E, 512)
        else:
            t.mat(p + "ffn_gate_inp.weight", 8, E, q=Q.F32)
            t.vec(p + "exp_probs_b.bias", 8, value=0.0)
            t.mat(p + "ffn_gate_exps.weight", 8, 128, E)
            t.mat(p + "ffn_up_exps.weight", 8, 128, E)
            t.mat(p + "ffn_down_exps.weight", 8, E, 128)
            t.mat(p + "ffn_gate_shexp.weight", 128, E)
            t.mat(p + "ffn_up_shexp.weight", 128, E)
            t.mat(p + "ffn_down_shexp.weight", E, 128)
        if i >= trunk:  # the NextN layer's own tensors
            t.mat(p + "nextn.eh_proj.weight", E, 2 * E)
            t.vec(p + "nextn.enorm.weight", E, value=1.0)
            t.vec(p + "nextn.hnorm.weight", E, value=1.0)
            t.vec(p + "nextn.shared_head_norm.weight", E, value=1.0)
    t.vec("output_norm.weight", E, value=1.0)
    t.mat("output.weight", n_vocab, E, scale=0.5)
    _close(w, tmp, path)


# --- gpt-oss (gpt-oss-20b, gpt-oss-120b) --------------------------------------------------------------------------

HARMONY_SPECIALS = [("<|startoftext|>", 3), ("<|endoftext|>", 3), ("<|return|>", 3), ("<|constrain|>", 3),
                    ("<|channel|>", 3), ("<|start|>", 3), ("<|end|>", 3), ("<|message|>", 3), ("<|call|>", 3)]


def write_gpt_oss(path: str, seed: int = 0) -> None:
    """llama.cpp 0.3.36 src/models/openai-moe.cpp: per-head `attn_sinks`, biases on q/k/v/output, the router and
    every expert matrix; `post_attention_norm`; sliding-window attention on alternate layers (`sliding_window`,
    pattern 2 = even layers SWA); routed experts only. The experts are MXFP4 as in OpenAI's release (gguf-py
    writes it; llama.cpp and ik both have MXFP4 CPU kernels). Harmony's control tokens are `<|...|>` specials;
    llama.cpp renders <|channel|>, <|message|>, <|start|>, <|constrain|> even when special tokens are hidden and
    drops <|end|> from the end-of-generation set when <|return|> and <|call|> exist (src/llama-vocab.cpp)."""
    arch, E, H, KV, D, FE = "gpt-oss", 256, 4, 2, 64, 256
    w, tmp = _open(path, arch, "hybridinfer tiny gpt-oss-architecture demo (random weights)", LlamaFileType.MOSTLY_MXFP4_MOE)
    _common(w, arch, blocks=4, n_embd=E, n_ff=FE, n_head=H, n_head_kv=KV, head=D, rope=D, rope_base=150000.0,
            n_ff_exp=FE)
    w.add_uint32(f"{arch}.attention.sliding_window", 128)
    n_vocab = _tokenizer(w, arch, HARMONY_SPECIALS, "gpt-4o", "<|startoftext|>", "<|return|>", HARMONY_TEMPLATE,
                         pad="<|endoftext|>")
    t = _Tensors(w, seed)
    t.mat("token_embd.weight", n_vocab, E, scale=0.5)
    for i in range(4):
        p = f"blk.{i}."
        t.vec(p + "attn_norm.weight", E, value=1.0)
        t.qkv(p, H * D, KV * D, E, bias=True)
        t.mat(p + "attn_output.weight", E, H * D)
        t.vec(p + "attn_output.bias", E)
        t.vec(p + "attn_sinks.weight", H)
        t.vec(p + "post_attention_norm.weight", E, value=1.0)
        t.mat(p + "ffn_gate_inp.weight", 8, E, q=Q.F32)
        t.vec(p + "ffn_gate_inp.bias", 8)
        t.mat(p + "ffn_gate_exps.weight", 8, FE, E, q=Q.MXFP4)
        t.mat(p + "ffn_up_exps.weight", 8, FE, E, q=Q.MXFP4)
        t.mat(p + "ffn_down_exps.weight", 8, E, FE, q=Q.MXFP4)
        t.vec(p + "ffn_gate_exps.bias", 8, FE)
        t.vec(p + "ffn_up_exps.bias", 8, FE)
        t.vec(p + "ffn_down_exps.bias", 8, E)
    t.vec("output_norm.weight", E, value=1.0)
    t.mat("output.weight", n_vocab, E, scale=0.5)
    _close(w, tmp, path)


# --- qwen3next (Qwen3-Next-80B-A3B) -------------------------------------------------------------------------------

def write_qwen3next(path: str, seed: int = 0) -> None:
    """Hybrid linear attention. llama.cpp 0.3.36 src/models/qwen3next.cpp: three of every four layers are gated
    delta-net (recurrent) layers — `attn_qkv` + `attn_gate` (or the older fused `ssm_in`), `ssm_conv1d`,
    `ssm_dt.bias`, `ssm_a`, `ssm_ba`, `ssm_norm`, `ssm_out` — sized by ssm.{conv_kernel, state_size (head dim),
    group_count (k heads), time_step_rank (v heads), inner_size}; every fourth (full_attention_interval) is gated
    attention whose attn_q carries query and gate (2 x heads x head dim) with q/k norms. Every layer has routed
    experts plus a sigmoid-gated shared expert (`ffn_gate_inp_shexp`). ik 0.1.5 (src/llama-load-tensors.cpp
    create_qwen3next_tensors) sizes the value head as inner_size / time_step_rank, mainline as state_size: they
    agree when inner_size = state_size x time_step_rank, as in the real model (128 x 32 = 4096)."""
    arch, E, H, KV, D = "qwen3next", 256, 4, 2, 128
    d_state, n_group, dt_rank, d_conv = 128, 1, 2, 4
    d_inner = d_state * dt_rank
    key_dim, value_dim = d_state * n_group, d_state * dt_rank
    w, tmp = _open(path, arch, "hybridinfer tiny Qwen3-Next-architecture demo (random weights)")
    _common(w, arch, blocks=4, n_embd=E, n_ff=512, n_head=H, n_head_kv=KV, head=D, rope=64)
    w.add_uint32(f"{arch}.expert_shared_feed_forward_length", 128)
    w.add_uint32(f"{arch}.ssm.conv_kernel", d_conv)
    w.add_uint32(f"{arch}.ssm.inner_size", d_inner)
    w.add_uint32(f"{arch}.ssm.state_size", d_state)
    w.add_uint32(f"{arch}.ssm.time_step_rank", dt_rank)
    w.add_uint32(f"{arch}.ssm.group_count", n_group)
    w.add_uint32(f"{arch}.full_attention_interval", 4)
    n_vocab = _tokenizer(w, arch, _QWEN_SPECIALS, "qwen2", None, "<|im_end|>", QWEN3_THINKING_TEMPLATE,
                         pad="<|endoftext|>")
    t = _Tensors(w, seed)
    t.mat("token_embd.weight", n_vocab, E, scale=0.5)
    for i in range(4):
        p = f"blk.{i}."
        t.vec(p + "attn_norm.weight", E, value=1.0)
        t.vec(p + "post_attention_norm.weight", E, value=1.0)
        if (i + 1) % 4 == 0:  # full (gated) attention
            t.qkv(p, 2 * H * D, KV * D, E)
            t.mat(p + "attn_output.weight", E, H * D)
            t.vec(p + "attn_q_norm.weight", D, value=1.0)
            t.vec(p + "attn_k_norm.weight", D, value=1.0)
        else:  # gated delta net
            t.mat(p + "attn_qkv.weight", 2 * key_dim + value_dim, E)
            t.mat(p + "attn_gate.weight", value_dim, E)
            t.mat(p + "ssm_conv1d.weight", 2 * key_dim + value_dim, d_conv, q=Q.F32)
            t.vec(p + "ssm_dt.bias", dt_rank)
            t.vec(p + "ssm_a", dt_rank, value=-1.0)
            t.mat(p + "ssm_ba.weight", 2 * dt_rank, E)
            t.vec(p + "ssm_norm.weight", d_state, value=1.0)
            t.mat(p + "ssm_out.weight", E, value_dim)
        _experts(t, p, E)
        t.vec(p + "ffn_gate_inp_shexp.weight", E)
        t.mat(p + "ffn_gate_shexp.weight", 128, E)
        t.mat(p + "ffn_up_shexp.weight", 128, E)
        t.mat(p + "ffn_down_shexp.weight", E, 128)
    t.vec("output_norm.weight", E, value=1.0)
    t.mat("output.weight", n_vocab, E, scale=0.5)
    _close(w, tmp, path)


# --- deepseek2 (DeepSeek-V3 / R1 / V3.1, Kimi K2): the project's own demo model ------------------------------------

def write_deepseek2(path: str, seed: int = 0) -> None:
    tiny.write_tiny(path, seed=seed)


# --- deepseek32 (DeepSeek-V3.2-Exp: DeepSeek Sparse Attention) ------------------------------------------------------

class _Renamed:
    """A GGUFWriter whose `deepseek2.*` keys are written as another architecture's (tiny.py writes its own arch's)."""

    def __init__(self, w: GGUFWriter, old: str, new: str):
        self._w, self._old, self._new = w, old + ".", new + "."

    def __getattr__(self, attr):
        f = getattr(self._w, attr)
        if attr in ("add_uint32", "add_float32", "add_bool"):
            return lambda key, val: f(self._new + key[len(self._old):] if key.startswith(self._old) else key, val)
        return f


def write_deepseek32(path: str, seed: int = 0) -> None:
    """The demo model's MLA + MoE blocks (tiny.py) plus V3.2's lightning indexer per block. llama.cpp 0.3.36
    src/models/deepseek32.cpp: MLA required; attention.indexer.{head_count, key_length, top_k} required;
    `indexer.k_norm` (weight + bias, key length), `indexer.proj` (n_embd -> indexer heads), `indexer.attn_k`
    (n_embd -> key length), `indexer.attn_q_b` (q_lora -> heads x key length). ik_llama.cpp 0.1.5 does not know
    the architecture."""
    arch = "deepseek32"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = path + ".tmp"
    w = GGUFWriter(tmp, arch)
    w.add_name("hybridinfer tiny DeepSeek-V3.2-architecture demo (random weights)")
    w.add_file_type(LlamaFileType.MOSTLY_Q8_0)
    s = tiny._Shape(mla=True, blocks=4, n_embd=256, n_expert=8, n_ff_exp=128, kv_lora=512, rope=64)
    rw = _Renamed(w, tiny.ARCH, arch)
    tiny._add_hparams(rw, s)
    n_idx_head, idx_dim = 4, 128
    w.add_uint32(f"{arch}.attention.indexer.head_count", n_idx_head)
    w.add_uint32(f"{arch}.attention.indexer.key_length", idx_dim)
    w.add_uint32(f"{arch}.attention.indexer.top_k", 64)
    tokens, merges = tiny._bpe(120)
    specials = [tiny.BOS, tiny.EOS, tiny.USER, tiny.ASSISTANT, tiny.THINK, tiny.END_THINK]
    vocab = tokens + specials
    tiny._add_tokenizer(rw, vocab, [1] * len(tokens) + [3, 3, 4, 4, 4, 4], merges, "deepseek-v3")
    rng = np.random.default_rng(seed)
    tiny._add_tensors(w, s, len(vocab), rng, Q.Q8_0)
    t = _Tensors(w, seed + 1)
    for i in range(s.blocks):
        p = f"blk.{i}.indexer."
        t.vec(p + "k_norm.weight", idx_dim, value=1.0)
        t.vec(p + "k_norm.bias", idx_dim, value=0.0)
        t.mat(p + "proj.weight", n_idx_head, s.n_embd, q=Q.F32)
        t.mat(p + "attn_k.weight", idx_dim, s.n_embd)
        t.mat(p + "attn_q_b.weight", n_idx_head * idx_dim, s.q_lora)
    _close(w, tmp, path)


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("deepseek2", "deepseek2", "DeepSeek-V3/R1 (MLA, shared expert; R1's <think> template) — the demo model",
           "think", True, write_deepseek2),
    Family("qwen3moe", "qwen3moe", "Qwen3-30B-A3B / 235B-A22B (GQA + q/k norm, routed experts only, <think>)",
           "think", True, write_qwen3moe),
    Family("glm4moe", "glm4moe", "GLM-4.5 / 4.6 (q/k/v biases, sigmoid router, shared expert, NextN layer, <think>)",
           "think", True, write_glm4moe),
    Family("gpt-oss", "gpt-oss", "gpt-oss-20b/120b (attention sinks, biases, alternate sliding window, MXFP4 "
           "experts, harmony channels)", "harmony", True, write_gpt_oss),
    Family("qwen3next", "qwen3next", "Qwen3-Next-80B-A3B (gated delta-net linear attention 3:1, shared expert; "
           "Thinking template opens <think>)", "think", True, write_qwen3next),
    Family("deepseek32", "deepseek32", "DeepSeek-V3.2-Exp (MLA + lightning-indexer sparse attention; not in every "
           "engine's tree)", "think", False, write_deepseek32),
]}


def family_path(name: str) -> Path:
    fam = FAMILIES[name]
    if name == "deepseek2":
        return Path(tiny.default_model())
    return cache_dir() / "models" / f"tiny-{fam.name}-v{VERSION}.gguf"


def ensure_family(name: str, force: bool = False) -> str:
    """Path of the family's tiny model in the cache, written on first use (deterministic, ~1 s)."""
    if name not in FAMILIES:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    path = family_path(name)
    if force or not path.exists():
        FAMILIES[name].write(str(path), 0)
    return str(path)
