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
from .predict import PREFILL_EXPERT_BATCH_N0, frac, in_prefill
from .probe import HardwareProfile

N_PROMPT = 256  # one ubatch (llama-bench default -ub 512): 64 tokens per expert in the calibration models
N_GEN = 64
REPS = 3
BUSY_SHARE = 0.15  # other processes' CPU share above which a calibration is reported as made on a busy box
RUN_TIMEOUT_S = 180
# The expert-batch term of prefill (predict.PREFILL_EXPERT_BATCH_N0) is fitted per engine from one type's model
# prompted at two batch sizes: 64 and 16 tokens per expert.
N0_TYPE = "Q4_K"
SMALL_UB = 64
PER_EXPERT = N_PROMPT * calib_models.SHAPE.n_used / calib_models.SHAPE.n_expert  # tokens per expert at N_PROMPT


@dataclass(frozen=True)
class Run:
    model: str  # "base" or a weight type
    prefill_tps: float | None
    decode_tps: float | None
    error: str = ""


def _busy_seconds() -> float:
    """CPU seconds the whole box has spent busy (steal included), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            parts = [float(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0.0)
    return (sum(parts[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class BusyMeter:
    """CPU time used by other processes while we measure: box busy time minus our own and our children's."""

    def __enter__(self):
        self.box0 = _busy_seconds()
        self.own0 = self._own()
        self.t0 = time.monotonic()
        return self

    @staticmethod
    def _own() -> float:
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def __exit__(self, *exc):
        self.wall = time.monotonic() - self.t0
        other = (_busy_seconds() - self.box0) - (self._own() - self.own0)
        self.other_share = max(0.0, other / max(1e-9, self.wall * (os.cpu_count() or 1)))


def _bench(engine, hw: HardwareProfile, model_path: str, variant: dict, threads: int, n_gen: int = N_GEN,
           extra: tuple = ()) -> tuple[float | None, float | None, str]:
    from .plan import PlanOptions, make_plan

    model = inspect(model_path)
    opts = PlanOptions(engine=engine.name, rules="cpu-only", threads=threads, ctx=4096, **variant)
    plan = make_plan(hw, model, opts)
    argv = engine.bench_command(plan, n_prompt=N_PROMPT, n_gen=n_gen, repetitions=REPS) + list(extra)
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
    # Best of the repetitions, as the bandwidth kernel keeps its best pass: a shared box only ever slows a run down.
    pp = next((r.get("best_tokens_per_s", r["tokens_per_s"]) for r in rows if r["test"].startswith("pp")), None)
    tg = next((r.get("best_tokens_per_s", r["tokens_per_s"]) for r in rows if r["test"].startswith("tg")), None)
    return pp, tg, ""


def _weights(model: ModelInfo, prefill: bool = False) -> tuple[int, dict[str, float], dict[str, float]]:
    """(blocks, weights touched per token by type: dense part, routed-expert part), per generated token or, with
    `prefill`, per prompt token (predict.in_prefill)."""
    dense: dict[str, float] = {}
    experts: dict[str, float] = {}
    for t in model.tensors:
        if len(t.shape) < 2 or t.type == "F32":  # norms and the F32 router: part of the per-block cost
            continue
        if prefill and not in_prefill(model, t):
            continue
        d = experts if t.cls == "routed_experts" else dense
        d[t.type] = d.get(t.type, 0.0) + t.n_elements * frac(model, t.cls)
    return model.block_count, dense, experts


def solve(runs: dict[str, Run], models: dict[str, ModelInfo], per_expert: float,
          n0: float = PREFILL_EXPERT_BATCH_N0) -> dict:
    """Per-type costs from the runs -> {"decode_ns", "prefill_ns", "block_decode_us", "block_prefill_us",
    "dense_decode", "dense_prefill", "failed"}.

    Every calibration model is B blocks of per-block work plus its weights: t = B * blk + sum over its weights of
    their cost, a routed-expert weight of type T costing c_T and any other (attention, shared expert, dense FFN,
    output) c_T * f: engines run dense matrix products (mul_mat) and expert ones (mul_mat_id) with different
    efficiency. The three all-Q8_0 models — base (tiny experts), Q8_0 (large experts), dense (large dense FFN) —
    fix blk, c_Q8_0 and f; the base model with 4x the attention heads adds the per-head part of blk (attention
    work grows with heads); each other type's model then has one unknown. Prefill the same, routed-expert weights
    weighted by the expert-batch term of the batch they were measured at, so the stored figure is the saturated one."""
    g = 1 + n0 / max(1.0, per_expert)
    out = {"decode_ns": {}, "prefill_ns": {}, "block_decode_us": 0.0, "block_prefill_us": 0.0, "head_decode_us": 0.0,
           "head_prefill_us": 0.0, "dense_decode": 1.0,
           "dense_prefill": 1.0, "failed": {k: r.error for k, r in runs.items() if r.error}}
    for kind in ("decode", "prefill"):
        _solve_kind(out, kind, runs, models, g)
    return out


def _solve_kind(out: dict, kind: str, runs: dict[str, Run], models: dict[str, ModelInfo], g: float) -> None:
    """solve() for one of "decode" and "prefill": fills out's `{kind}_ns`, `block_{kind}_us`, `dense_{kind}` and
    `head_{kind}_us` (unchanged when the base or Q8_0 run is missing)."""
    costs = out[f"{kind}_ns"]

    def t_of(name):
        return _seconds_per_token(runs, name, kind)

    def parts(name):
        return _parts(models[name], kind, g)

    tb, t8, td = t_of("base"), t_of("Q8_0"), t_of("dense")
    if tb is None or t8 is None:
        return
    rows, ts = [], []
    for name, t in (("base", tb), ("Q8_0", t8), ("dense", td)):
        if t is None or name not in models:
            continue
        B, dense, exp = parts(name)
        rows.append([B, exp.get("Q8_0", 0.0), dense.get("Q8_0", 0.0)])
        ts.append(t)
    x, c8, u = _fit_q8(rows, ts)
    f = u / c8
    costs["Q8_0"] = c8 * 1e9
    out[f"block_{kind}_us"] = x * 1e6
    out[f"dense_{kind}"] = f
    out[f"head_{kind}_us"] = 0.0
    if t_of("heads") is not None and "heads" in models:  # the base model with more attention heads
        B, dense, exp = parts("heads")
        xh = (t_of("heads") - dense.get("Q8_0", 0.0) * u - exp.get("Q8_0", 0.0) * c8) / B
        extra = models["heads"].head_count - models["base"].head_count
        out[f"head_{kind}_us"] = max(0.0, (xh - x) / extra) * 1e6
    for name in runs:
        if name in ("base", "Q8_0", "dense", "heads") or t_of(name) is None:
            continue
        B, dense, exp = parts(name)
        rest = t_of(name) - B * x - dense.get("Q8_0", 0.0) * u - exp.get("Q8_0", 0.0) * c8
        w = exp.get(name, 0.0) + dense.get(name, 0.0) * f
        costs[name] = max(rest, 0.05 * t_of(name)) / w * 1e9  # a floor: noise must not make a type free


def _seconds_per_token(runs: dict[str, Run], name: str, kind: str) -> float | None:
    """A run's seconds per decoded (or prompt) token, None if it did not run or measured nothing."""
    r = runs.get(name)
    v = r and (r.decode_tps if kind == "decode" else r.prefill_tps)
    return 1 / v if v else None


def _parts(model: ModelInfo, kind: str, g: float) -> tuple[int, dict[str, float], dict[str, float]]:
    """(blocks, dense weights by type, expert weights by type, batch-weighted for prefill)."""
    B, dense, exp = _weights(model, prefill=kind == "prefill")
    scale = 1.0 if kind == "decode" else g
    return B, dense, {t: x * scale for t, x in exp.items()}


def _fit_q8(rows: list[list[float]], ts: list[float]):
    """(seconds per block, per routed-expert Q8_0 weight, per other Q8_0 weight) from the all-Q8_0 runs: exact
    from three; from base and Q8_0 alone (dense weights costing what expert ones do) when there is no dense run or
    the three do not give a physical answer; all of the time to the weights if even that fails."""
    import numpy as np

    x = c8 = u = None
    if len(rows) == 3:
        try:
            x, c8, u = np.linalg.solve(np.array(rows), np.array(ts))
        except np.linalg.LinAlgError:
            x = None
    if x is None or x < 0 or c8 <= 0 or u <= 0:  # no dense run, or noise it cannot separate: f = 1
        a, b = rows[0][0], rows[0][1] + rows[0][2]
        c, d = rows[1][0], rows[1][1] + rows[1][2]
        det = a * d - b * c
        x = (ts[0] * d - b * ts[1]) / det if det else 0.0
        c8 = (ts[1] - c * x) / d if d else 0.0
        if x < 0 or c8 <= 0:  # all of it to the weights
            x, c8 = 0.0, ts[1] / d
        u = c8
    return x, c8, u


def fit_n0(pp_big: float, pp_small: float, model: ModelInfo, sol: dict, n_big: float, n_small: float) -> float:
    """N0 of `expert cost x (1 + N0 / tokens per expert)` from one model prompted at two batch sizes: the part of a
    prompt token's time that is not the routed experts (blocks, dense weights: `sol`'s figures) is taken as equal in
    both, the experts' part grows by (1 + N0/n_small) / (1 + N0/n_big)."""
    B, dense, _ = _weights(model, prefill=True)
    fixed = B * sol["block_prefill_us"] * 1e-6 + sum(
        w * sol["prefill_ns"].get(t, 0.0) * 1e-9 * sol["dense_prefill"] for t, w in dense.items())
    e_big, e_small = 1 / pp_big - fixed, 1 / pp_small - fixed
    if e_big <= 0 or e_small <= e_big:
        return 0.0
    r = e_small / e_big
    den = 1 / n_small - r / n_big
    return max(0.0, min(200.0, (r - 1) / den)) if den > 0 else 200.0


def measurable(hw: HardwareProfile) -> list:
    """The engines calibrate measures on this box: installed, with a benchmark tool, and not borrowing another
    engine's figures (Engine.calibrate_as)."""
    return [e for e in engines.REGISTRY.values() if not e.calibrate_as and e.installed(hw) and e.bench_binary_path()]


def calibrate(hw: HardwareProfile, types=calibration.TYPES, engine_names=None, progress=None) -> Calibration:
    """Measure this box (hw: its probe) -> Calibration. `progress(done, total, what)` is called as it goes."""
    from . import bandwidth

    cpu_hw = replace(hw, gpus=[])  # the CPU's kernels: a GPU's side is predicted, never measured here
    threads = hw.cpu.physical_cores
    todo = [(e, key, variant) for e in measurable(hw) if not engine_names or e.name in engine_names
            for key, variant in e.calibration_variants().items()]
    if engine_names and not todo:
        raise HybridError(f"no installed engine with a benchmark tool among {', '.join(engine_names)}",
                          "run ./install.sh, or drop --engine")
    names = ["base", "heads", "dense", "Q8_0", *[t for t in types if t != "Q8_0"]]
    total = 1 + len(names) + len(todo) * (len(names) + (N0_TYPE in names))
    done = 0

    def step(what):
        nonlocal done
        done += 1
        if progress:
            progress(done, total, what)

    t0 = time.monotonic()
    bw = bandwidth.measure(threads)
    step(f"memory bandwidth {bw.gbs:g} GB/s")
    try:
        out, other, wall = _measure(todo, names, cpu_hw, threads, step)
    finally:  # ~4 GB: written again in seconds when needed, so never left beside the user's models
        for n in names:
            calib_models.path_for(n).unlink(missing_ok=True)
    busy = ""
    share = other / wall if wall else 0.0
    if share > BUSY_SHARE:
        busy = (f"other processes used {share:.0%} of the CPU during calibration: figures may be low; "
                "run `hybridinfer calibrate --force` on a quiet box")
    return Calibration(box=calibration.box_key(hw), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       cpu=hw.cpu.model, bandwidth_gbs=bw.gbs, bandwidth_method=bw.detail,
                       seconds=round(time.monotonic() - t0, 1), engines=out, busy=busy,
                       prefill_tokens_per_expert=PER_EXPERT)


def _measure(todo, names, cpu_hw: HardwareProfile, threads: int, step) -> tuple[list[EngineRates], float, float]:
    """Write the calibration models, run every engine variant on each, solve -> (rates, other processes' CPU
    seconds, wall seconds of the runs)."""
    paths, models = {}, {}
    for n in names:
        paths[n] = calib_models.ensure(n)
        models[n] = inspect(paths[n])
        step(f"model {n}")
    os.sync()  # the kernel's write-back of those files must not compete with the measurements
    out, other, wall = [], 0.0, 0.0
    for e, key, variant in todo:
        runs = {}
        for n in names:
            with BusyMeter() as meter:
                pp, tg, err = _bench(e, cpu_hw, paths[n], variant, threads)
            other, wall = other + meter.other_share * meter.wall, wall + meter.wall
            runs[n] = Run(n, pp, tg, err)
            step(f"{key} {n}: " + (err or f"pp {pp:.1f} / tg {tg:.1f} tok/s"))
        sol = solve(runs, models, PER_EXPERT)
        n0 = PREFILL_EXPERT_BATCH_N0
        if N0_TYPE in names and runs[N0_TYPE].prefill_tps and sol["prefill_ns"]:
            small, _, err = _bench(e, cpu_hw, paths[N0_TYPE], variant, threads, n_gen=0, extra=("-ub", str(SMALL_UB)))
            step(f"{key} {N0_TYPE} at ubatch {SMALL_UB}: " + (err or f"pp {small:.1f} tok/s"))
            if small:
                n0 = fit_n0(runs[N0_TYPE].prefill_tps, small, models[N0_TYPE], sol, PER_EXPERT,
                            PER_EXPERT * SMALL_UB / N_PROMPT)
                sol = solve(runs, models, PER_EXPERT, n0)
        failed = sol["failed"] if sol["decode_ns"] else (sol["failed"] or {"base": "no run succeeded"})
        out.append(EngineRates(key=key, engine=e.name, build=calibration.build_fingerprint(e.bench_binary_path()),
                               threads=threads, decode_ns=_r(sol["decode_ns"]), prefill_ns=_r(sol["prefill_ns"]),
                               block_decode_us=round(sol["block_decode_us"], 2),
                               block_prefill_us=round(sol["block_prefill_us"], 3),
                               head_decode_us=round(sol["head_decode_us"], 3),
                               head_prefill_us=round(sol["head_prefill_us"], 3), heads=calib_models.SHAPE.n_head,
                               prompt_tokens=N_PROMPT,
                               dense_decode=round(sol["dense_decode"], 3), dense_prefill=round(sol["dense_prefill"], 3),
                               prefill_n0=round(n0, 2), failed=failed))
    return out, other, wall


def _r(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in d.items()}


def stale_engines(cal: Calibration | None, hw: HardwareProfile) -> list[str]:
    """Engines installed here with a benchmark tool whose build has no calibration (new, or rebuilt since)."""
    out = []
    for e in measurable(hw):
        fp = calibration.build_fingerprint(e.bench_binary_path())
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
    cal = None if force else calibration.load(calibration.box_key(hw))
    stale = stale_engines(cal, hw) if cal else []
    if cal and not stale:
        return cal
    if not quiet:
        print(f"hybridinfer: calibrating this box once (~2-3 min; `hybridinfer calibrate` refreshes it, "
              f"--no-calibrate skips it){': new engine builds ' + ', '.join(stale) if cal and stale else ''}",
              file=sys.stderr)
    cal = current(cal, hw)
    try:
        new = refresh(hw, cal, stale if cal else None, calibration.TYPES, progress=None if quiet else bar)
    except (HybridError, OSError, subprocess.SubprocessError, ValueError) as e:  # never a reason not to plan
        print(f"\nhybridinfer: calibration failed ({e}); predicting without it — `hybridinfer calibrate` retries",
              file=sys.stderr)
        return cal
    try:
        calibration.save(new)
    except OSError as e:  # a full disk: use it this once, say why it is not kept
        print(f"hybridinfer: could not store the calibration ({e}); it is measured again next time", file=sys.stderr)
    return new


def refresh(hw: HardwareProfile, old: Calibration | None, engine_names, types, progress=None) -> Calibration:
    """Measure `engine_names` (None: every engine) now; engines of `old` not measured again keep their figures."""
    new = calibrate(hw, types=types, engine_names=engine_names, progress=progress)
    if progress:
        sys.stderr.write("\n")
    if old:
        keep = [r for r in old.engines if r.key not in {x.key for x in new.engines}]
        new = replace(new, engines=keep + list(new.engines))
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
    builds = {e.name: calibration.build_fingerprint(e.bench_binary_path()) for e in measurable(hw)}
    return replace(cal, engines=[r for r in cal.engines if builds.get(r.engine) == r.build])


# --- the command ------------------------------------------------------------------------------------

def cmd_calibrate(args) -> int:
    """Measure this box once for the planner: bandwidth and each engine's decode/prefill cost per weight type.

    Runs each installed engine's own benchmark on generated calibration models (one weight type each), at the
    box's physical-core thread count, and the memory-bandwidth kernel: ~2 min on 2 cores. Stored in the cache
    per box and engine build; `plan`, `serve`, `bench` and `tune` run it on first use and predict this box's speed
    and choose its engine from it. `--force` measures again.
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
        cal = refresh(hw, old, todo, types, progress=None if args.json else bar)
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
