"""Calibration models: small deepseek2 (MLA + MoE) files whose routed experts are all of one weight type, plus a
base model with tiny experts and a dense-FFN model — what `hybridinfer calibrate` runs the engines' benchmarks on.

Each per-type model holds ~320 MiB of experts (more than any CPU cache, so decode reads them from RAM as a large
model does) in 2-6 blocks, 8 of 32 experts used per token; attention, shared expert, embeddings and output are
Q8_0 and small. The base model has
the same blocks and tiny experts, so its time is mostly per-block work (attention, routing, thread syncs); the dense
model's is mostly dense-FFN matrix products, which engines run with other kernels than the experts' indexed ones.
MLA dimensions are DeepSeek's own (kv_lora 512, rope 64, 4 heads), which ik_llama.cpp requires. Random weights,
written as bytes like the mid model (demo/mid.py), in seconds.
"""

from __future__ import annotations

from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from ..util import cache_dir
from . import mid

VERSION = 2
TARGET_EXPERT_BYTES = 320 * 2**20
MAX_BLOCKS = 6
BASE_BLOCKS = 6
SHAPE = mid.Shape(blocks=1, n_dense=0, n_embd=2048, n_head=4, kv_lora=512, rope=64, nope=128, v_dim=128,
                  n_expert=32, n_used=8, n_shared=1, ff_exp=1536, ff_dense=1536, vocab=2048, ctx=4096,
                  q_lora=512)  # R1's q LoRA form: llama.cpp reads attn_q only for a 27-block (V2-Lite) model
BASE_FF = 32
DENSE_FF = 15360  # the dense model: 3 dense-FFN blocks of ~100 MiB of Q8_0 each, then one MoE block


def _mix(qtype: Q) -> dict:
    return dict(experts=qtype, experts_down_hi=qtype, hi_down_frac=0.0, embd=Q.Q8_0, attn=Q.Q8_0, attn_hi=Q.Q8_0,
                ffn=Q.Q8_0, ffn_down=Q.Q8_0, out=Q.Q8_0, mla=Q.Q8_0)


def blocks_for(type_name: str) -> int:
    bs, ts = GGML_QUANT_SIZES[Q[type_name]]
    per_block = 3 * SHAPE.n_embd * SHAPE.ff_exp * SHAPE.n_expert // bs * ts
    # At least 2: a prompt reaches the last block's FFN only for the tokens that need logits (llama.cpp's
    # inp_out_ids), so a 1-block model would not measure its experts' prefill at all.
    return max(2, min(MAX_BLOCKS, round(TARGET_EXPERT_BYTES / per_block)))


def path_for(type_name: str) -> Path:
    return cache_dir() / "calibration" / "models" / f"calib-v{VERSION}-{type_name.lower()}.gguf"


def ensure(type_name: str) -> str:
    """The calibration model for one weight type ("base" for the base model), written on first use."""
    p = path_for(type_name)
    if not p.exists():
        if type_name == "base":
            shape = mid.Shape(**{**SHAPE.__dict__, "blocks": BASE_BLOCKS, "ff_exp": BASE_FF})
            mix = _mix(Q.Q8_0)
        elif type_name == "heads":  # the base model with 4x the attention heads
            shape = mid.Shape(**{**SHAPE.__dict__, "blocks": BASE_BLOCKS, "ff_exp": BASE_FF, "n_head": 4 * SHAPE.n_head})
            mix = _mix(Q.Q8_0)
        elif type_name == "dense":
            shape = mid.Shape(**{**SHAPE.__dict__, "blocks": 4, "n_dense": 3, "ff_dense": DENSE_FF, "ff_exp": BASE_FF})
            mix = _mix(Q.Q8_0)
        else:
            shape = mid.Shape(**{**SHAPE.__dict__, "blocks": blocks_for(type_name)})
            mix = _mix(Q[type_name])
        mid.write_mid(p, mix, shape=shape, name=f"hybridinfer calibration model, {type_name} experts (random weights)")
    return str(p)
