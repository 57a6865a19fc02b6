"""Stage 5 — engines: one module per engine, each exposing one `ENGINE` (an `engines.base.Engine`), and the one
registry everything else asks: the CLI's `--engine` choices, the planner's choice, `inspect`'s support table,
`probe`'s engine table and `serve`.

Adding an engine: write `engines/<name>.py` with `ENGINE = MyEngine()` and list it in `_MODULES` below. Every
engine name appears under engines/ only (tests/test_seam.py greps the rest of the package).
"""

from __future__ import annotations

from ..errors import HybridError
from ..probe import EngineInfo
from . import ik_llama, kt_sglang, ktransformers, llamacpp, llamacpp_python
from .base import Engine

_MODULES = (llamacpp, ik_llama, llamacpp_python, ktransformers, kt_sglang)  # order breaks ties between equally fast engines
REGISTRY: dict[str, Engine] = {m.ENGINE.name: m.ENGINE for m in _MODULES}
DEFAULT = llamacpp.ENGINE.name  # planned when no other engine is installed: runs every GGUF on any box
AUTO = "auto"


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> Engine:
    try:
        return REGISTRY[name]
    except KeyError:
        raise HybridError(f"unknown engine '{name}'", f"use one of {AUTO}, {', '.join(REGISTRY)}") from None


def probe_all() -> list[EngineInfo]:
    """`probe`'s engine table: every engine's own report of this box."""
    return [info for e in REGISTRY.values() for info in e.probe_all()]


def support_table(model) -> dict[str, dict[str, str]]:
    """`inspect`'s table: tensor group -> engine -> "ok" / "ok after patch (...)" / "refused: ...", assembled here,
    where it is shown, so that inspect itself knows no engine."""
    return {cls: {n: e.support(cls, set(g.types)) for n, e in REGISTRY.items()} for cls, g in model.groups.items()}


def add_plan_args(p) -> None:
    """The plan options engines add (`Engine.plan_args`), each flag once."""
    seen = set()
    for e in REGISTRY.values():
        for flag, kw in e.plan_args:
            if flag not in seen:
                seen.add(flag)
                p.add_argument(flag, **kw)


def choices_help() -> str:
    """For --engine's help: the names and what each is."""
    return "; ".join(f"{n}: {e.summary.split(':')[0]}" for n, e in REGISTRY.items())
