"""Engine speeds measured side by side on a real box, per model class — what `--engine auto` trusts over the
prediction when this box and this kind of model were measured.

No engine wins everywhere (ik_llama.cpp prefills ~2x faster on CPU with run-time repacking, decode is close and
noisy), and the throughput model has no per-engine kernel data good enough to rank two llama.cpp-family engines
whose decode differs by less than its error. So the choice between engines rests on measurement where one exists:
`benchmarks/engines.py` runs the engines on the same GGUF and threads and writes `measured.json` beside this file;
`lookup` returns the figures when the CPU, its ISA and the model class match, else None (the planner then
predicts). HYBRIDINFER_ENGINE_MEASUREMENTS names another table, or `off` (the tests' default: a choice that does not
depend on a benchmark artifact).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TABLE = Path(__file__).with_name("measured.json")
SCHEMA = "hybridinfer.engine-measurements/1"
LARGE = 256 * 2**20  # below this the model sits in cache and per-token overhead dominates, above it weight reads


def model_class(model, device_of: dict[str, str]) -> str:
    """What decides which engine is faster: architecture and attention form, whether any weight is on a GPU
    (ik_llama.cpp repacks only CPU-only setups), and whether decode is bound by weight reads or by overhead."""
    devs = set(device_of.values()) if device_of else {"cpu"}
    where = "cpu-only" if devs == {"cpu"} else "hybrid"
    size = "large" if model.bytes >= LARGE else "small"
    return f"{model.arch}-{model.kv.form}/{where}/{size}"


def _load(path: Path | None = None) -> list[dict]:
    env = os.environ.get("HYBRIDINFER_ENGINE_MEASUREMENTS")
    if path is None and env == "off":
        return []
    try:
        data = json.loads((path or (Path(env) if env else TABLE)).read_text())
    except (OSError, ValueError):
        return []
    return data.get("entries", []) if data.get("schema") == SCHEMA else []


def lookup(hw, model, device_of: dict[str, str], path: Path | None = None) -> dict | None:
    """The measured entry for this box's CPU and this model class: {"decode_tok_s": {engine: x}, "prefill_tok_s":
    {...}, "model": ..., "source": ...}, or None. A profile from another box matches only if its CPU was measured."""
    cls = model_class(model, device_of)
    for e in _load(path):
        if e.get("cpu") == hw.cpu.model and e.get("isa") == hw.cpu.isa and e.get("class") == cls:
            return e
    return None


def update_table(report: dict, path: Path | None = None) -> Path:
    """Fold a benchmarks/engines.py report into the table: one entry per (cpu, isa, class), newest wins."""
    path = path or TABLE
    entries = _load(path)
    m = report["machine"]
    for row in report["models"]:
        decode, prefill = {}, {}
        for name, r in row["engines"].items():
            d = r.get("served", {}).get("decode_tok_s") or r.get("llama_bench", {}).get("tg128")
            p = r.get("llama_bench", {}).get("pp512")
            if d:
                decode[name] = d
            if p:
                prefill[name] = p
        if len(decode) < 2:
            continue
        new = {"cpu": m["cpu"], "isa": m["isa"], "class": row["class"], "threads": report["threads"],
               "model": row["what"], "decode_tok_s": decode, "prefill_tok_s": prefill,
               "source": f"benchmarks/engines.py, {report['created']} (served decode; llama-bench pp512)"}
        entries = [e for e in entries if (e.get("cpu"), e.get("isa"), e.get("class")) != (new["cpu"], new["isa"], new["class"])]
        entries.append(new)
    path.write_text(json.dumps({"schema": SCHEMA, "entries": entries}, indent=1) + "\n")
    return path
