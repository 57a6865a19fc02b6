"""Stage 5 — engines: one module per engine, each exposing one `ENGINE` (an `engines.base.Engine`), and the one
registry everything else asks: the CLI's `--engine` choices, the planner's choice, `inspect`'s support table,
`probe`'s engine table and `serve`.

Adding an engine: write `engines/<name>.py` with `ENGINE = MyEngine()` and list it in `_MODULES` below (a llama.cpp
fork subclasses `llamacpp.LlamaCpp`, as ik_llama.py does). Every engine name appears under engines/ only
(tests/test_seam.py greps the rest of the package).
"""

from __future__ import annotations

from ..errors import HybridError
from ..probe import EngineInfo
from . import ik_llama, kt_sglang, ktransformers, llamacpp, llamacpp_python
from .base import Engine, EngineOption

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
    refused = {n: f"refused: {why}" for n, e in REGISTRY.items() if (why := e.runs_arch(model.arch))}
    return {cls: {n: refused.get(n) or e.support(cls, set(g.types)) for n, e in REGISTRY.items()}
            for cls, g in model.groups.items()}


def options() -> list[EngineOption]:
    """Every option the engines declare (`Engine.options`), each once (engines of a family share one), in registry
    order."""
    return list({o.key: o for e in REGISTRY.values() for o in e.options}.values())


def add_plan_args(p) -> None:
    """The plan options engines add, as command-line flags."""
    for o in options():
        p.add_argument(o.flag, **o.argparse_kwargs())


def options_from_args(args) -> dict[str, str]:
    """`PlanOptions.engine_options` from parsed arguments: each engine option given, by key."""
    return {o.key: v for o in options() if (v := getattr(args, o.key, None)) is not None}


def choices_help() -> str:
    """For --engine's help: the names and what each is."""
    return "; ".join(f"{n}: {e.summary.split(':')[0]}" for n, e in REGISTRY.items())
