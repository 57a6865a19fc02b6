"""How long `inspect` + `plan` take on the 3-shard, 131 GB-shaped DeepSeek-R1 UD-IQ1_S header.

    .venv/bin/python benchmarks/plan_speed.py      # target: < 1 s for the whole CLI call
"""

import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hybridinfer.demo.shapes import ensure_models
from hybridinfer.inspect_gguf import inspect
from hybridinfer.plan import make_plan
from hybridinfer.probe import load_profile


def main():
    with tempfile.TemporaryDirectory() as d:
        path = ensure_models(d, ["r1-ud-iq1_s"])["r1-ud-iq1_s"]
        hw = load_profile("desktop-4090")
        lib = []
        for _ in range(5):
            t0 = time.perf_counter()
            make_plan(hw, inspect(path))
            lib.append(time.perf_counter() - t0)
        exe = str(Path(sys.executable).parent / "hybridinfer")
        cli = []
        for _ in range(5):
            t0 = time.perf_counter()
            subprocess.run([exe, "plan", "--gguf", path, "--hardware", "desktop-4090", "--json"], check=True,
                           capture_output=True)
            cli.append(time.perf_counter() - t0)
    res = {"machine": platform.node(), "cpu": platform.processor() or platform.machine(),
           "inspect_plan_in_process_s_median": round(statistics.median(lib), 3),
           "cli_plan_with_inspect_s_median": round(statistics.median(cli), 3), "target_s": 1.0}
    print(json.dumps(res, indent=2))
    out = Path(__file__).parent / "results" / "plan_speed.json"
    out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
