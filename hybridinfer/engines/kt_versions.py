"""What each legacy KTransformers release accepts and does, read from its source at the tag (github.com/
kvcache-ai/ktransformers). Every field cites the file it comes from; tests re-derive the flag sets by running each
tag's real `ktransformers/server/args.py` (PyPI's sdists for 0.2.1 and 0.2.1.post1, a git checkout for the rest).

Files cited: A = ktransformers/server/args.py, C = ktransformers/configs/config.yaml,
R = ktransformers/optimize/optimize_rules/DeepSeek-V3-Chat{,-serve}.yaml, E = ktransformers/server/api/openai/
endpoints/chat.py + schemas/endpoints/chat.py, U = ktransformers/util/utils.py, X = ktransformers/operators/experts.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import HybridError

# A @ v0.2.0: every option of the first legacy server (argparse long options, `--help` included).
_BASE = frozenset("""
--amnesia --assistant_store_dir --backup_count --ban_strings --batch_size --botname --cache_8bit --cache_lens
--cache_q4 --cpu_infer --db_database --db_host --db_name --db_pool_size --db_port --db_type --device
--draft_model_dir --dynamic_temperature --experts_per_token --fast_safetensors --file_upload_dir --frequency_penalty
--gguf_path --gpu_split --healing --help --host --json_mode --length --load_q4 --log_dir --log_file --log_level
--low_mem --max_batch_size --max_chunk_size --max_new_tokens --max_response_tokens --mode --model_dir --model_name
--model_path --modes --ngram_decoding --no_code_formatting --no_draft_scale --no_flash_attn --optimize_config_path
--paged --port --presence_penalty --print_timings --prompt_file --repetition_penalty --response_chunk --rope_alpha
--rope_scale --skew --smoothing_factor --ssl_certfile --ssl_keyfile --system_prompt --temperature --top_a --top_k
--top_p --total_context --type --typical --user_algorithm --user_secret_key --username --web --web_cross_domain
""".split())
# Options each tag adds / removes relative to the previous entry (A at that tag).
_DELTAS = {
    "v0.2.0": ((), ()),
    "v0.2.1": (("--force_think",), ()),  # type=bool: takes a value
    "v0.2.2": (("--api_key", "--chunk_prefill_size", "--no-force_think", "--use_cuda_graph", "--no-use_cuda_graph"),
               ("--max_chunk_size",)),  # --force_think becomes BooleanOptionalAction (a switch)
    "v0.2.3": ((), ()),
    "v0.2.3post1": ((), ()),
    "v0.2.4": (("--backend_type", "--chunk_size", "--sched_strategy", "--page_size", "--memory_gpu_only",
                "--utilization_percentage", "--cpu_memory_size_GB"),
               ("--type", "--chunk_prefill_size", "--paged", "--total_context", "--max_response_tokens")),
    "v0.2.4post1": ((), ()),
    "v0.3": (("--architectures", "--kvc2_config_dir"), ()),
    "v0.3.1": ((), ()),  # parse_args now calls AutoConfig.from_pretrained(model_dir): the folder must exist
    "v0.3.2": ((), ()),
    "v0.4.1": (("--q4_gguf_path", "--draft_model_path", "--draft_gguf_path", "--tp"), ()),
}


@dataclass(frozen=True)
class KtVersion:
    tag: str  # the release tag this entry describes
    aliases: tuple[str, ...]  # tags with the same args.py, rules and API (post releases)
    tree_versions: tuple[str, ...]  # `__version__` in ktransformers/__init__.py at these tags (it lags the tag)
    flags: frozenset[str]  # A: long options
    switches: frozenset[str]  # A: options that take no value
    backend_flag: str  # A: "--type" (until v0.2.3) or "--backend_type"
    default_backend: str  # C: model.type
    backends: tuple[str, ...]  # ktransformers/server/backend/interfaces/
    force_think: str  # A: "" (absent) | "value" (type=bool) | "switch" (BooleanOptionalAction)
    attn_from_k_b: bool  # U load_cur_state_dict rebuilds kv_b_proj from attn_k_b/attn_v_b (v0.3.2+)
    flashinfer_attn: str  # R -serve: module of flashinfer_attn ("" = no balance_serve)
    expert_backend_kwarg: bool  # X: KExpertsCPU reads kwargs["backend"] (llamafile | AMXInt8 | AMXBF16)
    models_list: str  # E: GET /v1/models shape: "bare-0" ([{"id": "0"}]) | "bare" (a list) | "openai"
    stream_usage: bool  # E: the stream ends with a usage chunk
    usage: str  # E: non-stream usage: "none" | "fake" (always 1/1/2) | "real"
    request_fields: tuple[str, ...]  # E: ChatCompletionCreate fields
    needs_config_dir: bool  # A: parse_args opens <model_path>/config.json (AutoConfig) — hub ids fail

    @property
    def name(self) -> str:
        return self.tag[1:]

    def at_least(self, tag: str) -> bool:
        order = list(VERSIONS)
        return order.index(self.tag) >= order.index(tag)


def _flags(tag: str) -> frozenset[str]:
    out = set(_BASE)
    for t, (add, rem) in _DELTAS.items():
        out |= set(add)
        out -= set(rem)
        if t == tag:
            return frozenset(out)
    raise KeyError(tag)


_OLD_FIELDS = ("messages", "model", "stream")
_SAMPLING = _OLD_FIELDS + ("temperature", "top_p")
_V03_FIELDS = _SAMPLING + ("tools", "tool_choice", "stream_options", "frequency_penalty", "presence_penalty",
                           "max_tokens", "max_completion_tokens", "return_speed")


def _v(tag, aliases, tree, backend_flag, default_backend, backends, force_think, models_list, stream_usage, usage,
       fields, attn=False, fi="", bk=False, cfgdir=False) -> KtVersion:
    flags = _flags(tag)
    switches = {"--help"} | ({"--force_think", "--no-force_think", "--use_cuda_graph", "--no-use_cuda_graph"} & flags
                             if force_think == "switch" else set())
    return KtVersion(tag, aliases, tree, flags, frozenset(switches), backend_flag, default_backend, backends,
                     force_think, attn, fi, bk, models_list, stream_usage, usage, fields, cfgdir)


_KT = ("ktransformers", "transformers", "exllamav2")
_BS = _KT + ("balance_serve",)
VERSIONS: dict[str, KtVersion] = {v.tag: v for v in (
    _v("v0.2.0", (), ("0.2.0",), "--type", "ktransformers", _KT, "", "bare-0", False, "none", _OLD_FIELDS),
    _v("v0.2.1", ("v0.2.1.post1",), ("0.2.1", "0.2.1.post1"), "--type", "ktransformers", _KT, "value", "bare-0",
       False, "none", _OLD_FIELDS),
    # The v0.2.2 tag's __version__ is still 0.2.2rc1.
    _v("v0.2.2", (), ("0.2.2rc1",), "--type", "ktransformers", _KT, "switch",
       "bare", False, "fake", _SAMPLING),
    # v0.2.3: /v1/models becomes OpenAI's list; v0.2.3post1 adds the usage chunk and real counts (E).
    _v("v0.2.3", (), ("0.2.3",), "--type", "ktransformers", _KT, "switch", "openai", False, "fake", _SAMPLING),
    _v("v0.2.3post1", ("v0.2.3post2",), ("0.2.3.post1", "0.2.3post2"), "--type", "ktransformers", _KT, "switch",
       "openai", True, "real", _SAMPLING),
    _v("v0.2.4", (), ("0.2.4",), "--backend_type", "balance_serve", _BS, "switch", "openai", True, "real",
       _SAMPLING, fi="ktransformers.operators.attention", cfgdir=True),
    _v("v0.2.4post1", (), ("0.2.4post1",), "--backend_type", "ktransformers", _BS, "switch", "openai", True, "real",
       _SAMPLING, fi="ktransformers.operators.attention", cfgdir=True),
    _v("v0.3", (), ("0.2.4post1",), "--backend_type", "ktransformers", _BS, "switch", "openai", True, "real",
       _V03_FIELDS, fi="ktransformers.operators.balance_serve_attention", bk=True, cfgdir=True),
    _v("v0.3.1", (), ("0.3",), "--backend_type", "ktransformers", _BS, "switch", "openai", True, "real", _V03_FIELDS,
       fi="ktransformers.operators.balance_serve_attention", bk=True, cfgdir=True),
    _v("v0.3.2", (), ("0.3.1",), "--backend_type", "ktransformers", _BS, "switch", "openai", True, "real",
       _V03_FIELDS, attn=True, fi="ktransformers.operators.balance_serve_attention", bk=True, cfgdir=True),
    _v("v0.4.1", (), ("0.3.2",), "--backend_type", "balance_serve", _BS, "switch", "openai", True, "real",
       _V03_FIELDS, attn=True, fi="ktransformers.operators.balance_serve_attention", bk=True, cfgdir=True),
)}
_BY_TAG = {t: v for v in VERSIONS.values() for t in (v.tag, *v.aliases)}
# `__version__` (and the package metadata, which setup.py builds from it plus "+cuXXXtorchYYinstr") -> tag.
# 0.2.4post1 is both v0.2.4post1 and v0.3: the tree decides (see detect_tag).
_BY_TREE = {tv: v for v in VERSIONS.values() for tv in v.tree_versions if tv != "0.2.4post1"}
SUPPORTED = ", ".join(v.name for v in VERSIONS.values())


def _norm(s: str) -> str:
    s = s.strip().lower().lstrip("v")
    return re.sub(r"\.?post", "post", s)


def lookup(version: str) -> KtVersion:
    """A KTransformers version as a profile or `probe` records it: a tag ("0.2.1", "v0.3.2", "0.2.4post1") or a
    package version with its build suffix ("0.3.2+cu124torch26fancy", which is the tree's lagging __version__)."""
    raw = (version or "").strip()
    base, plus, _build = raw.partition("+")
    if plus:
        v = _BY_TREE.get(base.strip()) or {_norm(k): x for k, x in _BY_TREE.items()}.get(_norm(base))
        if v is None and _norm(base) == "0.2.4post1":
            v = VERSIONS["v0.2.4post1"]  # the tree (probe) tells v0.3 apart; the metadata alone cannot
    else:
        v = {_norm(t): x for t, x in _BY_TAG.items()}.get(_norm(raw))
        if v is None and re.fullmatch(r"0\.3(\.0)?", _norm(raw)):
            v = VERSIONS["v0.3"]
    if v is None:
        raise HybridError(f"KTransformers version '{raw or '(none)'}' is not one hybridinfer knows",
                          f"record a supported release in the profile: {SUPPORTED} (tags of the legacy server), or "
                          f"plan the kt-kernel + SGLang stack (--engine kt-sglang)")
    return v


def detect_tag(root: Path) -> tuple[KtVersion, str]:
    """Which release an installed or checked-out `ktransformers` package directory is, from its files (its
    `__version__` lags the tags); -> (entry, one line of evidence)."""
    def read(rel):
        try:
            return (root / rel).read_text(errors="replace")
        except OSError:
            return ""

    args, utils = read("server/args.py"), read("util/utils.py")
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", read("__init__.py"))
    tree = m.group(1) if m else "?"
    chat = read("server/api/openai/endpoints/chat.py")
    checks = (
        ("v0.4.1", "--q4_gguf_path" in args),
        ("v0.3.2", "attn_k_b" in utils),
        ("v0.3.1", "AutoConfig" in args),
        ("v0.3", "--kvc2_config_dir" in args),
        ("v0.2.4post1", "--backend_type" in args and tree == "0.2.4post1"),
        ("v0.2.4", "--backend_type" in args),
        ("v0.2.3post1", "BooleanOptionalAction" in args and "RawUsage" in chat),
        ("v0.2.3", "BooleanOptionalAction" in args and '"object": "list"' in chat),
        ("v0.2.2", "BooleanOptionalAction" in args),
        ("v0.2.1", "--force_think" in args),
        ("v0.2.0", "--cache_lens" in args),
    )
    for tag, hit in checks:
        if hit:
            return VERSIONS[tag], f"tree matches {tag} (__version__ {tree})"
    raise HybridError(f"{root} does not look like a legacy KTransformers server (no server/args.py)",
                      f"hybridinfer supports the legacy releases {SUPPORTED} and the kt-kernel + SGLang stack")


# The classes (module path + class) and ops (`op:NAME`, keys of LINEAR_MAP / EXPERTS_MAP) hybridinfer's rules may
# name, per tag: `class NAME` in ktransformers/models/modeling_deepseek_v3.py and ktransformers/operators/{RoPE,
# linear,experts,gate,attention,balance_serve_attention,models,layernorm,mlp}.py at that tag.
_M, _O = "ktransformers.models.modeling_deepseek_v3.", "ktransformers.operators."
_CLASSES_BASE = frozenset({
    _M + "DeepseekV3RotaryEmbedding", _M + "DeepseekV3MoE", _M + "MoEGate", _M + "DeepseekV3RMSNorm",
    _M + "DeepseekV3MLP", _O + "RoPE.YarnRotaryEmbeddingV3", _O + "linear.KTransformersLinear",
    _O + "experts.KDeepseekV3MoE", _O + "experts.KTransformersExperts", _O + "gate.KMoEGate",
    _O + "attention.KDeepseekV2Attention", _O + "models.KDeepseekV2Model", "torch.nn.Linear",
    "op:KLinearMarlin", "op:KLinearTorch", "op:KExpertsCPU", "op:KExpertsMarlin", "op:KExpertsTorch"})
_CLASSES_DELTA = {  # tag -> (added, removed)
    "v0.2.4": ({_O + "linear.VLinearMarlin", "op:VLinearMarlin", _O + "experts.KDeepseekV3MoEV2",
                _O + "experts.KTransformersExpertsV2", _O + "attention.flashinfer_attn", _O + "layernorm.RMSNorm",
                _O + "mlp.kDeepseekV3MLP"}, set()),
    "v0.3": ({_O + "balance_serve_attention.flashinfer_attn"}, {_O + "attention.flashinfer_attn"}),
}


def classes(v: KtVersion) -> frozenset[str]:
    out = set(_CLASSES_BASE)
    for tag, (add, rem) in _CLASSES_DELTA.items():
        if v.at_least(tag):
            out = (out | add) - rem
    return frozenset(out)
