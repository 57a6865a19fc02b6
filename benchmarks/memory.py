"""Predicted vs measured memory per device: plans on the demo model (and any GGUF given with --gguf, e.g. the
GB-scale `hybridinfer demo --size mid` model) over the CPU plus one and two llama.cpp RPC devices on loopback
(`hybridinfer worker`), each plan's own llama-server command run for real with -v, and llama.cpp's load log read
back: model / KV / compute buffer bytes per device, and the engine's RSS once loaded.

Targets: weights and KV cache within ±5 % per device; compute buffers within the stated bound (the plan's
compute figure is an allowance, never less than llama.cpp's buffers: measured/predicted <= 1). Reported apart:
the copies llama.cpp's CPU backend makes of the tensors it repacks when the file is mmap'd (not planned yet).

The GB-scale model: `--gguf $(hybridinfer demo --size mid)` (or `--mid`, which writes it when this tree has it).

    .venv/bin/python benchmarks/memory.py [--gguf FILE ...] [--out benchmarks/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hybridinfer.engines import llamacpp_log, rpc  # noqa: E402
from hybridinfer.inspect_gguf import inspect  # noqa: E402
from hybridinfer.plan import PlanOptions, make_plan  # noqa: E402
from hybridinfer.probe import GpuInfo, load_profile  # noqa: E402
from hybridinfer.util import GIB, MIB, atomic_write  # noqa: E402

WEIGHTS_KV_TOL = 0.05
MARGIN = int(0.75 * GIB)  # what the planner leaves free on every device (plan.GPU_MARGIN)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker() -> tuple[str, subprocess.Popen]:
    port = free_port()
    p = subprocess.Popen([str(Path(sys.executable).parent / "hybridinfer"), "worker", "--port", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return f"127.0.0.1:{port}", p
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("worker did not start")


def profile(endpoints: list[str], vram: list[int] | None):
    """This project's CI box, plus the workers: with a stated VRAM each, or (vram None) the memory each worker
    reports, as `--rpc` plans."""
    hw = load_profile("ci-box")
    if vram is None:
        return rpc.with_workers(hw, rpc.query(endpoints))
    return replace(hw, gpus=[GpuInfo(index=i, name=f"rpc-server {e}", vram_total=v, vram_free=v, memory_bandwidth_gbs=20.0,
                                     device=f"RPC{i}", endpoint=e, network_gbs=rpc.LOOPBACK_GBS, network_rtt_ms=0.05)
                             for i, (e, v) in enumerate(zip(endpoints, vram))])


def cases(model, ctx):
    """(name, workers, vram per worker or None, rules): CPU only; one device (attention side; auto-fill into a
    device with room for about half the experts; as the worker reports its memory); two devices (a layer split
    sized to about half the model each; multi-gpu with room for about a quarter of the experts each). Sizes follow the plan's own allowances, so each case places
    what its name says on any model."""
    experts = sum(t.nbytes for t in model.tensors if t.cls == "routed_experts")
    total = sum(t.nbytes for t in model.tensors)
    big = 4 * total + 2 * GIB
    side = next(d for d in make_plan(profile(["127.0.0.1:1"], [big]), model,
                                     PlanOptions(rules="moe-experts-on-cpu", ctx=ctx)).devices if d.device == "gpu:0")
    half_model = MARGIN + side.compute + side.kv_cache // 2 + int(total * 0.55)
    return [
        ("cpu-only", 0, None, "cpu-only"),
        ("1 device: attention + KV + shared experts, experts on CPU", 1, [big], "moe-experts-on-cpu"),
        ("1 device: auto-fill of early blocks' experts", 1, [MARGIN + side.total + experts // 2], "moe-auto-fill"),
        ("1 device as the worker reports its memory (--rpc)", 1, None, None),
        ("2 devices: layer split", 2, [half_model] * 2, "layer-split"),
        ("2 devices: multi-gpu (attention split, each device filled with its own blocks' experts)", 2,
         [MARGIN + side.compute + side.kv_cache // 2 + side.weights // 2 + experts // 4] * 2, "multi-gpu"),
    ]


def run_case(model, name, n_workers, vram, rules, ctx):
    procs, eps = [], []
    try:
        for _ in range(n_workers):
            e, p = start_worker()
            eps.append(e)
            procs.append(p)
        hw = profile(eps, vram) if n_workers else load_profile("ci-box")
        plan = make_plan(hw, model, PlanOptions(rules=rules, ctx=ctx))
        t0 = time.perf_counter()
        text, rss = llamacpp_log.load(plan, timeout=900)
        load_s = time.perf_counter() - t0
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    r = llamacpp_log.compare(plan, text)
    rows = [{"device": m.device, "kind": m.kind, "predicted": m.predicted, "measured": m.measured,
             "ratio": round(m.ratio, 4) if m.predicted else None} for m in r["memory"]]
    cpu = next(d for d in plan.devices if d.device == "cpu")
    layers: dict[str, int] = {}
    for d in r["layer_devices"].values():
        layers[d] = layers.get(d, 0) + 1
    expert_blocks = sorted({t.block for t in model.tensors if t.cls == "routed_experts" and plan.device_of[t.name] != "cpu"})
    return {"case": name, "layers_per_device (llama.cpp log)": layers, "expert_blocks_on_devices": expert_blocks, "rules": plan.rules, "devices": [d.device for d in plan.devices], "ctx": plan.ctx,
            "command": plan.command, "tensors": r["tensors"], "tensor_mismatches": len(r["mismatched"]),
            "rows": rows, "engine_rss": rss, "predicted_cpu_total": cpu.total, "load_s": round(load_s, 1)}


def report(model_name, res) -> None:
    print(f"\n{model_name}: {res['case']}  (rules {res['rules']}, {res['tensors']} tensors, "
          f"{res['tensor_mismatches']} placed differently from the plan)")
    print(f"  layers per device (llama.cpp's log): {res['layers_per_device (llama.cpp log)']}; routed experts of "
          f"blocks {res['expert_blocks_on_devices'] or 'none'} on a device")
    print(f"  {'device':7} {'kind':8} {'predicted MiB':>14} {'measured MiB':>13} {'ratio':>7}")
    for r in res["rows"]:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        print(f"  {r['device']:7} {r['kind']:8} {r['predicted'] / MIB:14.2f} {r['measured'] / MIB:13.2f} {ratio:>7}")
    print(f"  engine RSS {res['engine_rss'] / MIB:.1f} MiB; plan's CPU total {res['predicted_cpu_total'] / MIB:.1f} MiB "
          f"(incl. the 0.5 GiB runtime allowance)")


def summarize(results) -> dict:
    wk = [r for res in results for r in res["rows"] if r["kind"] in ("weights", "kv") and r["predicted"]]
    comp = [r for res in results for r in res["rows"] if r["kind"] == "compute" and r["predicted"]]
    worst = max((abs(r["ratio"] - 1) for r in wk), default=0.0)
    rep = [(res["case"], r["device"], r["measured"]) for res in results for r in res["rows"] if r["kind"] == "repack"]
    return {"weights_kv_rows": len(wk), "weights_kv_worst_abs_error": round(worst, 4),
            "repack_not_in_plan": [{"case": c, "device": d, "bytes": b} for c, d, b in rep],
            "weights_kv_within_5pct": worst <= WEIGHTS_KV_TOL,
            "compute_ratio_max": max((r["ratio"] for r in comp), default=None),
            "compute_ratio_min": min((r["ratio"] for r in comp), default=None),
            "compute_bound": "measured compute buffers <= predicted (the plan's compute figure is an upper bound)",
            "compute_within_bound": all(r["ratio"] <= 1.0 for r in comp),
            "tensor_mismatches": sum(res["tensor_mismatches"] for res in results)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", action="append", default=[], help="also measure this model (repeatable)")
    ap.add_argument("--mid", action="store_true", help="also the GB-scale benchmark model (hybridinfer demo --size mid)")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    args = ap.parse_args()
    from hybridinfer.demo.tiny import default_model

    models = [("demo (tiny DeepSeek-R1 architecture)", default_model())] + [(Path(g).name, g) for g in args.gguf]
    if args.mid:
        try:
            from hybridinfer.demo.mid import ensure_mid
        except ImportError:
            print("the GB-scale model (`hybridinfer demo --size mid`) is not in this tree; pass --gguf FILE", file=sys.stderr)
            return 2
        models.append(("mid (DeepSeek-V2-Lite shape, UD-IQ1_S type mix)", ensure_mid()))
    out = {"schema": "hybridinfer.memory/1", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "tolerance": {"weights_kv": WEIGHTS_KV_TOL}, "models": []}
    for label, path in models:
        model = inspect(path)
        results = []
        for name, n, vram, rules in cases(model, args.ctx):
            res = run_case(model, name, n, vram, rules, args.ctx)
            report(label, res)
            results.append(res)
        s = summarize(results)
        print(f"\n{label}: weights+KV worst |error| {s['weights_kv_worst_abs_error']:.2%} over {s['weights_kv_rows']} "
              f"device rows (target ±5 %: {'met' if s['weights_kv_within_5pct'] else 'MISSED'}); compute measured/predicted "
              f"{s['compute_ratio_min']}–{s['compute_ratio_max']} ({'within' if s['compute_within_bound'] else 'OUTSIDE'} "
              f"the bound); {s['tensor_mismatches']} tensor(s) placed differently from the plan")
        for r in s["repack_not_in_plan"]:
            print(f"  not in the plan: {r['bytes'] / MIB:.1f} MiB of CPU_REPACK copies next to the mmap'd file "
                  f"({r['case']}, {r['device']})")
        out["models"].append({"model": label, "path": str(path), "bytes": sum(t.nbytes for t in model.tensors),
                              "summary": s, "cases": results})
    atomic_write(args.out, json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
