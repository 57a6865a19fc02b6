"""The `hybridinfer` command: probe → inspect → plan → serve → bench, one verb each.

Errors a user can fix arrive as `HybridError` and leave as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from .errors import HybridError

EPILOG = """\
examples:
  hybridinfer probe                         what this box has (CPU, NUMA, ISA, RAM, GPUs, engines)
  hybridinfer calibrate                     measure this box's engines once (~2-3 min): what plan predicts from
  hybridinfer download unsloth/DeepSeek-R1-GGUF --quant UD-IQ1_S   fetch a quant (checked, resumable, verified)
  hybridinfer inspect --gguf DeepSeek-R1-UD-IQ1_S-00001-of-00003.gguf
  hybridinfer plan --gguf R1.gguf --hardware desktop-4090 --compare layer-split
  hybridinfer serve                         serve the built-in tiny demo model on 127.0.0.1:8000
  hybridinfer plan --gguf R1.gguf --json > plan.json && hybridinfer serve --plan plan.json   plan once, run it
  hybridinfer bench --url http://127.0.0.1:8000/v1 --concurrency 1,2,4 --json out.json --plot out.png
  hybridinfer openwebui-pipe -o hybridinfer_pipe.py   the Open-WebUI function
"""


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


# --- probe ------------------------------------------------------------------------------------------

def cmd_probe(args) -> int:
    """Inspect this box: CPU, cores, sockets, NUMA, ISA (AVX2/AVX-512/AMX), RAM, bandwidth, GPUs, engines.

    The JSON it writes is a hardware profile: `plan --hardware FILE` plans with it instead of this box.
    """
    from .options import probe_box
    from .render import render_probe

    if args.measure_bandwidth and not args.json:
        print("measuring memory read bandwidth on all cores (a few seconds)...", file=sys.stderr)
    from . import calibration
    from .calibrate import current, with_calibration

    hw = probe_box(measure=args.measure_bandwidth)
    cal = current(calibration.load(calibration.box_key(hw)), hw)
    if cal and not args.measure_bandwidth:
        hw = with_calibration(hw, cal)
    elif cal:
        from dataclasses import replace

        hw = replace(hw, calibration=cal)
    if args.json:
        d = json.loads(hw.to_json())
        d["calibration_age_days"] = round(cal.age_days(), 2) if cal else None
        _print_json(d)
    else:
        render_probe(hw)
    return 0


# --- inspect ----------------------------------------------------------------------------------------

def cmd_inspect(args) -> int:
    """Read a GGUF header (never its tensor data) and report what the planner needs.

    Accepts a file, the first shard of a split set (all shards are found and checked), or a directory
    holding one model. Reports parameter groups and their bytes, quant types, experts, and KV-cache bytes
    per token (MLA form vs legacy form detected from the metadata).
    """
    from .engines import support_table
    from .inspect_gguf import inspect
    from .render import render_model

    model = inspect(args.gguf)
    support = support_table(model)
    if args.json:
        d = model.to_dict(tensors=args.tensors)
        for cls, g in d["groups"].items():
            g["engines"] = support[cls]
        _print_json(d)
    else:
        render_model(model, support, tensors=args.tensors)
    return 0


# --- plan -------------------------------------------------------------------------------------------

def cmd_plan(args) -> int:
    """Choose engine, placement, threads, NUMA policy, context and slots; predict memory and speed.

    Nothing is loaded: the plan comes from the GGUF header and a hardware profile (this box by default, or
    `--hardware FILE|ID`, e.g. one of the reference machines in benchmarks/hardware/). Without --gguf it plans
    the built-in demo model.
    """
    from dataclasses import replace

    from .options import load_hardware, load_model, plan_options
    from .plan import make_plan
    from .render import render_plan
    from .util import shell

    hw = load_hardware(args)
    model = load_model(args)
    opts = plan_options(args)
    plan = make_plan(hw, model, opts)
    compare = make_plan(hw, model, replace(opts, rules=args.compare)) if args.compare else None
    if args.json:
        d = plan.to_dict(placement=args.placement)
        d["command_line"] = shell(plan.command)
        if compare:
            d["compare"] = {"rules": compare.rules, "engine": compare.engine,
                            "prediction": compare.to_dict()["prediction"], "devices": compare.to_dict()["devices"],
                            "command_line": shell(compare.command)}
        _print_json(d)
    else:
        render_plan(plan, compare)
    return 0


# --- parser -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .options import add_plan_args

    parser = argparse.ArgumentParser(
        prog="hybridinfer", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Run giant Mixture-of-Experts models on one box: attention and KV cache on the GPU, routed experts on the CPU.")
    parser.add_argument("--version", action="version", version=f"hybridinfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, fn, **kw):
        doc = textwrap.dedent(fn.__doc__ or "")
        p = sub.add_parser(name, help=doc.strip().splitlines()[0], description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
        p.set_defaults(func=fn)
        return p

    p = add("probe", cmd_probe)
    p.add_argument("--json", action="store_true", help="print the hardware profile as JSON")
    p.add_argument("--measure-bandwidth", action="store_true", help="measure memory bandwidth (a few seconds)")

    p = add("inspect", cmd_inspect)
    p.add_argument("--gguf", required=True, metavar="PATH", help="model file, first shard, or directory")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.add_argument("--tensors", action="store_true", help="include every tensor (name, shape, type, bytes, class)")

    p = add("plan", cmd_plan)
    add_plan_args(p)
    p.add_argument("--compare", metavar="RULES", help="also plan with these rules (e.g. layer-split) and compare")
    p.add_argument("--json", action="store_true", help="print the plan (and engine command) as JSON")
    p.add_argument("--placement", action="store_true", help="with --json: include the device of every tensor")

    for extra in _extra_commands():
        extra(sub, add, add_plan_args)
    return parser


def cmd_openwebui_pipe(args) -> int:
    """Print (or write with -o) the Open-WebUI pipe function that shows hybridinfer's models in Open-WebUI.

    Import the file in Open-WebUI (Admin Panel > Functions > Import, or paste it), enable it, and point its
    BASE_URL valve at `hybridinfer serve` (default http://127.0.0.1:8000/v1). Reasoning appears as a collapsible
    thinking block; tokens/s and TTFT as a status line.
    """
    from pathlib import Path

    from .util import atomic_write

    text = (Path(__file__).parent / "openwebui_pipe.py").read_text()
    if args.base_url:
        text = text.replace('default="http://127.0.0.1:8000/v1"', f"default={args.base_url!r}", 1)
    if args.output:
        if not Path(args.output).resolve().parent.is_dir():
            raise HybridError(f"cannot write {args.output}: its directory does not exist",
                              "create the directory or choose another path")
        atomic_write(args.output, text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _register_openwebui(sub, add, plan_args) -> None:
    p = add("openwebui-pipe", cmd_openwebui_pipe)
    p.add_argument("-o", "--output", metavar="FILE", help="write the function to FILE instead of stdout")
    p.add_argument("--base-url", metavar="URL", help="default BASE_URL valve (default: http://127.0.0.1:8000/v1)")


def _extra_commands():
    """Later stages register themselves here (serve, bench, ...)."""
    out = []
    try:
        from .server.cli import register as serve_register
        out.append(serve_register)
    except ImportError:
        pass
    from .bench.cli import register as bench_register
    from .calibrate import register as calibrate_register
    from .demo.cli import register as demo_register
    from .download.cli import register as download_register
    from .engines.ktransformers_patch import register as patch_register
    from .tune import register as tune_register
    from .worker import register as worker_register
    out += [calibrate_register, download_register, bench_register, patch_register, _register_openwebui,
            worker_register, demo_register, tune_register]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except HybridError as e:
        print(f"hybridinfer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
