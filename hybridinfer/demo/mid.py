"""A GB-scale benchmark model: DeepSeek-V2-Lite's shape in the deepseek2 (MLA + MoE) architecture, with the
type mix of Unsloth's DeepSeek-R1 UD-IQ1_S (or a Q4_K_M-style mix), random weights.

It exists to measure what the tiny demo model cannot: decode bound by expert bandwidth and quantized-kernel
compute. Quantized blocks are written directly as bytes — random payload with small, finite scale fields — so
there is no float generation or quantization pass (numpy quantizing a few GB takes ~10 minutes on a small box;
this writes ~4 GB in seconds). Never committed; `ensure_mid()` writes it into the cache on demand.

Shape: 27 blocks (1 leading dense), hidden 2048, 16 heads, no q LoRA (llama.cpp treats a 27-block deepseek2 as
V2-Lite and reads `attn_q`), kv_lora 512, rope 64 / nope 128 / v 128, 64 routed experts with 6 used, 2 shared
experts, vocabulary 102400. One deliberate difference: the FFN widths are rounded up to ggml's 256-value
super-block (expert 1408 -> 1536, dense 10944 -> 11008). K- and IQ-quants need rows that are a multiple of 256;
with V2-Lite's true widths llama-quantize falls back to IQ4_NL/Q5_0/Q8_0 for every down projection
(llama.cpp src/llama-quant.cpp, `convert_incompatible_tensor`), which would leave no IQ1_S/IQ2_XXS down_proj
and so not be the R1 type mix this model is for.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, ExpertGatingFuncType, GGMLQuantizationType as Q

from ..errors import HybridError
from ..util import cache_dir
from . import tiny

VERSION = 1  # bump when the recipe changes, so cached copies are regenerated
ARCH = "deepseek2"
VARIANTS = ("iq1_s", "q4_k_m")
ALIGN = 32


@dataclass(frozen=True)
class Shape:
    blocks: int = 27
    n_dense: int = 1
    n_embd: int = 2048
    n_head: int = 16
    kv_lora: int = 512
    rope: int = 64
    nope: int = 128
    v_dim: int = 128
    n_expert: int = 64
    n_used: int = 6
    n_shared: int = 2
    ff_exp: int = 1536
    ff_dense: int = 11008
    vocab: int = 102400
    ctx: int = 32768
    q_lora: int = 0  # 0: attn_q as V2-Lite (llama.cpp reads it only at 27 blocks); else R1's attn_q_a/_b LoRA form


# Type mixes, by tensor role. UD-IQ1_S: routed gate/up IQ1_S, routed down IQ1_S except the first ~10 % of MoE
# blocks at IQ2_XXS (R1: 6 of 58), attention and shared/dense FFN at Q4_K with the sensitive ones at Q6_K,
# MLA k_b/v_b at Q8_0. Q4_K_M: the same with routed experts at Q4_K and half the routed down_proj at Q6_K.
MIXES = {
    "iq1_s": dict(experts=Q.IQ1_S, experts_down_hi=Q.IQ2_XXS, hi_down_frac=0.1, embd=Q.Q4_K, attn=Q.Q4_K,
                  attn_hi=Q.Q6_K, ffn=Q.Q4_K, ffn_down=Q.Q6_K, out=Q.Q6_K, mla=Q.Q8_0),
    "q4_k_m": dict(experts=Q.Q4_K, experts_down_hi=Q.Q6_K, hi_down_frac=0.5, embd=Q.Q4_K, attn=Q.Q4_K,
                   attn_hi=Q.Q6_K, ffn=Q.Q4_K, ffn_down=Q.Q6_K, out=Q.Q6_K, mla=Q.Q8_0),
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # ggml order (fastest dimension first)
    qtype: Q

    @property
    def nbytes(self) -> int:
        bs, ts = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // bs * ts


def tensors(variant: str | dict = "iq1_s", s: Shape = Shape()) -> list[TensorSpec]:
    """Every tensor of the model, in file order (`variant`: a name in MIXES, or a mix of the same form)."""
    m = MIXES[variant] if isinstance(variant, str) else variant
    n_moe = s.blocks - s.n_dense
    hi_down = max(1, round(n_moe * m["hi_down_frac"]))
    ff_sh = s.ff_exp * s.n_shared
    out = [TensorSpec("token_embd.weight", (s.n_embd, s.vocab), m["embd"])]
    for i in range(s.blocks):
        p = f"blk.{i}."
        out += [
            TensorSpec(p + "attn_norm.weight", (s.n_embd,), Q.F32),
            TensorSpec(p + "attn_kv_a_norm.weight", (s.kv_lora,), Q.F32),
            *([TensorSpec(p + "attn_q_a_norm.weight", (s.q_lora,), Q.F32),
               TensorSpec(p + "attn_q_a.weight", (s.n_embd, s.q_lora), m["attn"]),
               TensorSpec(p + "attn_q_b.weight", (s.q_lora, s.n_head * (s.nope + s.rope)), m["attn"])] if s.q_lora else
              [TensorSpec(p + "attn_q.weight", (s.n_embd, s.n_head * (s.nope + s.rope)), m["attn"])]),
            TensorSpec(p + "attn_kv_a_mqa.weight", (s.n_embd, s.kv_lora + s.rope), m["attn_hi"]),
            TensorSpec(p + "attn_k_b.weight", (s.nope, s.kv_lora, s.n_head), m["mla"]),
            TensorSpec(p + "attn_v_b.weight", (s.kv_lora, s.v_dim, s.n_head), m["mla"]),
            TensorSpec(p + "attn_output.weight", (s.n_head * s.v_dim, s.n_embd), m["attn"]),
            TensorSpec(p + "ffn_norm.weight", (s.n_embd,), Q.F32),
        ]
        if i < s.n_dense:
            out += [TensorSpec(p + "ffn_gate.weight", (s.n_embd, s.ff_dense), m["ffn"]),
                    TensorSpec(p + "ffn_up.weight", (s.n_embd, s.ff_dense), m["ffn"]),
                    TensorSpec(p + "ffn_down.weight", (s.ff_dense, s.n_embd), m["ffn_down"])]
        else:
            down = m["experts_down_hi"] if i - s.n_dense < hi_down else m["experts"]
            out += [TensorSpec(p + "ffn_gate_inp.weight", (s.n_embd, s.n_expert), Q.F32),
                    TensorSpec(p + "exp_probs_b.bias", (s.n_expert,), Q.F32),
                    TensorSpec(p + "ffn_gate_exps.weight", (s.n_embd, s.ff_exp, s.n_expert), m["experts"]),
                    TensorSpec(p + "ffn_up_exps.weight", (s.n_embd, s.ff_exp, s.n_expert), m["experts"]),
                    TensorSpec(p + "ffn_down_exps.weight", (s.ff_exp, s.n_embd, s.n_expert), down),
                    TensorSpec(p + "ffn_gate_shexp.weight", (s.n_embd, ff_sh), m["ffn"]),
                    TensorSpec(p + "ffn_up_shexp.weight", (s.n_embd, ff_sh), m["ffn"]),
                    TensorSpec(p + "ffn_down_shexp.weight", (ff_sh, s.n_embd), m["ffn_down"])]
    out += [TensorSpec("output_norm.weight", (s.n_embd,), Q.F32),
            TensorSpec("output.weight", (s.n_embd, s.vocab), m["out"])]
    return out


def total_bytes(variant: str = "iq1_s", s: Shape = Shape()) -> int:
    return sum(t.nbytes for t in tensors(variant, s))


# --- random quantized blocks ----------------------------------------------------------------------------
# Byte offsets of each block type's fp16 scale(s) (ggml-common.h: block_q8_0, block_q4_K, block_q6_K,
# block_iq2_xxs, block_iq1_s) and the value chosen for it: weights come out with a spread of ~0.02-0.05, the
# magnitude a hidden size of 2048 keeps stable through 27 RMS-normed residual blocks. Every other bit pattern
# of these types decodes to a finite value, so the rest of the block can be random.
_FP16_FIELDS = {
    Q.Q8_0: [(0, 3e-4)],  # d * int8
    Q.Q4_K: [(0, 1.5e-4), (2, 1e-3)],  # d * 6-bit scale * 4-bit q - dmin * 6-bit min
    Q.Q6_K: [(208, 1e-4)],  # d * int8 scale * (6-bit q - 32); scales narrowed below
    Q.IQ2_XXS: [(0, 4e-4)],  # d * (0.5 + 4-bit) / 4 * grid (8..43) * sign
    Q.IQ1_S: [(0, 3e-3)],  # d * (2 * 3-bit + 1) * (grid in -1..1 +- 1/8)
    Q.Q4_0: [(0, 4e-3)],  # d * (4-bit q - 8)
    Q.Q2_K: [(80, 1e-3), (82, 1e-3)],  # d * 4-bit scale * 2-bit q - dmin * 4-bit min
    Q.MXFP4: [],  # an E8M0 byte, not fp16: set in _pool
}
_POOL_BLOCKS = 262_139  # a prime: the pool repeats out of step with every row and expert size


def _pool(qtype: Q, rng: np.random.Generator) -> bytes:
    """A few MB of random blocks of one type with its scale fields set; tensors are cut from it."""
    if qtype in (Q.F16, Q.BF16):  # plain floats: every value finite
        v = (rng.standard_normal(_POOL_BLOCKS, dtype=np.float32) * 0.03)
        return v.astype(np.float16).tobytes() if qtype == Q.F16 else (v.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    _, ts = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(_POOL_BLOCKS, ts), dtype=np.uint8)
    for off, base in _FP16_FIELDS[qtype]:
        d = (base * rng.uniform(0.5, 1.5, _POOL_BLOCKS)).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    if qtype == Q.MXFP4:  # E8M0 block scale 2^(e-127): e near 121 keeps the 4-bit values (up to 6) below ~0.1
        raw[:, 0] = rng.integers(119, 123, size=_POOL_BLOCKS, dtype=np.uint8)
    if qtype == Q.Q6_K:  # int8 sub-block scales in -32..31 rather than the full byte
        raw[:, 192:208] = rng.integers(-32, 32, size=(_POOL_BLOCKS, 16), dtype=np.int8).view(np.uint8)
    return raw.tobytes()


def _f32(t: TensorSpec, rng: np.random.Generator) -> bytes:
    if t.name.endswith("exp_probs_b.bias"):
        return np.zeros(t.shape, dtype=np.float32).tobytes()
    if t.name.endswith("ffn_gate_inp.weight"):  # router: random, so tokens spread over all experts
        return (rng.standard_normal(int(np.prod(t.shape)), dtype=np.float32) * 0.05).tobytes()
    return np.ones(t.shape, dtype=np.float32).tobytes()  # norms


def _vocab(n: int) -> tuple[list[str], list[int], list[str]]:
    """The tiny model's byte-level BPE and R1 special tokens, padded to n with plain tokens (` w123`) that no
    merge produces but that render as text, so sampled output is visible and countable."""
    tokens, merges = tiny._bpe(120)
    specials = [tiny.BOS, tiny.EOS, tiny.USER, tiny.ASSISTANT, tiny.THINK, tiny.END_THINK]
    pad = [f"Ġw{i}" for i in range(n - len(tokens) - len(specials))]
    vocab = tokens + pad + specials
    types = [1] * (len(tokens) + len(pad)) + [3, 3, 4, 4, 4, 4]
    return vocab, types, merges


def _header(path: str, name: str, s: Shape, specs: list[TensorSpec]) -> None:
    vocab, types, merges = _vocab(s.vocab)
    w = GGUFWriter(path, ARCH)
    w.add_name(name)
    u = lambda k, v: w.add_uint32(f"{ARCH}.{k}", v)  # noqa: E731
    u("context_length", s.ctx)
    u("embedding_length", s.n_embd)
    u("feed_forward_length", s.ff_dense)
    u("block_count", s.blocks)
    u("attention.head_count", s.n_head)
    u("attention.head_count_kv", 1)  # MLA form: one latent KV "head" of kv_lora + rope
    w.add_float32(f"{ARCH}.rope.freq_base", 10000.0)
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-6)
    u("rope.dimension_count", s.rope)
    u("leading_dense_block_count", s.n_dense)
    u("attention.kv_lora_rank", s.kv_lora)
    if s.q_lora:
        u("attention.q_lora_rank", s.q_lora)
    u("attention.key_length", s.kv_lora + s.rope)
    u("attention.value_length", s.kv_lora)
    u("attention.key_length_mla", s.nope + s.rope)
    u("attention.value_length_mla", s.v_dim)
    u("expert_feed_forward_length", s.ff_exp)
    u("expert_count", s.n_expert)
    u("expert_used_count", s.n_used)
    u("expert_shared_count", s.n_shared)
    w.add_float32(f"{ARCH}.expert_weights_scale", 2.5)
    w.add_bool(f"{ARCH}.expert_weights_norm", True)
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
    u("vocab_size", len(vocab))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("deepseek-v3")
    w.add_token_list(vocab)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab.index(tiny.BOS))
    w.add_eos_token_id(vocab.index(tiny.EOS))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(tiny.CHAT_TEMPLATE)
    for t in specs:
        w.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()


def write_mid(path: str | os.PathLike, variant: str | dict = "iq1_s", seed: int = 0, shape: Shape = Shape(),
              data: bool = True, name: str | None = None) -> str:
    """Write the model to `path` (atomically: a temporary file renamed into place). `data=False` writes the
    header and leaves the data region sparse (reads as zeros) — the full file layout without the GBs.
    `variant`: a name in VARIANTS, or a mix dict of MIXES' form (calibration models)."""
    if isinstance(variant, str) and variant not in VARIANTS:
        raise HybridError(f"unknown mid model variant '{variant}'", f"use one of {', '.join(VARIANTS)}")
    specs = tensors(variant, shape)
    name = name or f"hybridinfer mid DeepSeek-V2-Lite-shaped benchmark model, {variant} mix (random weights)"
    path = str(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    need = sum(-(-t.nbytes // ALIGN) * ALIGN for t in specs)
    free = shutil.disk_usage(Path(path).parent).free
    if data and free < need + (1 << 28):
        raise HybridError(f"not enough disk space for {Path(path).name}: it needs {need / 1e9:.1f} GB, "
                          f"{Path(path).parent} has {free / 1e9:.1f} GB free",
                          "free some space or point HYBRIDINFER_CACHE at a bigger disk")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        _header(tmp, name, shape, specs)
        rng = np.random.default_rng(seed)
        with open(tmp, "r+b") as f:
            f.seek(0, os.SEEK_END)
            start = -(-f.tell() // ALIGN) * ALIGN
            if not data:
                f.truncate(start + need)
            else:
                f.write(b"\0" * (start - f.tell()))
                pools: dict[Q, memoryview] = {}
                for t in specs:
                    if t.qtype == Q.F32:
                        f.write(_f32(t, rng))
                    else:
                        if t.qtype not in pools:
                            pools[t.qtype] = memoryview(_pool(t.qtype, rng))
                        _write_cut(f, pools[t.qtype], t.nbytes, GGML_QUANT_SIZES[t.qtype][1], rng)
                    f.write(b"\0" * (-t.nbytes % ALIGN))
        os.replace(tmp, path)  # never leave a half-written model where a loader would find it
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _write_cut(f, pool: memoryview, nbytes: int, block: int, rng: np.random.Generator) -> None:
    """nbytes of blocks from the pool, starting at a random block and wrapping around."""
    pos = int(rng.integers(0, len(pool) // block)) * block
    while nbytes:
        n = min(nbytes, len(pool) - pos)
        f.write(pool[pos:pos + n])
        nbytes -= n
        pos = 0


# Models of other shapes and types, for checking predictions beyond R1's two mixes
# (benchmarks/calibrated_vs_measured.py): few experts used per token, all Q4_0; and a dense-FFN-heavy one, all Q8_0.
def _all(q: Q) -> dict:
    return dict(experts=q, experts_down_hi=q, hi_down_frac=0.0, embd=q, attn=q, attn_hi=q, ffn=q, ffn_down=q, out=q,
                mla=Q.Q8_0)


OTHERS = {
    "q4_0_few": (_all(Q.Q4_0), Shape(n_expert=32, n_used=2, n_shared=1)),  # ~4.8 GB, 2 of 32 experts per token
    "q8_0_dense": (_all(Q.Q8_0), Shape(n_dense=13, n_expert=16, n_used=4, n_shared=1)),  # ~4.2 GB, 13 dense blocks
}


def ensure_other(name: str, force: bool = False) -> str:
    """Path of one of OTHERS, writing it on first use."""
    if name not in OTHERS:
        raise HybridError(f"unknown benchmark model '{name}'", f"use one of {', '.join(OTHERS)}")
    mix, shape = OTHERS[name]
    path = cache_dir() / "models" / f"other-deepseek2-v{VERSION}-{name}.gguf"
    if force or not path.exists():
        write_mid(path, mix, shape=shape, name=f"hybridinfer {name} deepseek2 benchmark model (random weights)")
    return str(path)


def mid_path(variant: str = "iq1_s") -> Path:
    return cache_dir() / "models" / f"mid-deepseek2-v{VERSION}-{variant}.gguf"


def ensure_mid(variant: str = "iq1_s", force: bool = False) -> str:
    """Path of the mid model, writing it on first use."""
    path = mid_path(variant)
    if force or not path.exists():
        write_mid(path, variant)
    return str(path)
