"""`hybridinfer demo`: write one of the built-in models into the cache and print its path."""

from __future__ import annotations

import sys
import time


def cmd_demo(args) -> int:
    """Write a built-in random-weights model into the cache (once) and print its path.

    --size tiny: the ~7 MB DeepSeek-R1-architecture demo model every command uses by default.
    --size mid:  a GB-scale benchmark model with DeepSeek-V2-Lite's shape (27 blocks, 64 experts, MLA) and
                 R1 UD-IQ1_S's type mix (~4 GB) or a Q4_K_M-style mix (--variant q4_k_m, ~10 GB); written in
                 seconds, for measuring speed where memory bandwidth and quantized kernels decide it.
    --family NAME: a tiny (~5 MB) random-weights model of another giant-MoE family (its real GGUF keys, tensor
                 names and shapes, tokenizer specials and chat template), for serving and planning per family.
    The cache is $HYBRIDINFER_CACHE or ~/.cache/hybridinfer.
    """
    from .mid import ensure_mid, mid_path, total_bytes

    if args.family:
        from .families import ensure_family

        print(ensure_family(args.family, force=args.force))
        return 0
    if args.size == "tiny":
        from .tiny import default_model

        print(default_model())
        return 0
    path = mid_path(args.variant)
    if args.force or not path.exists():
        print(f"writing {path.name} ({total_bytes(args.variant) / 1e9:.1f} GB)...", file=sys.stderr)
        t0 = time.perf_counter()
        ensure_mid(args.variant, force=args.force)
        print(f"written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(path)
    return 0


def register(sub, add, plan_args) -> None:
    p = add("demo", cmd_demo)
    p.add_argument("--size", choices=["tiny", "mid"], default="tiny", help="tiny (~7 MB) or mid (GB-scale) (default: tiny)")
    p.add_argument("--variant", choices=["iq1_s", "q4_k_m"], default="iq1_s", help="mid model type mix (default: iq1_s)")
    from .families import FAMILIES

    p.add_argument("--family", choices=list(FAMILIES), metavar="NAME",
                   help="a tiny model of another family instead: " + "; ".join(f"{f.name}: {f.what}" for f in FAMILIES.values()))
    p.add_argument("--force", action="store_true", help="write it again even if the cache has it")
