"""The calibrated prediction vs the engines' own benchmark on this box, per installed engine, on four generated
models — and `--engine auto`'s choice against the engine that measured fastest. Also what the planner predicted and
chose before calibration (the published-figure model with probe's default bandwidth), for the before/after table.

    .venv/bin/python benchmarks/calibrated_vs_measured.py [--models mid-iq1_s,mid-q4_k_m,q4_0_few,q8_0_dense]
        [--reps 3] [--n-prompt 512] [--n-gen 64]

Models: the mid model in R1's UD-IQ1_S and Q4_K_M mixes (`hybridinfer demo --size mid`), a Q4_0 one with 2 of 32
experts used per token and a Q8_0 one with 13 dense-FFN blocks (demo/mid.py OTHERS), written into the cache on
first use. Engines: each installed engine with a benchmark tool, as `plan --engine E` runs it here (ik_llama.cpp:
-rtr, CPU-only). Calibrates the box first if it is not (hybridinfer calibrate). Writes
benchmarks/results/calibrated_vs_measured-<cpu kind>.json (one file per CPU kind) and prints a table.
Target: predicted / measured within 0.8-1.25 for decode and prefill; auto picks the fastest measured decode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from hybridinfer.calibrate import BusyMeter, ensure, measurable, with_calibration  # noqa: E402
from hybridinfer.demo.mid import ensure_mid, ensure_other  # noqa: E402
from hybridinfer.inspect_gguf import inspect  # noqa: E402
from hybridinfer.options import probe_box  # noqa: E402
from hybridinfer.plan import PlanOptions, make_plan  # noqa: E402
from hybridinfer.render import why  # noqa: E402

MODELS = {"mid-iq1_s": lambda: ensure_mid("iq1_s"), "mid-q4_k_m": lambda: ensure_mid("q4_k_m"),
          "q4_0_few": lambda: ensure_other("q4_0_few"), "q8_0_dense": lambda: ensure_other("q8_0_dense")}


def cpu_kind(hw) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{hw.cpu.model} {hw.cpu.isa}".lower()).strip("-")


def bench(e, plan, a) -> dict:
    argv = e.bench_command(plan, n_prompt=a.n_prompt, n_gen=a.n_gen, repetitions=a.reps)
    with BusyMeter() as m:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1], "argv": argv}
    rows = e.parse_bench(out.stdout)
    pp = next(r for r in rows if r["test"].startswith("pp"))
    tg = next(r for r in rows if r["test"].startswith("tg"))
    # best of the repetitions, as calibration takes it; the mean beside it
    return {"prefill_tps": round(pp["best_tokens_per_s"], 2), "decode_tps": round(tg["best_tokens_per_s"], 2),
            "prefill_mean_tps": round(pp["tokens_per_s"], 2), "decode_mean_tps": round(tg["tokens_per_s"], 2), "other_cpu_share": round(m.other_share, 3),
            "seconds": round(m.wall, 1), "argv": argv}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=64)
    a = ap.parse_args()
    os.environ.pop("HYBRIDINFER_NO_CALIBRATE", None)
    before_hw = probe_box()
    cal = ensure(before_hw)
    hw = with_calibration(before_hw, cal)
    runnable = measurable(hw)
    results = []
    for name in a.models.split(","):
        path = MODELS[name]()
        model = inspect(path)
        before = make_plan(before_hw, model, PlanOptions())
        auto = make_plan(hw, model, PlanOptions())
        row = {"model": name, "path": path, "gib": round(model.bytes / 2**30, 2),
               "before": {"engine": before.engine, "decode_tps": before.prediction.decode_tps,
                          "prefill_tps": before.prediction.prefill_tps,
                          "bandwidth_gbs": before_hw.memory_bandwidth_gbs,
                          "bandwidth_source": before_hw.bandwidth_source},
               "auto": {"engine": auto.engine, "why": why(auto)[0]}, "engines": {}}
        for e in runnable:
            plan = make_plan(hw, model, PlanOptions(engine=e.name))
            m = bench(e, plan, a)
            pre = plan.prediction
            m.update(predicted_decode_tps=pre.decode_tps, predicted_prefill_tps=pre.prefill_tps,
                     source=f"{pre.source}: {pre.source_detail}", uncalibrated_decode_tps=
                     make_plan(before_hw, model, PlanOptions(engine=e.name)).prediction.decode_tps)
            if "decode_tps" in m:
                m["decode_ratio"] = round(pre.decode_tps / m["decode_tps"], 3)
                m["prefill_ratio"] = round(pre.prefill_tps / m["prefill_tps"], 3)
            row["engines"][e.name] = m
            print(f"{name} {e.name}: {json.dumps({k: v for k, v in m.items() if k != 'argv'})}", flush=True)
        ok = {k: v for k, v in row["engines"].items() if "decode_tps" in v}
        if ok:
            fastest = max(ok, key=lambda k: ok[k]["decode_tps"])
            row["fastest_measured"] = fastest
            row["auto_within"] = round(ok.get(auto.engine, {}).get("decode_tps", 0) / ok[fastest]["decode_tps"], 3)
        results.append(row)
    report = {"schema": "hybridinfer.calibrated-vs-measured/1",
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"host": platform.node(), "cpu": hw.cpu.model, "isa": hw.cpu.isa, "kind": cpu_kind(hw),
                          "physical_cores": hw.cpu.physical_cores, "ram_gib": round(hw.ram_total / 2**30, 1)},
              "calibration": {"created": cal.created, "seconds": cal.seconds, "bandwidth_gbs": cal.bandwidth_gbs,
                              "busy": cal.busy, "engines": [r.key for r in cal.engines]},
              "config": {"n_prompt": a.n_prompt, "n_gen": a.n_gen, "reps": a.reps}, "models": results}
    out = HERE / "results" / f"calibrated_vs_measured-{cpu_kind(hw)}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    print(f"wrote {out}")
    return 0


def table(report: dict) -> str:
    lines = ["| model | engine | measured pp / tg | predicted pp / tg | ratio pp / tg | before: predicted tg |",
             "|---|---|---|---|---|---|"]
    for r in report["models"]:
        for name, m in r["engines"].items():
            if "decode_tps" not in m:
                lines.append(f"| {r['model']} | {name} | failed: {m['error'][:60]} | | | |")
                continue
            lines.append(f"| {r['model']} | {name} | {m['prefill_tps']:g} / {m['decode_tps']:g} | "
                         f"{m['predicted_prefill_tps']:g} / {m['predicted_decode_tps']:g} | "
                         f"{m['prefill_ratio']:.2f} / {m['decode_ratio']:.2f} | {m['uncalibrated_decode_tps']:g} |")
        lines.append(f"| {r['model']} | auto | before: {r['before']['engine']}; after: {r['auto']['engine']} "
                     f"(fastest measured: {r.get('fastest_measured')}; auto gets {r.get('auto_within', 0):.2f} of it) | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
