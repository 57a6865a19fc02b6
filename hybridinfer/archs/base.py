"""What a model family declares: its GGUF architectures, the placement class of each tensor name, its KV cache
(per token, and what is not per token), and its reasoning format. `Family` itself is the generic family — the
classes and GQA cache every llama.cpp-style transformer shares (llama, mixtral-as-llama, qwen2moe, dense models) —
and each family module under `archs/` subclasses it with what its architecture adds.

Facts cited as "llama.cpp 0.3.36" come from the tree vendored in PyPI's llama-cpp-python 0.3.36
(`vendor/llama.cpp/`), the one install.sh builds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

KV_TYPES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}  # bytes per cached value
STATE_BYTES = 4  # recurrent state is kept in f32 whatever the KV type (llama-model.cpp create_memory: GGML_TYPE_F32)
UBATCH = 512  # llama.cpp's default n_ubatch, which a sliding-window cache holds beyond its window

_BLK = re.compile(r"^blk\.(\d+)\.")
# The classes every family shares, first match wins (after the name prefixes in `Family.tensor_class`).
COMMON_RULES: tuple[tuple[str, re.Pattern], ...] = (
    ("routed_experts", re.compile(r"\.ffn_(gate|up|down|gate_up)_(ch)?exps\.")),
    ("shared_experts", re.compile(r"\.ffn_(gate|up|down|gate_inp)_shexp\.")),
    ("router", re.compile(r"\.(ffn_gate_inp|exp_probs_b)\.")),
    ("norms", re.compile(r"_norm\.|\.norm\.")),
    ("attention", re.compile(r"\.attn_")),
    ("dense_ffn", re.compile(r"\.ffn_(gate|up|down)\.")),
)
NEXTN = re.compile(r"\.nextn\.")  # blk.N.nextn.{eh_proj,enorm,hnorm,embed_tokens,shared_head_*} (llama-arch.cpp)


def block_of(name: str) -> int | None:
    m = _BLK.match(name)
    return int(m.group(1)) if m else None


def hparam(md: dict, arch: str, key: str, default=0):
    """`{arch}.{key}` from GGUF metadata; a per-layer array reads as its largest entry."""
    v = md.get(f"{arch}.{key}", default)
    return v if not isinstance(v, list) else (max(v) if v else default)


def nextn_layers(md: dict, arch: str) -> int:
    """MTP/next-n blocks appended after the trunk (`%s.nextn_predict_layers`; llama.cpp 0.3.36 llama-model.cpp
    load_hparams: n_layer() = block_count - nextn_predict_layers). llama.cpp skips loading them unless MTP
    speculation asks for them (models/glm4-moe.cpp: `mtp_flags |= TENSOR_SKIP` when !load_mtp)."""
    return int(hparam(md, arch, "nextn_predict_layers"))


def _per_type(values: int) -> dict[str, int]:
    return {t: int(round(values * b)) for t, b in KV_TYPES.items()}


def _pad(n: int, to: int = 256) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class KvCache:
    """A model's attention cache. `bytes_per_token` is what grows with the context (every layer's cache in a plain
    transformer); a sliding-window or recurrent family adds what does not, and `bytes_at` sums both."""
    form: str  # "mla" | "legacy-mha" (DeepSeek without MLA) | "gqa"
    values_per_token_per_layer: int
    layers: int  # layers whose cache grows with the context
    bytes_per_token: dict[str, int]  # cache type -> bytes per token over those layers
    # Sliding-window layers: each caches at most its window per slot plus one ubatch (llama.cpp 0.3.36
    # llama-kv-cache-iswa.cpp: size_swa = GGML_PAD(min(size_base, n_swa*n_seq_max + n_ubatch), 256)).
    swa_layers: int = 0
    swa_window: int = 0
    swa_bytes_per_token: dict[str, int] = field(default_factory=dict)
    # Recurrent (linear-attention) layers: a fixed state per slot, f32 (llama-memory-recurrent.cpp: one row of
    # n_embd_r + n_embd_s per sequence per layer).
    state_layers: int = 0
    state_bytes_per_slot: int = 0
    # A sparse-attention indexer's cached keys per token per layer (DeepSeek-V3.2), included in bytes_per_token.
    indexer_values_per_token_per_layer: int = 0

    @property
    def cache_layers(self) -> int:
        """Layers holding any cache or state."""
        return self.layers + self.swa_layers + self.state_layers

    def bytes_at(self, ctx: int, kv_type: str, slots: int = 1, per_token: int | None = None,
                 ubatch: int = 0) -> int:
        """Bytes of the whole cache at `ctx` tokens (the total over `slots` slots). `per_token`: an engine's own
        figure for the growing part (its form of the cache), else this model's."""
        tok = self.bytes_per_token[kv_type] if per_token is None else per_token
        total = tok * ctx
        if self.swa_layers:
            cells = _pad(min(ctx, self.swa_window * max(1, slots) + (ubatch or UBATCH)))
            total += self.swa_bytes_per_token[kv_type] * cells
        return total + self.state_bytes_per_slot * max(1, slots)


class Family:
    """The generic family, and the base of every other: what the rest of hybridinfer asks of a model family."""

    name: str = "generic"
    archs: tuple[str, ...] = ()  # GGUF general.architecture values it covers
    # "think" (<think>...</think>) | "harmony" (gpt-oss channels) | "none". The generic family splits <think>: an
    # R1 distill (llama, qwen2 archs) thinks in it, and for a model that never writes it the split is a no-op.
    reasoning: str = "think"
    mla: bool = False  # DeepSeek's multi-head latent attention: engines with MLA kernels cache the latent
    # The family's own (class, regex) rules, tried before COMMON_RULES.
    rules: tuple[tuple[str, re.Pattern], ...] = ()

    def tensor_class(self, name: str, md: dict | None = None) -> str:
        """The placement class of a tensor (inspect_gguf.GROUPS). With the GGUF metadata, every tensor of an MTP
        block is `nextn`; without, only the nextn.* ones are."""
        if name.startswith("token_embd."):
            return "token_embd"
        if name.startswith("output."):
            return "output"
        if name.startswith("output_norm."):
            return "norms"
        if md is not None and self._in_nextn_block(name, md):
            return "nextn"
        for cls, rx in self.rules + COMMON_RULES:
            if rx.search(name):
                return cls
        return "other"

    def _in_nextn_block(self, name: str, md: dict) -> bool:
        arch = str(md.get("general.architecture", ""))
        n = nextn_layers(md, arch)
        b = block_of(name)
        return bool(n) and b is not None and b >= int(hparam(md, arch, "block_count")) - n

    def trunk_layers(self, md: dict, arch: str) -> int:
        return int(hparam(md, arch, "block_count")) - nextn_layers(md, arch)

    def kv_cache(self, md: dict, arch: str) -> KvCache:
        """Grouped-query attention on every layer: n_head_kv x (key + value) values per token per layer."""
        vals = self.gqa_values(md, arch)
        n_layer = int(hparam(md, arch, "block_count"))
        return KvCache(form="gqa", values_per_token_per_layer=vals, layers=n_layer,
                       bytes_per_token=_per_type(vals * n_layer))

    @staticmethod
    def gqa_values(md: dict, arch: str) -> int:
        n_head = int(hparam(md, arch, "attention.head_count"))
        n_embd = int(hparam(md, arch, "embedding_length"))
        n_head_kv = int(hparam(md, arch, "attention.head_count_kv", n_head)) or n_head
        head_dim = n_embd // n_head if n_head else 0
        return n_head_kv * (int(hparam(md, arch, "attention.key_length", head_dim))
                            + int(hparam(md, arch, "attention.value_length", head_dim)))

    def opens_think(self, template) -> bool:
        """The chat template opens <think> in the generation prompt (R1): output starts inside a thought."""
        if not isinstance(template, str):
            return False
        return "<｜Assistant｜><think>" in template or bool(
            re.search(r"add_generation_prompt.{0,200}?<think>(?!\s*</think>)", template, re.S))

    def __repr__(self) -> str:
        return f"<family {self.name}: {', '.join(self.archs) or 'any other architecture'}>"


GENERIC = Family()
