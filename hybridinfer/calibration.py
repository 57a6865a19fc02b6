"""What `hybridinfer calibrate` measured on this box, as data: per engine build, the CPU cost of each weight type
for decode and prefill, a per-block cost, and the box's sustained memory bandwidth.

The planner predicts from these figures (predict.py) for plans on the box that was measured; a profile of another
box carries no calibration and keeps the published-figure model. Measuring is `calibrate.py` (it runs the engines);
this module only holds, stores and looks up the result, so the early stages can read it without the engines.

Why per weight type: a token's CPU time is, to first order, a sum over the weights it touches of a per-weight cost
that depends on the type's kernel (grid lookups for IQ1_S, int8 dot products for Q8_0, ...) and on the bytes it
reads. Measured once per type, it covers every model built of those types, whatever its shape — a new model of
known types needs no new measurement.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .util import cache_dir, from_dict, to_dict

SCHEMA = "hybridinfer.calibration/1"
# Weight types calibrate measures (routed experts of popular quants, their attention/shared types, gpt-oss' MXFP4).
TYPES = ("IQ1_S", "IQ2_XXS", "Q2_K", "Q4_K", "Q6_K", "Q4_0", "Q8_0", "BF16", "MXFP4")
# An unmeasured type costs what the nearest measured kernel family costs; a type with more bits reads more bytes,
# so its cost is scaled up by the ratio of bits per weight (a lighter one keeps the measured figure: its kernel
# still unpacks as much).
SIMILAR = {
    "IQ1_M": "IQ1_S", "IQ2_XS": "IQ2_XXS", "IQ2_S": "IQ2_XXS", "IQ3_XXS": "IQ2_XXS", "IQ3_S": "IQ2_XXS",
    "IQ4_XS": "Q4_K", "IQ4_NL": "Q4_0", "Q3_K": "Q2_K", "Q5_K": "Q4_K", "Q4_1": "Q4_0", "Q5_0": "Q4_0",
    "Q5_1": "Q4_0", "Q8_1": "Q8_0", "F16": "BF16", "F32": "BF16", "MXFP4": "Q4_0", "TQ1_0": "IQ1_S", "TQ2_0": "IQ2_XXS",
}
BITS = {"IQ1_S": 1.5625, "IQ1_M": 1.75, "IQ2_XXS": 2.0625, "IQ2_XS": 2.3125, "IQ2_S": 2.5625, "IQ3_XXS": 3.0625,
        "IQ3_S": 3.4375, "IQ4_XS": 4.25, "IQ4_NL": 4.5, "Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5,
        "Q6_K": 6.5625, "Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q8_0": 8.5, "Q8_1": 9.0, "BF16": 16.0,
        "F16": 16.0, "F32": 32.0, "MXFP4": 4.25, "TQ1_0": 1.6875, "TQ2_0": 2.0625}
MAX_AGE_DAYS = 90  # older calibrations are used, and `probe`/`plan` say to refresh them


@dataclass(frozen=True)
class EngineRates:
    """One engine build's CPU costs on this box, at `threads` threads."""
    key: str  # the engine as calibrated, e.g. "llama.cpp" or "ik_llama.cpp -rtr" (Engine.calibration_key)
    engine: str
    build: str  # fingerprint of the benchmark binary measured (a rebuilt engine is calibrated again)
    threads: int
    decode_ns: dict[str, float]  # weight type -> ns per weight touched per generated token (reads + compute)
    prefill_ns: dict[str, float]  # weight type -> ns per weight per prompt token at a saturated batch
    block_decode_us: float  # per block per generated token, besides its weights (attention, routing, thread syncs)
    block_prefill_us: float = 0.0  # the same per prompt token
    # Per attention head beyond `heads` (the calibration models'), per block: attention work grows with the heads
    # (and, in prefill, with the context: measured over a `prompt_tokens`-token prompt).
    head_decode_us: float = 0.0
    head_prefill_us: float = 0.0
    heads: int = 4
    prompt_tokens: int = 256
    # A weight outside the routed experts (attention, shared expert, dense FFN, output: matrix products rather than
    # the experts' indexed ones) costs its type's figure times this.
    dense_decode: float = 1.0
    dense_prefill: float = 1.0
    # Routed experts prefill at their saturated cost x (1 + prefill_n0 / tokens each expert sees in a batch); the
    # default is predict.PREFILL_EXPERT_BATCH_N0, fitted on an AVX2 EPYC, until this box fits its own.
    prefill_n0: float = 12.0
    token_us: float = 0.0  # per generated token outside the blocks (sampling, serving), where measured
    failed: dict[str, str] = field(default_factory=dict)  # weight type -> why it could not be measured

    def _cost(self, table: dict[str, float], type_: str) -> float | None:
        if type_ in table:
            return table[type_]
        near = SIMILAR.get(type_)
        if near is None or near not in table:
            near = min(table, key=lambda t: abs(BITS.get(t, 8) - BITS.get(type_, 8)), default=None)
        if near is None:
            return None
        return table[near] * max(1.0, BITS.get(type_, 8) / BITS.get(near, 8))

    def decode_cost(self, type_: str) -> float | None:
        return self._cost(self.decode_ns, type_)

    def prefill_cost(self, type_: str) -> float | None:
        return self._cost(self.prefill_ns, type_)


@dataclass(frozen=True)
class Calibration:
    box: str  # box_key() of the box measured
    created: str  # ISO 8601, UTC
    cpu: str
    bandwidth_gbs: float
    bandwidth_method: str
    seconds: float  # how long the measurement took
    engines: list[EngineRates] = field(default_factory=list)
    busy: str = ""  # what else was running during the measurement, if anything ("" = a quiet box)
    prefill_tokens_per_expert: float = 0.0  # the batch the prefill figures were measured at, per expert
    schema: str = SCHEMA

    def rates(self, key: str) -> EngineRates | None:
        return next((r for r in self.engines if r.key == key), None)

    def age_days(self, now: float | None = None) -> float:
        t = calendar.timegm(time.strptime(self.created, "%Y-%m-%dT%H:%M:%SZ"))
        return max(0.0, ((now or time.time()) - t) / 86400)

    def label(self) -> str:
        """How a figure from it is labelled: 'measured on this box 2026-12-04'."""
        return f"measured on this box {self.created[:10]}" + (" (busy CPU)" if self.busy else "")

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Calibration":
        return from_dict(cls, json.loads(text))


def box_key(hw) -> str:
    """The box a calibration belongs to (a HardwareProfile): CPU model, ISA flags, cores, sockets, RAM (GiB), NUMA
    nodes. Engine builds are keyed per engine (EngineRates.build)."""
    c = hw.cpu
    return hashlib.sha1(json.dumps([c.model, sorted(c.flags), c.physical_cores, c.logical_cores, c.sockets,
                                    round(hw.ram_total / 2**30), len(hw.numa_nodes)]).encode()).hexdigest()[:16]


def build_fingerprint(path: str | None) -> str:
    """A benchmark binary's identity: its resolved path, size and modification time."""
    if not path:
        return ""
    try:
        p = Path(path).resolve()
        st = p.stat()
    except OSError:
        return ""
    return hashlib.sha1(f"{p}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]


def path_for(key: str) -> Path:
    return cache_dir() / "calibration" / f"{key}.json"


def load(key: str) -> Calibration | None:
    try:
        cal = Calibration.from_json(path_for(key).read_text())
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return cal if cal.schema == SCHEMA and cal.box == key else None


def save(cal: Calibration) -> Path:
    """Atomically: a reader never sees half a file, a crash leaves the previous calibration."""
    p = path_for(cal.box)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(cal.to_json() + "\n")
    os.replace(tmp, p)
    return p


def disabled() -> bool:
    """HYBRIDINFER_NO_CALIBRATE=1: plan/serve/bench/tune neither run nor read a calibration (the tests' default)."""
    return os.environ.get("HYBRIDINFER_NO_CALIBRATE", "") not in ("", "0")
