"""`hybridinfer calibrate`: measure what decides the speed on this box, once, for the planner.

1. Sustained memory bandwidth (bandwidth.py's C read kernel over all cores).
2. For every installed engine with a benchmark tool, and each way it runs (ik_llama.cpp with and without run-time
   repacking): its own benchmark (llama-bench) at the box's physical-core thread count on a base model and on one
   calibration model per weight type (demo/calib.py: the routed experts all of that type), prompt and generation.
3. A small linear solve turns those runs into per-type costs (ns per weight touched per token, decode and prefill)
   and a per-block cost (calibration.EngineRates), which predict.py sums over any model's tensors.

The result is stored per box (calibration.box_key) and per engine build; `plan`/`serve`/`bench` run it on first use.
Another job using the CPU meanwhile is detected from /proc/stat (CPU time not ours) and recorded, not hidden.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, replace

from . import calibration, engines
from .calibration import Calibration, EngineRates
from .demo import calib as calib_models
from .errors import HybridError
from .inspect_gguf import ModelInfo, inspect
from .predict import PREFILL_EXPERT_BATCH_N0, frac
from .probe import HardwareProfile

N_PROMPT = 256  # one ubatch (llama-bench's default -ub 512): 24 tokens per expert in the calibration models
N_GEN = 32
REPS = 2
BUSY_SHARE = 0.15  # other processes' CPU share above which a calibration is reported as made on a busy box
RUN_TIMEOUT_S = 180


@dataclass(frozen=True)
class Run:
    model: str  # "base" or a weight type
    prefill_tps: float | None
    decode_tps: float | None
    error: str = ""


def _cpu_jiffies() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole box so far, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            parts = [float(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0.0)
    total = sum(parts[:8])
    return (total - idle) / hz, total / hz


class BusyMeter:
    """CPU time used by other processes while we measure: box busy time minus our own and our children's."""

    def __enter__(self):
        self.box0 = _cpu_jiffies()[0]
        self.own0 = self._own()
        self.t0 = time.monotonic()
        return self

    @staticmethod
    def _own() -> float:
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def __exit__(self, *exc):
        self.wall = time.monotonic() - self.t0
        other = (_cpu_jiffies()[0] - self.box0) - (self._own() - self.own0)
        self.other_share = max(0.0, other / max(1e-9, self.wall * (os.cpu_count() or 1)))


def _bench(engine, hw: HardwareProfile, model_path: str, variant: dict, threads: int) -> tuple[float | None, float | None, str]:
    from .plan import PlanOptions, make_plan

    model = inspect(model_path)
    opts = PlanOptions(engine=engine.name, rules="cpu-only", threads=threads, ctx=4096, **variant)
    plan = make_plan(hw, model, opts)
    argv = engine.bench_command(plan, n_prompt=N_PROMPT, n_gen=N_GEN, repetitions=REPS)
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, None, f"timed out after {RUN_TIMEOUT_S} s"
    if out.returncode != 0:
        tail = [ln for ln in (out.stderr or out.stdout).splitlines() if ln.strip()][-1:] or ["no output"]
        return None, None, f"exit {out.returncode}: {tail[0][:160]}"
    try:
        rows = engine.parse_bench(out.stdout)
    except (ValueError, KeyError) as e:
        return None, None, f"unreadable benchmark output ({e})"
    pp = next((r["tokens_per_s"] for r in rows if r["test"].startswith("pp")), None)
    tg = next((r["tokens_per_s"] for r in rows if r["test"].startswith("tg")), None)
    return pp, tg, ""


def _weights(model: ModelInfo) -> tuple[int, dict[str, float], dict[str, float]]:
    """(blocks, weights touched per token by type: dense part, routed-expert part)."""
    dense: dict[str, float] = {}
    experts: dict[str, float] = {}
    for t in model.tensors:
        if len(t.shape) < 2 or t.type == "F32":  # norms and the F32 router: part of the per-block cost
            continue
        d = experts if t.cls == "routed_experts" else dense
        d[t.type] = d.get(t.type, 0.0) + t.n_elements * frac(model, t.cls)
    return model.block_count, dense, experts


def solve(runs: dict[str, Run], models: dict[str, ModelInfo], per_expert: float) -> tuple[dict, dict, float, float, dict]:
    """Per-type costs from the runs: (decode_ns, prefill_ns, block_decode_us, block_prefill_us, failed).

    Every calibration model is B blocks of per-block work plus its weights: t = B * blk + sum_type W_type * c_type.
    The base and Q8_0 models (all Q8_0, different expert widths) fix blk and c_Q8_0; each other type's model then
    has one unknown. Prefill the same, with routed-expert weights weighted by the expert-batch term of the batch
    they were measured at (predict.PREFILL_EXPERT_BATCH_N0), so the stored figure is the saturated one."""
    g = 1 + PREFILL_EXPERT_BATCH_N0 / max(1.0, per_expert)
    failed = {k: r.error for k, r in runs.items() if r.error}
    decode, prefill = {}, {}
    blk = {"decode": 0.0, "prefill": 0.0}
    for kind, out in (("decode", decode), ("prefill", prefill)):
        def t_of(name):
            r = runs.get(name)
            v = r and (r.decode_tps if kind == "decode" else r.prefill_tps)
            return 1 / v if v else None

        def w_of(name):
            B, dense, exp = _weights(models[name])
            scale = 1.0 if kind == "decode" else g
            w = dict(dense)
            for t, x in exp.items():
                w[t] = w.get(t, 0.0) + x * scale
            return B, w

        tb, t8 = t_of("base"), t_of("Q8_0")
        if tb is None or t8 is None:
            continue
        Bb, wb = w_of("base")
        B8, w8 = w_of("Q8_0")
        # Two equations: tb = Bb*x + wb8*c8 and t8 = B8*x + w88*c8.
        a, b, c, d = Bb, wb.get("Q8_0", 0.0), B8, w8.get("Q8_0", 0.0)
        det = a * d - b * c
        x = (tb * d - b * t8) / det if det else 0.0
        c8 = (t8 - B8 * x) / d if d else 0.0
        if x < 0 or c8 <= 0:  # noise the two runs cannot separate: all of it to the weights
            x, c8 = 0.0, t8 / d
        out["Q8_0"] = c8 * 1e9
        blk[kind] = x * 1e6
        for name in runs:
            if name in ("base", "Q8_0"):
                continue
            tt = t_of(name)
            if tt is None:
                continue
            B, w = w_of(name)
            rest = tt - B * x - w.get("Q8_0", 0.0) * c8
            out[name] = max(rest, 0.05 * tt) / w[name] * 1e9  # a floor: noise must not make a type free
    return decode, prefill, blk["decode"], blk["prefill"], failed


def calibrate(hw: HardwareProfile, types=calibration.TYPES, engine_names=None, progress=None) -> Calibration:
    """Measure this box (hw: its probe) -> Calibration. `progress(done, total, what)` is called as it goes."""
    from . import bandwidth

    cpu_hw = replace(hw, gpus=[])  # the CPU's kernels: a GPU's side is predicted, never measured here
    threads = hw.cpu.physical_cores
    todo = []
    for e in engines.REGISTRY.values():
        if engine_names and e.name not in engine_names:
            continue
        if e.calibrate_as or not e.bench_binary_path() or not e.installed(hw):
            continue
        for key, variant in e.calibration_variants().items():
            todo.append((e, key, variant))
    if engine_names and not todo:
        raise HybridError(f"no installed engine with a benchmark tool among {', '.join(engine_names)}",
                          "run ./install.sh, or drop --engine")
    names = ["base", "Q8_0", *[t for t in types if t != "Q8_0"]]
    total = 1 + len(names) + len(todo) * len(names)
    done = 0

    def step(what):
        nonlocal done
        done += 1
        if progress:
            progress(done, total, what)

    t0 = time.monotonic()
    with BusyMeter() as meter:
        bw = bandwidth.measure(threads)
        step(f"memory bandwidth {bw.gbs:g} GB/s")
        paths, models = {}, {}
        for n in names:
            paths[n] = calib_models.ensure(n)
            models[n] = inspect(paths[n])
            step(f"model {n}")
        out = []
        for e, key, variant in todo:
            runs = {}
            for n in names:
                pp, tg, err = _bench(e, cpu_hw, paths[n], variant, threads)
                runs[n] = Run(n, pp, tg, err)
                step(f"{key} {n}: " + (err or f"pp {pp:.1f} / tg {tg:.1f} tok/s"))
            m = models["base"]
            per_expert = N_PROMPT * m.expert_used_count / m.expert_count
            dec, pre, blk, blk_pre, failed = solve(runs, models, per_expert)
            if not dec:
                failed = failed or {"base": "no run succeeded"}
            out.append(EngineRates(key=key, engine=e.name, build=calibration.build_fingerprint(e.bench_binary_path()),
                                   threads=threads, decode_ns=_r(dec), prefill_ns=_r(pre), block_decode_us=round(blk, 2),
                                   block_prefill_us=round(blk_pre, 3),
                                   failed=failed))
    busy = ""
    if meter.other_share > BUSY_SHARE:
        busy = (f"other processes used {meter.other_share:.0%} of the CPU during calibration: figures may be low; "
                "run `hybridinfer calibrate --force` on a quiet box")
    per_expert = N_PROMPT * calib_models.SHAPE.n_used / calib_models.SHAPE.n_expert
    return Calibration(box=calibration.box_key(hw), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       cpu=hw.cpu.model, bandwidth_gbs=bw.gbs, bandwidth_method=bw.detail,
                       seconds=round(time.monotonic() - t0, 1), engines=out, busy=busy,
                       prefill_tokens_per_expert=per_expert)


def _r(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in d.items()}


def stale_engines(cal: Calibration | None, hw: HardwareProfile) -> list[str]:
    """Engines installed here with a benchmark tool whose build has no calibration (new, or rebuilt since)."""
    out = []
    for e in engines.REGISTRY.values():
        if e.calibrate_as or not e.installed(hw):
            continue
        path = e.bench_binary_path()
        if not path:
            continue
        fp = calibration.build_fingerprint(path)
        for key in e.calibration_variants():
            r = cal.rates(key) if cal else None
            if r is None or r.build != fp:
                out.append(e.name)
                break
    return out


def ensure(hw: HardwareProfile, force: bool = False, auto: bool = True, quiet: bool = False) -> Calibration | None:
    """The calibration of this box: the stored one when it covers every installed engine's build, else measured
    now (a one-line notice and a progress bar on stderr) and stored. None with `auto` off (--no-calibrate) or
    HYBRIDINFER_NO_CALIBRATE set: neither measured nor read."""
    if not force and (not auto or calibration.disabled()):
        return None  # --no-calibrate / HYBRIDINFER_NO_CALIBRATE: the published-figure model, and the plan says so
    cal = calibration.load(calibration.box_key(hw))
    stale = stale_engines(cal, hw)
    if force:
        cal, stale = None, []
    if cal and not stale:
        return cal
    if not quiet:
        print(f"hybridinfer: calibrating this box once (~2-3 min; `hybridinfer calibrate` refreshes it, "
              f"--no-calibrate skips it){': new engine builds ' + ', '.join(stale) if cal and stale else ''}",
              file=sys.stderr)
    new = calibrate(hw, engine_names=stale if cal else None, progress=None if quiet else bar)
    if not quiet:
        sys.stderr.write("\n")
    if cal:  # engines not measured now keep their figures
        keep = [r for r in current(cal, hw).engines if r.key not in {x.key for x in new.engines}]
        new = replace(new, engines=keep + list(new.engines))
    calibration.save(new)
    return new


def bar(done: int, total: int, what: str) -> None:
    width = 24
    fill = int(width * done / max(1, total))
    sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} {what[:70]:<70}")
    sys.stderr.flush()


def with_calibration(hw: HardwareProfile, cal: Calibration | None) -> HardwareProfile:
    """This box's profile with its calibration: measured bandwidth and per-engine rates for the planner."""
    if cal is None:
        return hw
    return replace(hw, calibration=cal, memory_bandwidth_gbs=cal.bandwidth_gbs, bandwidth_source="measured",
                   bandwidth_method=cal.bandwidth_method)


def current(cal: Calibration | None, hw: HardwareProfile) -> Calibration | None:
    """The stored calibration without the figures of engines rebuilt since (never another build's figures)."""
    if cal is None:
        return None
    builds = {}
    for e in engines.REGISTRY.values():
        if not e.calibrate_as and e.bench_binary_path():
            builds[e.name] = calibration.build_fingerprint(e.bench_binary_path())
    return replace(cal, engines=[r for r in cal.engines if builds.get(r.engine) == r.build])


# --- the command ------------------------------------------------------------------------------------

def cmd_calibrate(args) -> int:
    """Measure this box once for the planner: memory bandwidth, and each installed engine's decode and prefill cost
    per weight type (its own benchmark on generated calibration models, ~2-3 min on 2 cores).

    Stored in the cache per box and engine build; `plan`, `serve`, `bench` and `tune` run it on first use and
    predict this box's speed and choose its engine from it. `--force` measures again.
    """
    import json as _json

    from .probe import probe
    from .render import render_calibration

    hw = probe(engines=engines.probe_all())
    types = tuple(t.strip().upper() for t in args.types.split(",")) if args.types else calibration.TYPES
    unknown = [t for t in types if t not in calibration.BITS]
    if unknown:
        raise HybridError(f"unknown weight type '{unknown[0]}'", f"use some of {', '.join(calibration.TYPES)}")
    names = [n.strip() for n in args.engine.split(",")] if args.engine else None
    for n in names or ():
        engines.get(n)
    old = current(calibration.load(calibration.box_key(hw)), hw)
    todo = names if args.force or not old else [n for n in stale_engines(old, hw) if not names or n in names]
    if not todo and (args.force or not old):
        todo = None  # every engine
    cal = old
    if todo is None or todo:
        cal = calibrate(hw, types=types, engine_names=todo, progress=None if args.json else bar)
        if not args.json:
            sys.stderr.write("\n")
        if old:  # engines not measured now keep their figures
            keep = [r for r in old.engines if r.key not in {x.key for x in cal.engines}]
            cal = replace(cal, engines=keep + list(cal.engines))
        calibration.save(cal)
    if args.json:
        d = _json.loads(cal.to_json())
        d["age_days"] = round(cal.age_days(), 2)
        d["path"] = str(calibration.path_for(cal.box))
        print(_json.dumps(d, indent=1))
    else:
        render_calibration(cal)
    return 0


def register(sub, add, plan_args) -> None:
    p = add("calibrate", cmd_calibrate)
    p.add_argument("--force", action="store_true", help="measure again even if this box is calibrated")
    p.add_argument("--json", action="store_true", help="print the calibration as JSON")
    p.add_argument("--engine", metavar="NAME[,NAME]", help="only these engines (default: every installed one)")
    p.add_argument("--types", metavar="T[,T]", help=f"only these weight types (default: {','.join(calibration.TYPES)})")
