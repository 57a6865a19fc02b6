"""Stage 5 — engines: each turns a `Plan` into its native command line and (for llama.cpp) runs it.

One small interface (capabilities as attributes, `command(plan, ...)`), chosen through a plain dict.
"""

from __future__ import annotations

from . import ktransformers, llamacpp

ENGINES = {"llama.cpp": llamacpp, "ktransformers": ktransformers}


def get(name: str):
    return ENGINES[name]
