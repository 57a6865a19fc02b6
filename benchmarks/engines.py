"""Mainline llama.cpp vs ik_llama.cpp on the same GGUF and threads, side by side in one run.

    .venv/bin/python benchmarks/engines.py [--models demo,mid] [--threads 2] [--reps 3] [--requests 8]

Per model and engine, planned once (`hybridinfer plan --engine E --json`): `hybridinfer bench --plan` serves that
plan and measures served decode tok/s and TTFT (sequential streamed requests), then runs the engine's own
llama-bench pp512/tg128 with the same plan (ik_llama.cpp: `-rtr 1` where it applies, i.e. no tensor on a GPU; and
once more without it, to show what repacking is worth). Models: the demo model and
the largest the project generates (`hybridinfer demo --size mid` when that exists; otherwise a few-hundred-MB
deepseek2 Q4_0 written by demo/tiny.py's generator, and the results say which). Engines alternate per model so
drift on a shared box hits both alike.

Writes benchmarks/results/engines.json: figures of the box it ran on, for the README. The program itself never
reads them: `--engine auto` decides from the calibration of the box it runs on (`hybridinfer calibrate`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
EXE = str(Path(sys.executable).parent / "hybridinfer")
sys.path.insert(0, str(HERE.parent))

from hybridinfer import engines  # noqa: E402
from hybridinfer.engines.llamacpp import parse_bench  # noqa: E402
from hybridinfer.inspect_gguf import inspect  # noqa: E402
from hybridinfer.probe import probe  # noqa: E402
from hybridinfer.util import cache_dir  # noqa: E402

MAINLINE, IK = "llama.cpp", "ik_llama.cpp"


def demo_model() -> tuple[str, str]:
    from hybridinfer.demo.tiny import default_model
    return default_model(), "the demo model (demo/tiny.py, q8_0)"


def mid_model(path: str | None = None) -> tuple[str, str]:
    if path:
        return path, f"{Path(path).name} (given with --mid)"
    try:  # the GB-scale R1-shaped benchmark model, where the project has it
        from hybridinfer.demo.mid import ensure_mid
        return str(ensure_mid("iq1_s")), "hybridinfer demo --size mid (DeepSeek-V2-Lite shape, R1 UD-IQ1_S type mix)"
    except ImportError:
        pass
    from hybridinfer.demo.tiny import write_tiny
    path = cache_dir() / "models" / "bench-deepseek2-q4_0.gguf"
    if not path.exists():
        # ~0.3 GB: 12 blocks, 32 experts of 512 x 1024 — the demo generator at a size where experts dominate.
        write_tiny(path, qtype="q4_0", blocks=12, n_embd=1024, n_expert=32, n_ff_exp=512)
    return str(path), "a 0.3 GB deepseek2 Q4_0 from demo/tiny.py's generator (no --size mid in this tree)"


def plan_file(engine: str, model_path: str, threads: int, tmp: Path) -> Path:
    """`hybridinfer plan --json`: the one plan both `serve` (through `bench`) and the engine's own bench run."""
    out = tmp / f"plan-{engine}-{Path(model_path).stem}.json"
    cmd = [EXE, "plan", "--gguf", model_path, "--engine", engine, "--threads", str(threads), "--parallel", "1", "--json"]
    print("  $", " ".join(cmd), ">", out, flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr.strip())
    out.write_text(r.stdout)
    return out


def bench(plan: Path, requests: int, max_tokens: int, tmp: Path) -> dict:
    """`hybridinfer bench --plan`: serves the plan, streams sequential requests, then runs the engine's own
    llama-bench with the same plan (pp512 / tg{max_tokens})."""
    out = tmp / f"bench-{plan.stem}.json"
    cmd = [EXE, "bench", "--plan", str(plan), "--requests", str(requests), "--max-tokens", str(max_tokens),
           "--prompt-tokens", "128", "--warmup", "1", "--engine-bench", "--json", str(out)]
    print("  $", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["bench failed"])[-1]}
    rep = json.loads(out.read_text())
    lv = rep["runs"][0]["levels"][0]
    eb = rep.get("engine_bench") or {}
    rows = {row["test"]: row for row in eb.get("results", [])}
    return {"served": {"requests": lv["completed"],
                       "decode_tok_s": round(1000 / lv["median_tpot_ms"], 2) if lv["median_tpot_ms"] else None,
                       "ttft_ms": round(lv["median_ttft_ms"], 1) if lv["median_ttft_ms"] is not None else None,
                       "output_tok_s": round(lv["output_throughput"], 2)},
            "llama_bench": {"command": eb.get("command", []),
                            **{t: round(x["tokens_per_s"], 2) for t, x in rows.items()},
                            **{t + "_stddev": round(x["stddev"], 2) for t, x in rows.items()}}}


def llama_bench_without_rtr(plan_path: Path, reps: int, n_gen: int) -> dict:
    """ik's llama-bench with the plan's placement but no run-time repacking: what -rtr is worth."""
    from hybridinfer.options import load_plan
    plan = load_plan(str(plan_path))
    cmd = engines.get(plan.engine).bench_command(plan, n_prompt=512, n_gen=n_gen, repetitions=reps)
    if "-rtr" not in cmd:
        return {}
    i = cmd.index("-rtr")
    cmd = cmd[:i] + cmd[i + 2:]
    print("  $", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"command": cmd, "error": " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])}
    rows = parse_bench(r.stdout)
    return {"command": cmd, **{x["test"]: round(x["tokens_per_s"], 2) for x in rows},
            **{x["test"] + "_stddev": round(x["stddev"], 2) for x in rows}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="demo,mid")
    ap.add_argument("--mid", metavar="GGUF", help="the large model to use (default: hybridinfer demo --size mid)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the no -rtr llama-bench (bench's own run: 3)")
    ap.add_argument("--requests", type=int, default=8, help="served requests per engine (default: 8)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default=str(HERE / "results" / "engines.json"))
    a = ap.parse_args()

    hw = probe()
    have = {n for n in (MAINLINE, IK) if (engines.get(n).probe() or None) and engines.get(n).probe().installed}
    if have != {MAINLINE, IK}:
        missing = sorted({MAINLINE, IK} - have)
        print(f"not installed: {', '.join(missing)} (run ./install.sh)", file=sys.stderr)
        return 2
    pick = {"demo": demo_model, "mid": lambda: mid_model(a.mid)}
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="engines-bench-"))
    for i, key in enumerate(a.models.split(",")):
        path, what = pick[key]()
        m = inspect(path)
        print(f"\n== {key}: {what} — {m.bytes / 2**30:.2f} GiB, {m.block_count} blocks, {m.expert_count} experts", flush=True)
        row = {"model": key, "what": what, "path": path, "bytes": m.bytes, "class": None, "engines": {}}
        order = [MAINLINE, IK] if i % 2 == 0 else [IK, MAINLINE]
        for name in order:
            pf = plan_file(name, path, a.threads, tmp)
            plan = json.loads(pf.read_text())
            row["class"] = f"{m.arch}-{m.kv.form}"
            load = os.getloadavg()[0]  # a shared box: say how busy it was when each engine ran
            r = {"plan_command": plan["command"], **bench(pf, a.requests, a.max_tokens, tmp)}
            r["load_average_1m"] = [round(load, 2), round(os.getloadavg()[0], 2)]
            if name == IK:
                r["llama_bench_no_rtr"] = llama_bench_without_rtr(pf, a.reps, a.max_tokens)
            row["engines"][name] = r
            print(f"  {name}: {json.dumps({k: v for k, v in r.items() if k != 'plan_command'}, default=str)[:700]}", flush=True)
        results.append(row)
        write(a, hw, results)  # after each model, so a long run leaves what it measured

    report = write(a, hw, results)
    print(table(report))
    return 0


def write(a, hw, results) -> dict:
    report = {"schema": "hybridinfer.engines-bench/1", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"host": platform.node(), "cpu": hw.cpu.model, "isa": hw.cpu.isa,
                          "physical_cores": hw.cpu.physical_cores, "ram_gib": round(hw.ram_total / 2**30, 1),
                          "gpus": [g.name for g in hw.gpus], "load_average": os.getloadavg()},
              "engines": {n: engines.get(n).probe().version for n in (MAINLINE, IK)},
              "threads": a.threads, "reps": a.reps, "requests": a.requests, "max_tokens": a.max_tokens,
              "models": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out}", flush=True)
    return report


def table(report: dict) -> str:
    def f(x):
        return "—" if x is None else f"{x:g}"
    lines = ["| model | engine | llama-bench pp512 | tg128 | served decode tok/s | served TTFT ms | load avg (start/end) |",
             "|---|---|---|---|---|---|---|"]
    for row in report["models"]:
        for name, r in row["engines"].items():
            lb, s = r.get("llama_bench", {}), r.get("served", {})
            rtr = " (-rtr)" if "-rtr" in lb.get("command", []) else ""
            lines.append(f"| {row['model']} ({row['bytes'] / 2**30:.2f} GiB) | {name}{rtr} | {f(lb.get('pp512'))} | "
                         f"{f(lb.get('tg128'))} | {f(s.get('decode_tok_s'))} | {f(s.get('ttft_ms'))} | "
                         f"{'/'.join(map(str, r.get('load_average_1m', [])))} |")
            if r.get("llama_bench_no_rtr"):
                nb = r["llama_bench_no_rtr"]
                lines.append(f"| | {name} (no -rtr) | {f(nb.get('pp512'))} | {f(nb.get('tg128'))} | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
