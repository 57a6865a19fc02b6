"""Concurrency scaling of `hybridinfer serve` on this box, measured by `hybridinfer bench`.

    .venv/bin/python benchmarks/concurrency.py [--gguf FILE] [--levels 1,2,4,8]

Starts serve (the demo model unless --gguf), sweeps closed-loop concurrency, adds llama-bench with the same
placement, and writes benchmarks/results/concurrency.{json,png}.
"""

import argparse
import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
exe = Path(sys.executable).parent / "hybridinfer"

ap = argparse.ArgumentParser()
ap.add_argument("--gguf")
ap.add_argument("--levels", default="1,2,4,8")
ap.add_argument("--requests", default="16")
ap.add_argument("--max-tokens", default="128")
a = ap.parse_args()
out = here / "results" / "concurrency.json"
cmd = [str(exe), "bench", "--concurrency", a.levels, "--requests", a.requests, "--max-tokens", a.max_tokens,
       "--engine-bench", "--json", str(out), "--plot", str(out.with_suffix(".png"))]
if a.gguf:
    cmd += ["--gguf", a.gguf]
sys.exit(subprocess.call(cmd))
