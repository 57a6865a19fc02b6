"""What the plan-taking verbs share — `plan`, `serve`, `bench`: the plan options on the command line, and loading
the hardware profile, the model and a saved plan. It sits below the verbs: cli.py, server/cli.py and bench/cli.py
import it and never each other.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from . import engines
from .errors import HybridError
from .inspect_gguf import ModelInfo, inspect
from .plan import KV_TYPES, LOAD_MODES, Plan, PlanOptions, Reason, make_plan
from .probe import HardwareProfile, load_profile, probe

# Plan options and their defaults; `serve --plan FILE` refuses any of them set (the plan already fixed them).
PLAN_DEFAULTS = {"gguf": None, "hardware": None, "rules": None, "engine": engines.AUTO, "ctx": None, "parallel": 1,
                 "kv_type": "f16", "threads": None, "no_stream": False, **{o.key: None for o in engines.options()},
                 "rpc": None, "cache_ram": None, "batch": None, "ubatch": None, "load_mode": "auto",
                 "prompt_cache_dir": None, "prompt_cache_gb": None}


def add_plan_args(p: argparse.ArgumentParser, saved_plan: bool = False) -> None:
    p.add_argument("--gguf", metavar="PATH", help="model file, first shard, directory, or owner/name:QUANT (default: the built-in demo model)")
    p.add_argument("--hardware", metavar="FILE|ID", help="hardware profile JSON or a reference machine id (default: probe this box)")
    p.add_argument("--rules", metavar="NAME|FILE", help="placement rules (default: chosen for the box: moe-auto-fill, layer-split, multi-gpu or cpu-only)")
    # Validated by the registry (one-line error naming the known engines), not argparse's choices.
    p.add_argument("--engine", default=engines.AUTO, metavar="{" + ",".join([engines.AUTO, *engines.names()]) + "}",
                   help=f"engine (default: {engines.AUTO}: the fastest predicted among those installed) — "
                        + engines.choices_help())
    p.add_argument("--ctx", type=int, metavar="N", help="total context tokens over all slots (default: largest that fits, up to 16384 per slot)")
    p.add_argument("--parallel", type=int, default=1, metavar="N", help="concurrent slots (default: 1)")
    p.add_argument("--kv-type", default="f16", choices=list(KV_TYPES), help="KV cache type (default: f16)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: physical cores)")
    p.add_argument("--no-stream", action="store_true", help="refuse rather than stream weights from disk when RAM is short")
    p.add_argument("--cache-ram", type=int, metavar="MIB", help="RAM for the engine's prompt cache (engines that keep "
                   "one), counted in the plan (default: the KV cache size, at most 8192; 0 disables)")
    p.add_argument("--batch", type=int, metavar="N", help="engine logical batch for prefill (default: the engine's)")
    p.add_argument("--ubatch", type=int, metavar="N", help="engine physical batch for prefill (default: the engine's)")
    p.add_argument("--load-mode", default="auto", choices=list(LOAD_MODES),
                   help="weights mapped (mmap) or read into RAM (default: auto = RAM when experts stay on the CPU beside a GPU)")
    p.add_argument("--prompt-cache-dir", metavar="DIR", help="keep conversations' KV states in DIR across restarts: "
                   "saved when a slot is reused and at shutdown, restored when the conversation returns (engines that save "
                   "slots; default: none)")
    p.add_argument("--prompt-cache-gb", type=float, metavar="GB", help="most the prompt cache on disk may hold, least "
                   "recently used states removed first (default: 20, cut to the free disk)")
    engines.add_plan_args(p)  # options engines bring (e.g. the model folder some engines need beside the GGUF)
    p.add_argument("--no-calibrate", action="store_true", help="do not measure this box on first use: predict its "
                   "speed from the published-figure model instead (the plan says so)")
    p.add_argument("--rpc", metavar="HOST:PORT,...", help="also use these RPC workers' devices "
                   "(`hybridinfer worker` on each machine): planned with the memory each reports, served with --rpc")
    if saved_plan:
        p.add_argument("--plan", metavar="PLAN.json", help="run this saved plan (`hybridinfer plan ... --json > PLAN.json`) "
                                                           "exactly, instead of planning")


def plan_options(args, serving: bool = False) -> PlanOptions:
    return PlanOptions(rules=args.rules, engine=args.engine, ctx=args.ctx, parallel=args.parallel,
                       kv_type=args.kv_type, threads=args.threads, allow_streaming=not args.no_stream, serving=serving,
                       engine_options=engines.options_from_args(args), cache_ram_mib=getattr(args, "cache_ram", None),
                       batch=args.batch, ubatch=args.ubatch, load_mode=args.load_mode,
                       prompt_cache_dir=getattr(args, "prompt_cache_dir", None),
                       prompt_cache_gb=getattr(args, "prompt_cache_gb", None))


def probe_box(measure: bool = False) -> HardwareProfile:
    """This box, with every registered engine's own probe in its engine table."""
    return probe(measure=measure, engines=engines.probe_all())


def calibrated_box(auto: bool = True) -> HardwareProfile:
    """This box with its calibration (measured now on first use unless `auto` is off or HYBRIDINFER_NO_CALIBRATE)."""
    from .calibrate import ensure, with_calibration

    hw = probe_box()
    return with_calibration(hw, ensure(hw, auto=auto))


def load_hardware(args) -> HardwareProfile:
    if args.hardware:
        hw = load_profile(args.hardware)
    else:
        hw = calibrated_box(auto=not getattr(args, "no_calibrate", False))
    if getattr(args, "rpc", None):
        from .engines import rpc

        hw = rpc.with_workers(hw, rpc.query(rpc.split_endpoints(args.rpc)))
    return hw


def load_model(args) -> ModelInfo:
    if args.gguf:
        from .download import local_gguf

        return inspect(local_gguf(args.gguf))  # a path, or owner/name:QUANT already downloaded
    from .demo.tiny import default_model

    return inspect(default_model())


def load_plan(path: str) -> Plan:
    p = Path(path)
    if not p.is_file():
        raise HybridError(f"plan file '{path}' not found", "write one with `hybridinfer plan ... --json > PLAN.json`")
    try:
        plan = Plan.from_json(p.read_text())
    except (ValueError, TypeError, KeyError) as e:
        raise HybridError(f"{path} is not a plan ({e.__class__.__name__}: {e})",
                          "write it with `hybridinfer plan ... --json > PLAN.json`") from None
    if not plan.command:
        raise HybridError(f"{path} carries no engine command", "re-plan it with this version's `hybridinfer plan --json`")
    engines.get(plan.engine)
    return plan


def plan_from_args(args, serving: bool = False) -> tuple[Plan, ModelInfo]:
    """The plan a verb runs: the saved one (--plan), or planned now from the options. -> (plan, model)."""
    saved = getattr(args, "plan", None)
    if saved:
        given = [k for k, v in PLAN_DEFAULTS.items() if getattr(args, k, v) != v]
        if given:
            raise HybridError(f"--plan fixes the plan; --{given[0].replace('_', '-')} cannot change it",
                              "drop the plan options, or re-plan with them")
        plan = load_plan(saved)
        return plan, inspect(plan.model_path)
    model = load_model(args)
    hw = load_hardware(args)
    if serving and not args.hardware and all(getattr(args, k, v) == v for k, v in PLAN_DEFAULTS.items() if k != "gguf"):
        from . import calibration
        from .tuned import tuned_plan

        found = tuned_plan(model.paths[0], calibration.box_key(hw))
        if found:  # `hybridinfer tune` measured this model on this box: its winner, unless options say otherwise
            plan, rep = found
            why = (f"plan: the one `hybridinfer tune` measured fastest on this box {rep.get('created', '')[:10]} "
                   f"({rep.get('gain', 1):.2f}x the static plan; any plan option plans afresh)")
            return replace(plan, reasons=[Reason("tuned", why), *plan.reasons]), model
    return make_plan(hw, model, plan_options(args, serving=serving)), model
