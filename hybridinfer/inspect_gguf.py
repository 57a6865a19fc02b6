"""Stage 2 — inspect: a GGUF header -> `ModelInfo`, the facts the planner needs.

Bytes are grouped by what the planner places (embedding, head, attention, dense FFN, shared experts, router,
routed experts, norms), and the KV cache's bytes per token are computed from the metadata, MLA-aware.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .ggufio import read_header
from .util import from_dict, to_dict

GROUPS = ("token_embd", "output", "attention", "norms", "dense_ffn", "shared_experts", "router", "routed_experts", "other")
KV_TYPES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}  # bytes per cached value

_BLK = re.compile(r"^blk\.(\d+)\.")
_CLASSES = [  # first match wins
    ("routed_experts", re.compile(r"\.ffn_(gate|up|down|gate_up)_(ch)?exps\.")),
    ("shared_experts", re.compile(r"\.ffn_(gate|up|down|gate_inp)_shexp\.")),
    ("router", re.compile(r"\.(ffn_gate_inp|exp_probs_b)\.")),
    ("norms", re.compile(r"_norm\.|\.norm\.")),
    ("attention", re.compile(r"\.attn_")),
    ("dense_ffn", re.compile(r"\.ffn_(gate|up|down)\.")),
]


def tensor_class(name: str) -> str:
    if name.startswith("token_embd."):
        return "token_embd"
    if name.startswith("output."):
        return "output"
    if name.startswith("output_norm."):
        return "norms"
    for cls, rx in _CLASSES:
        if rx.search(name):
            return cls
    return "other"


def tensor_block(name: str) -> int | None:
    m = _BLK.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: list[int]
    type: str
    nbytes: int
    n_elements: int
    cls: str
    block: int | None


@dataclass(frozen=True)
class Group:
    bytes: int
    params: int
    tensors: int
    types: dict[str, int]  # quant type -> bytes


@dataclass(frozen=True)
class KvCache:
    form: str  # "mla" | "legacy-mha" (DeepSeek without MLA) | "gqa"
    values_per_token_per_layer: int
    layers: int
    bytes_per_token: dict[str, int]  # cache type -> bytes per token (all layers)


@dataclass(frozen=True)
class ModelInfo:
    paths: list[str]
    name: str
    arch: str
    block_count: int
    context_length: int
    embedding_length: int
    vocab_size: int
    expert_count: int
    expert_used_count: int
    expert_shared_count: int
    leading_dense_block_count: int
    expert_ffn_length: int
    head_count: int
    params: int
    bytes: int
    file_bytes: int
    quant_types: dict[str, int]  # type -> tensor count
    groups: dict[str, Group]
    kv: KvCache
    has_chat_template: bool
    opens_think: bool  # the chat template opens <think> in the generation prompt (R1): output starts in a thought
    tensors: list[Tensor] = field(default_factory=list)
    # Attention head dimensions as the GGUF states them (an engine may accept only some shapes, e.g. ik_llama.cpp's
    # MLA check); key/value length are per head, rope_dim the rotary part.
    head_count_kv: int = 0
    key_length: int = 0
    value_length: int = 0
    rope_dim: int = 0
    kv_lora_rank: int = 0  # MLA's compressed latent width (DeepSeek), 0 elsewhere

    @property
    def is_moe(self) -> bool:
        return self.expert_count > 0 and self.groups.get("routed_experts", _EMPTY).bytes > 0

    @property
    def bpw(self) -> float:
        return 8 * self.bytes / self.params if self.params else 0.0

    @property
    def moe_blocks(self) -> list[int]:
        return sorted({t.block for t in self.tensors if t.cls == "routed_experts"})

    def to_dict(self, tensors: bool = False) -> dict:
        d = to_dict(self)
        d["bpw"] = round(self.bpw, 3)
        if not tensors:
            d.pop("tensors")
        return d

    def to_json(self) -> str:
        return json.dumps(to_dict(self))

    @classmethod
    def from_json(cls, text: str) -> "ModelInfo":
        return from_dict(cls, json.loads(text))


_EMPTY = Group(bytes=0, params=0, tensors=0, types={})


def _kv_cache(md: dict, arch: str, n_layer: int, n_embd: int, n_head: int) -> KvCache:
    def g(key, default=0):
        v = md.get(f"{arch}.{key}", default)
        return v if not isinstance(v, list) else (max(v) if v else default)

    if arch == "deepseek2":
        kv_lora = int(g("attention.kv_lora_rank"))
        rope = int(g("rope.dimension_count"))
        if f"{arch}.attention.key_length_mla" in md:
            # MLA form: one compressed latent + the rope key per token per layer.
            vals, form = kv_lora + rope, "mla"
        else:
            # Legacy form (attn_kv_b): llama.cpp caches full per-head K (nope+rope) and V.
            vals, form = n_head * (int(g("attention.key_length")) + int(g("attention.value_length"))), "legacy-mha"
    else:
        n_head_kv = int(g("attention.head_count_kv", n_head)) or n_head
        head_dim = n_embd // n_head if n_head else 0
        k = int(g("attention.key_length", head_dim))
        v = int(g("attention.value_length", head_dim))
        vals, form = n_head_kv * (k + v), "gqa"
    return KvCache(form=form, values_per_token_per_layer=vals, layers=n_layer,
                   bytes_per_token={t: int(round(vals * n_layer * b)) for t, b in KV_TYPES.items()})


def _opens_think(template) -> bool:
    if not isinstance(template, str):
        return False
    return "<｜Assistant｜><think>" in template or bool(re.search(r"add_generation_prompt.{0,200}?<think>(?!\s*</think>)", template, re.S))


def inspect(path) -> ModelInfo:
    h = read_header(path)
    md = h.metadata
    arch = str(md.get("general.architecture", "unknown"))

    def g(key, default=0):
        v = md.get(f"{arch}.{key}", default)
        return v if not isinstance(v, list) else (max(v) if v else default)

    tensors = []
    groups: dict[str, dict] = {}
    qcount: dict[str, int] = {}
    for t in h.tensors:
        cls = tensor_class(t.name)
        tn = t.type_name
        tensors.append(Tensor(name=t.name, shape=list(t.shape), type=tn, nbytes=t.nbytes, n_elements=t.n_elements,
                              cls=cls, block=tensor_block(t.name)))
        gr = groups.setdefault(cls, {"bytes": 0, "params": 0, "tensors": 0, "types": {}})
        gr["bytes"] += t.nbytes
        gr["params"] += t.n_elements
        gr["tensors"] += 1
        gr["types"][tn] = gr["types"].get(tn, 0) + t.nbytes
        qcount[tn] = qcount.get(tn, 0) + 1
    group_objs = {c: Group(**groups[c]) for c in GROUPS if c in groups}

    n_layer = int(g("block_count"))
    n_embd = int(g("embedding_length"))
    n_head = int(g("attention.head_count"))
    vocab = md.get("tokenizer.ggml.tokens")
    vocab_size = vocab["array_len"] if isinstance(vocab, dict) else len(vocab or []) or int(g("vocab_size"))
    expert_count = int(g("expert_count"))
    return ModelInfo(
        paths=h.paths, name=str(md.get("general.name", "")), arch=arch, block_count=n_layer,
        context_length=int(g("context_length")), embedding_length=n_embd, vocab_size=vocab_size,
        expert_count=expert_count, expert_used_count=int(g("expert_used_count")),
        expert_shared_count=int(g("expert_shared_count")),
        leading_dense_block_count=int(g("leading_dense_block_count")),
        expert_ffn_length=int(g("expert_feed_forward_length")), head_count=n_head,
        params=sum(t.n_elements for t in tensors), bytes=sum(t.nbytes for t in tensors), file_bytes=h.file_bytes,
        quant_types=dict(sorted(qcount.items(), key=lambda kv: -kv[1])), groups=group_objs,
        kv=_kv_cache(md, arch, n_layer, n_embd, n_head),
        has_chat_template="tokenizer.chat_template" in md, opens_think=_opens_think(md.get("tokenizer.chat_template")),
        tensors=tensors,
        head_count_kv=int(g("attention.head_count_kv", n_head)), key_length=int(g("attention.key_length")),
        value_length=int(g("attention.value_length")), rope_dim=int(g("rope.dimension_count")),
        kv_lora_rank=int(g("attention.kv_lora_rank")),
    )
