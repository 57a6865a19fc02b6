"""llama.cpp built for this CPU (install.sh: GGML_NATIVE=ON) vs a portable build, same model, same threads,
alternating runs so drift on the box hits both alike.

    .venv/bin/python benchmarks/native_vs_portable.py --portable PATH/llama-bench [--variants iq1_s,q4_k_m]

The portable build to compare is what `GGML_BACKEND_DL` + `GGML_CPU_ALL_VARIANTS` would load on this CPU: that
build dispatches at run time to the best-scoring variant the CPU supports (ggml/src/CMakeLists.txt,
ggml_add_cpu_backend_variant), so build that variant's feature set as the one CPU backend, e.g. on an AVX2 machine
the `haswell` set:

    cmake -S <llama.cpp> -B build -DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_F16C=ON -DGGML_FMA=ON \
          -DGGML_AVX2=ON -DGGML_BMI2=ON -DBUILD_SHARED_LIBS=OFF && cmake --build build --target llama-bench

Writes benchmarks/results/native_vs_portable.json: per model, each run's pp512/tg128 and the native / portable
ratios of the means.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from hybridinfer.demo.mid import ensure_mid  # noqa: E402
from hybridinfer.engines.llamacpp import parse_bench  # noqa: E402
from hybridinfer.engines.binaries import find_llama_binary  # noqa: E402
from hybridinfer.probe import probe  # noqa: E402


def run(exe: str, model: str, threads: int, reps: int) -> dict:
    cmd = [exe, "-m", model, "-p", "512", "-n", "128", "-r", str(reps), "-t", str(threads), "-ngl", "0", "-o", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{exe} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    rows = {x["test"]: x["tokens_per_s"] for x in parse_bench(r.stdout)}
    return {"pp512": rows["pp512"], "tg128": rows["tg128"], "load_average_1m": os.getloadavg()[0]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--portable", required=True, help="llama-bench of the portable build")
    ap.add_argument("--native", help="llama-bench built for this CPU (default: the one install.sh built)")
    ap.add_argument("--variants", default="iq1_s,q4_k_m")
    ap.add_argument("--rounds", type=int, default=2, help="native/portable alternations per model (default: 2)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "native_vs_portable.json"))
    args = ap.parse_args()
    native = args.native or find_llama_binary("llama-bench")
    if not native:
        raise SystemExit("no native llama-bench: run ./install.sh or pass --native")
    hw = probe(engines=False)
    out = {"cpu": hw.cpu.model, "isa": hw.cpu.isa, "threads": args.threads, "native": native, "portable": args.portable,
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "models": []}
    for v in args.variants.split(","):
        model = str(ensure_mid(v.strip()))
        runs = {"native": [], "portable": []}
        for i in range(args.rounds):
            order = [("native", native), ("portable", args.portable)]
            for name, exe in (order if i % 2 == 0 else order[::-1]):
                r = run(exe, model, args.threads, args.reps)
                runs[name].append(r)
                print(f"{v} {name:8s} pp512 {r['pp512']:7.2f}  tg128 {r['tg128']:6.2f}", flush=True)
        mean = {k: {t: statistics.mean(x[t] for x in rows) for t in ("pp512", "tg128")} for k, rows in runs.items()}
        ratio = {t: mean["native"][t] / mean["portable"][t] for t in ("pp512", "tg128")}
        print(f"{v}: native / portable  prefill {ratio['pp512']:.3f}  decode {ratio['tg128']:.3f}", flush=True)
        out["models"].append({"variant": v, "path": model, "runs": runs, "mean": mean, "native_over_portable": ratio})
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
