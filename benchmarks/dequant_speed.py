"""Elements/s of hybridinfer's torch IQ dequantizers vs the numpy reference (gguf.quants), per type.

    .venv/bin/python benchmarks/dequant_speed.py [--mib 32] [--repeat 3]

CPU always; CUDA too when a GPU is present. Writes benchmarks/results/dequant_speed.json. Goal: >= 10x on CPU.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from hybridinfer.quants import TYPES, dequantize


def best(fn, repeat):
    fn()  # warm-up: grids built, caches hot
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=float, default=32, help="bytes of quantized data per type (default: 32 MiB)")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'type':8s} {'numpy M/s':>10s} {'torch cpu M/s':>14s} {'x':>6s} {'torch cuda M/s':>15s}")
    for name, (_, block, size) in TYPES.items():
        n_blocks = int(a.mib * 2**20) // size
        raw = rng.integers(0, 256, size=n_blocks * size, dtype=np.uint8)
        raw.reshape(n_blocks, size)[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # finite scales
        n = n_blocks * block
        qt = GGMLQuantizationType[name]
        t_np = best(lambda: quants.dequantize(raw.reshape(n_blocks, size), qt), a.repeat)
        t_cpu = best(lambda: dequantize(raw, name), a.repeat)
        row = {"type": name, "elements": n, "numpy_meps": n / t_np / 1e6, "torch_cpu_meps": n / t_cpu / 1e6,
               "speedup_cpu": t_np / t_cpu}
        if torch.cuda.is_available():
            g = torch.from_numpy(raw).cuda()
            t_gpu = best(lambda: dequantize(g, name), a.repeat)
            row["torch_cuda_meps"] = n / t_gpu / 1e6
        rows.append(row)
        print(f"{name:8s} {row['numpy_meps']:10.1f} {row['torch_cpu_meps']:14.1f} {row['speedup_cpu']:6.1f}"
              f" {row.get('torch_cuda_meps', float('nan')):15.1f}")
    out = Path(__file__).parent / "results" / "dequant_speed.json"
    out.write_text(json.dumps({"machine": platform.node(), "cpu": platform.processor() or platform.machine(),
                               "torch_threads": torch.get_num_threads(), "mib_per_type": a.mib, "results": rows},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
