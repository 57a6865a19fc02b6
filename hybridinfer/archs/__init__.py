"""Model families: one module per family under `archs/`, each exposing one `FAMILY` (an `archs.base.Family`),
listed here. inspect asks `family_of(arch)` for tensor classes, the KV cache and whether the template opens a
thought; anything not listed is the generic family (today's llama-style behaviour).

Adding a family is one module plus one line in `_MODULES`. No engine is known here: which engine runs which
architecture is the engine's own capability (`Engine.runs_arch`).
"""

from __future__ import annotations

from . import deepseek2, deepseek32, glm4moe, gpt_oss, qwen3moe, qwen3next
from .base import GENERIC, Family, KvCache

_MODULES = (deepseek2, deepseek32, qwen3moe, qwen3next, glm4moe, gpt_oss)
FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in _MODULES}
_BY_ARCH: dict[str, Family] = {a: f for f in FAMILIES.values() for a in f.archs}
assert len(_BY_ARCH) == sum(len(f.archs) for f in FAMILIES.values()), "an architecture in two families"


def family_of(arch: str) -> Family:
    """The family covering a GGUF `general.architecture`; the generic family for any other."""
    return _BY_ARCH.get(arch, GENERIC)


__all__ = ["FAMILIES", "GENERIC", "Family", "KvCache", "family_of"]
