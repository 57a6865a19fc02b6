"""Stage 4 — plan: (HardwareProfile, ModelInfo, PlanOptions) -> `Plan`: engine, placement of every tensor,
threads, NUMA policy, context and slots, memory per device, predicted speed, and the engine's exact command —
before anything loads.

`make_plan` takes data, never paths; it refuses with a `HybridError` naming the shortfall and the fixes. What an
engine can run, costs and launches with comes from the engine registry (engines/); with `--engine auto` every
eligible engine is planned and the fastest unblocked one wins, each engine's verdict listed in `Plan.reasons`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

from . import engines, rules
from .engines.base import Engine, maps_weights
from .engines.binaries import llama_device
from .errors import HybridError
from .inspect_gguf import ModelInfo, Tensor
from .layers import layer_devices
from .predict import Prediction, PredictInput, predict
from .probe import HardwareProfile
from .util import GIB, MIB, from_dict, ranges, to_dict

KV_TYPES = ("f16", "q8_0", "q4_0")
LOAD_MODES = ("auto", "mmap", "ram")
UBATCH = 512
GPU_MARGIN = int(0.75 * GIB)  # VRAM left free for the driver and fragmentation
MIN_RESIDENT_FOR_STREAMING = 0.20  # below this share of CPU weights in RAM, streaming is too slow to offer
PROMPT_CACHE_GB = 20.0  # the disk prompt cache's default cap (--prompt-cache-gb), cut to the free disk at plan time


@dataclass(frozen=True)
class PlanOptions:
    rules: str | None = None  # name or path; None = choose for the box
    engine: str = "auto"
    ctx: int | None = None
    parallel: int = 1
    kv_type: str = "f16"
    threads: int | None = None
    allow_streaming: bool = True
    serving: bool = False  # only engines hybridinfer can run itself (for `serve`)
    engine_options: dict[str, str] = field(default_factory=dict)  # engines' own options by key (Engine.options)
    cache_ram_mib: int | None = None  # the engine's prompt cache in RAM; None = the KV cache size, at most its cap
    batch: int | None = None  # engine logical/physical batch for prefill (None = the engine's default)
    ubatch: int | None = None
    load_mode: str = "auto"  # auto | mmap | ram (weights read into RAM rather than mapped)
    prompt_cache_dir: str | None = None  # conversations' KV states saved here across restarts (None: not kept)
    prompt_cache_gb: float | None = None  # the most that directory may hold (None: PROMPT_CACHE_GB, cut to free disk)


@dataclass(frozen=True)
class DeviceUse:
    device: str  # "cpu" | "gpu:N"
    label: str
    weights: int
    kv_cache: int
    compute: int
    runtime: int
    total: int
    capacity: int
    groups: dict[str, int]  # tensor class -> bytes on this device
    prompt_cache: int = 0  # RAM the engine may fill with cached prompt prefixes (llama-server --cache-ram)


@dataclass(frozen=True)
class Reason:
    """One line of the plan's "Why": what it is about, the sentence shown, and its figure where it has one."""
    topic: str  # rules-choice | tuned | memory | rules | auto-fill | rpc | threads | numa | kv | context | prompt-cache
    text: str
    figure: float | None = None


@dataclass(frozen=True)
class Verdict:
    """One engine's outcome for this plan (rendered to prose by render.why)."""
    engine: str
    verdict: str  # chosen | requested | slower | not faster | blocked | not installed
    decode_tps: float | None = None  # its predicted or calibrated decode for this plan
    source: str = ""  # where decode_tps comes from
    reason: str = ""  # chosen/requested: what makes it eligible; blocked: the first blocker
    also: list[str] = field(default_factory=list)  # blocked: the further blockers
    installed: bool = True  # on the planned box (a chosen engine may not be: the command is what it would run)
    install_hint: str = ""

    def text(self, hardware: str) -> list[str]:
        """As prose, for the "Why" and error messages: one line, two for a chosen engine that is not installed."""
        e, v = self.engine, self.verdict
        if v in ("chosen", "requested"):
            out = [f"engine {e}: {v} — {self.reason}; {self.decode_tps:g} tok/s decode ({self.source})"]
            if not self.installed:
                out.append(f"note: {e} is not installed on {hardware}; the command is what it would run "
                           f"({self.install_hint})")
            return out
        if v == "blocked":
            return [f"engine {e}: blocked because {self.reason}" + "".join(f"; also {b}" for b in self.also[:2])]
        if v == "not installed":
            return [f"engine {e}: not installed on {hardware}"]
        return [f"engine {e}: {v}: {self.decode_tps:g} tok/s decode ({self.source})"]


@dataclass(frozen=True)
class Plan:
    model_name: str
    model_path: str
    arch: str
    hardware: str
    engine: str
    rules: str
    rules_description: str
    ctx: int
    parallel: int
    kv_type: str
    threads: int
    numa: str  # the engine's NUMA setting (e.g. --numa distribute), "" for none
    flash_attn: bool
    streaming: bool
    resident_fraction: float
    devices: list[DeviceUse]
    prediction: Prediction
    reasons: list[Reason]  # after the engine verdicts in the "Why", except the topics render.LEAD shows first
    warnings: list[str]
    n_layer: int
    n_expert: int
    moe_blocks: list[int]
    routed_types: list[str]
    device_of: dict[str, str] = field(default_factory=dict)
    compiled: dict = field(default_factory=dict)  # the placement in the engine's own form (engine.compile)
    command: list[str] = field(default_factory=list)  # the engine's argv for this plan (engine.command), once
    batch: int = 0  # 0 = the engine's default
    ubatch: int = 0
    load_mode: str = "auto"
    verdicts: list[Verdict] = field(default_factory=list)  # every engine's, the chosen one first
    # The prompt cache on disk (serve saves a conversation's KV state there and restores it after a restart):
    # the directory of this model + engine build + context per slot + KV type (server/prompt_cache.py), and its cap.
    prompt_cache_dir: str = ""
    prompt_cache_bytes: int = 0

    def to_dict(self, placement: bool = False) -> dict:
        d = to_dict(self)
        if not placement:
            d.pop("device_of")
        return d

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return from_dict(cls, json.loads(text))


def default_rules(hw: HardwareProfile, model: ModelInfo) -> str:
    if not hw.gpus:
        return "cpu-only"
    if not model.is_moe:
        return "layer-split"
    return "multi-gpu" if len(hw.gpus) > 1 else "moe-auto-fill"


def _compute_bytes(model: ModelInfo, ctx: int) -> int:
    # Logits for one ubatch plus activations/attention scratch; matches llama.cpp's compute buffers within ~30 %.
    return UBATCH * (model.vocab_size + 32 * model.embedding_length) * 4 + min(ctx, 8192) * model.embedding_length + 32 * MIB


def _ram_capacity(hw: HardwareProfile) -> int:
    if hw.source == "probe":
        return max(0, hw.ram_available - int(0.5 * GIB))
    return int(hw.ram_total - max(2 * GIB, 0.05 * hw.ram_total))  # leave the OS its share


def _vram_capacity(g) -> int:
    free = g.vram_free if g.vram_free else g.vram_total
    return max(0, free - GPU_MARGIN)


def make_plan(hw: HardwareProfile, model: ModelInfo, opts: PlanOptions = PlanOptions()) -> Plan:
    if opts.kv_type not in KV_TYPES:
        raise HybridError(f"unknown KV cache type '{opts.kv_type}'", f"use one of {', '.join(KV_TYPES)}")
    if opts.engine != engines.AUTO:
        engines.get(opts.engine)  # unknown -> one line listing the known engines
    if opts.cache_ram_mib is not None and opts.cache_ram_mib < 0:
        raise HybridError(f"--cache-ram {opts.cache_ram_mib} is negative", "use 0 to disable the prompt cache, or a size in MiB")
    if opts.parallel < 1:
        raise HybridError(f"--parallel must be at least 1, not {opts.parallel}", "use --parallel 1 for one user")
    if opts.load_mode not in LOAD_MODES:
        raise HybridError(f"unknown load mode '{opts.load_mode}'", f"use one of {', '.join(LOAD_MODES)}")
    for flag, v in (("--batch", opts.batch), ("--ubatch", opts.ubatch)):
        if v is not None and v < 1:
            raise HybridError(f"{flag} must be at least 1, not {v}", f"drop {flag} for the engine's default")
    if opts.prompt_cache_gb is not None and not opts.prompt_cache_gb > 0:
        raise HybridError(f"--prompt-cache-gb {opts.prompt_cache_gb:g} is not a positive size",
                          "drop --prompt-cache-dir to keep no prompt cache on disk, or give e.g. --prompt-cache-gb 20")
    if not opts.rules and len(hw.gpus) > 1 and model.is_moe:
        return _best_multi_gpu(hw, model, opts)
    try:
        return _make_plan(hw, model, opts, rules.load(opts.rules or default_rules(hw, model)))
    except HybridError as first:
        # With no rules asked for, a GPU too small for the attention side still allows a layer split.
        if opts.rules or not hw.gpus or default_rules(hw, model) == "layer-split" or "gpu:" not in str(first):
            raise
        try:
            plan = _make_plan(hw, model, opts, rules.load("layer-split"))
        except HybridError:
            raise first from None  # the layer split cannot run either: the first problem is the one to fix
        why = f"rules layer-split chosen because {default_rules(hw, model)} does not fit: {first.problem}"
        return replace(plan, reasons=[Reason("rules-choice", why), *plan.reasons])


def _candidates(hw: HardwareProfile, opts: PlanOptions, model: ModelInfo) -> tuple[list[Engine], list[Verdict]]:
    """Each engine bound to this box, options and model (Engine.for_box), via _registered."""
    cands, skipped = _registered(hw, opts)
    return [e.for_box(hw, opts, model) for e in cands], skipped


def _registered(hw: HardwareProfile, opts: PlanOptions) -> tuple[list[Engine], list[Verdict]]:
    """Engines to plan: the requested one, or every engine installed on the box (listed in a profile from another
    box), plus the default engine, which runs any GGUF anywhere — for serving only when nothing servable is
    installed (its runner then says how to install it). -> (engines, verdicts for the rest)."""
    if opts.engine != engines.AUTO:
        return [engines.get(opts.engine)], []
    out, skipped = [], []
    for e in engines.REGISTRY.values():
        if e.installed(hw):
            out.append(e)
        else:
            skipped.append(Verdict(e.name, "not installed"))
    default = engines.get(engines.DEFAULT)
    if default not in out and not (opts.serving and any(e.serves for e in out)):  # serving: one that is here, if any
        out.insert(0, default)
        skipped = [v for v in skipped if v.engine != default.name]
    return out, skipped


def _static_blockers(e: Engine, hw: HardwareProfile, model: ModelInfo, opts: PlanOptions) -> list[str]:
    out = []
    if opts.serving and not e.serves:
        out.append("hybridinfer does not run it itself yet (`hybridinfer plan --engine "
                   f"{e.name}` prints its command)")
    if e.max_slots and opts.parallel > e.max_slots:
        most = "one request" if e.max_slots == 1 else f"at most {e.max_slots} requests"
        out.append(f"it serves {most} at a time (--parallel {opts.parallel})")
    return out + e.blockers(model, None, hw)


def _blocked(e: Engine, why: list[str]) -> Verdict:
    return Verdict(e.name, "blocked", reason=why[0], also=list(why[1:]))


def _best_multi_gpu(hw: HardwareProfile, model: ModelInfo, opts: PlanOptions) -> Plan:
    """Several GPUs: attention + KV on the GPUs with the experts in RAM (multi-gpu) wins when the experts do not
    fit in VRAM; a layer split wins when most of the model does. Both are planned; the faster prediction is kept."""
    plans, failed = [], []
    for name in ("multi-gpu", "layer-split"):
        rs = rules.load(name)  # a broken rules file is its own error, not "does not fit"
        try:
            plans.append(_make_plan(hw, model, opts, rs))
        except HybridError as e:
            failed.append(f"{name} does not fit: {e.problem}")
    if not plans:
        raise HybridError(failed[0].split(": ", 1)[1], "try --ctx 4096, --kv-type q4_0, or a smaller quant")
    best = max(plans, key=lambda p: p.prediction.decode_tps)
    other = [p for p in plans if p is not best]
    if other and other[0].prediction.decode_tps == best.prediction.decode_tps:
        why = (f"rules {best.rules} and {other[0].rules} predict the same decode ({best.prediction.decode_tps:g} tok/s; "
               f"the GPUs hold the same bytes): {best.rules} kept")
    elif other:
        o = other[0]
        why = (f"rules {best.rules} chosen over {o.rules}: predicted decode {best.prediction.decode_tps:g} vs "
               f"{o.prediction.decode_tps:g} tok/s")
    else:
        why = f"rules {best.rules} chosen: {failed[0]}"
    return replace(best, reasons=[Reason("rules-choice", why), *best.reasons])


def _make_plan(hw: HardwareProfile, model: ModelInfo, opts: PlanOptions, rs: rules.RuleSet) -> Plan:
    """Plan every candidate engine; the fastest unblocked one wins. A placement an engine cannot run is a blocker
    (its verdict in the plan), never an exception — unless that engine was asked for by name."""
    requested = opts.engine != engines.AUTO
    cands, skipped = _candidates(hw, opts, model)
    planned: list[tuple[Engine, Plan]] = []
    blocked: list[Verdict] = []
    first_error: HybridError | None = None
    for e in cands:
        p, why, err = _try_engine(hw, model, opts, rs, e)
        first_error = first_error or err
        if why and requested:
            raise HybridError(f"{e.name} cannot run this plan: {why[0]}", "use --engine auto (or another engine)")
        if why:
            blocked.append(_blocked(e, why))
        else:
            planned.append((e, p))
    if not planned:
        if first_error:
            raise first_error
        raise HybridError("no engine can run this plan: " + "; ".join(v.text(hw.id)[0] for v in blocked),
                          "see each engine's reason")
    # Fastest decode wins; on a tie an installed engine, then the registry's order.
    best_e, best = max(planned, key=lambda ep: (ep[1].prediction.decode_tps, bool(ep[0].installed(hw)),
                                                -cands.index(ep[0])))
    verdicts = _verdicts(hw, model, best_e, best, planned, requested) + blocked + skipped
    best = replace(best, verdicts=verdicts)
    best = replace(best, compiled=best_e.compile(best, hw))
    return replace(best, command=best_e.command(best))


def _try_engine(hw, model, opts, rs, e: Engine) -> tuple[Plan | None, list[str], HybridError | None]:
    """One engine's plan, or why it cannot run it (and the fit error, for when no engine can)."""
    why = _static_blockers(e, hw, model, opts)
    if why:
        return None, why, None
    try:
        p = _plan_for(hw, model, opts, rs, e)
    except _Blocked as b:
        return None, b.reasons, None
    except HybridError as err:
        if opts.engine != engines.AUTO:
            raise
        return None, [f"it does not fit: {err.problem}"], err
    return p, e.blockers(model, p.device_of, hw), None


def _verdicts(hw, model, best_e: Engine, best: Plan, planned: list[tuple[Engine, Plan]],
              requested: bool) -> list[Verdict]:
    """The planned engines' verdicts, the chosen one (`best_e`, planning `best`) first. Each figure is this box's
    calibration of the engine or a prediction; `source` says which."""
    best_tps = best.prediction.decode_tps
    out = [Verdict(best_e.name, "requested" if requested else "chosen", best_tps, _basis(best.prediction, hw),
                   best_e.chosen_because(model, hw), installed=bool(best_e.installed(hw)),
                   install_hint=best_e.install_hint)]
    for e, p in planned:
        if e is not best_e:
            d = p.prediction.decode_tps
            out.append(Verdict(e.name, "slower" if d < best_tps else "not faster", d, _basis(p.prediction, hw)))
    return out


def _basis(pred: Prediction, hw: HardwareProfile) -> str:
    """Where a plan's speed figure comes from, for its "Why" line."""
    cal = hw.calibration
    if pred.source != "predicted" and cal:
        what = "calibrated on this box" if pred.source == "calibrated" else "CPU calibrated on this box, GPU predicted"
        return f"{what} {cal.created[:10]}: {pred.source_detail}" + ("; measured on a busy CPU" if cal.busy else "")
    if hw.source != "probe":
        return f"predicted for {hw.id} from published figures"
    if cal:
        return "predicted: the calibration has no figures for this engine"
    return "predicted: no calibration of this box used (`hybridinfer calibrate` measures it; --no-calibrate skips it)"


def _plan_for(hw: HardwareProfile, model: ModelInfo, opts: PlanOptions, rs: rules.RuleSet, engine: Engine) -> Plan:
    if opts.ctx is not None:
        if opts.ctx < 256 * opts.parallel:
            raise HybridError(f"--ctx {opts.ctx} is too small for {opts.parallel} slot(s)", f"use at least {256 * opts.parallel}")
        if opts.ctx > model.context_length * opts.parallel:
            raise HybridError(f"--ctx {opts.ctx} exceeds the model's trained context ({model.context_length}) x {opts.parallel} slots",
                              f"use --ctx {model.context_length * opts.parallel} or less")
        ctx_candidates = [opts.ctx]
    else:
        base = min(model.context_length, 16384) * opts.parallel
        ctx_candidates = [c for c in (base, base // 2, base // 4, base // 8) if c >= 2048 * opts.parallel] or [base]
    last_err = None
    for i, ctx in enumerate(ctx_candidates):
        try:
            plan = _plan_at(hw, model, opts, rs, engine, ctx)
        except _DoesNotFit as e:
            last_err = e
            continue
        if i:
            why = f"context {ctx} (the default {ctx_candidates[0]} does not fit: {last_err.short})"
            plan = replace(plan, reasons=[*plan.reasons, Reason("context", why, ctx)])
        return plan
    raise HybridError(last_err.problem, last_err.fix)


class _DoesNotFit(Exception):
    def __init__(self, problem, fix, short):
        self.problem, self.fix, self.short = problem, fix, short


class _Blocked(Exception):
    """The engine cannot run this placement at all (checked before its memory is counted)."""

    def __init__(self, reasons: list[str]):
        self.reasons = reasons


@dataclass(frozen=True)
class _Kv:
    """The KV cache and compute-buffer sizes at one context."""
    ctx: int
    per_token: int  # bytes per token of the cache that grows with the context, in the engine's form
    per_layer: int  # bytes of one layer's cache at ctx (ctx is the total over all slots)
    compute: int  # the compute buffer on each device that computes
    trunk: int = 0  # blocks that hold a cache: the trunk, not the MTP blocks after it (0: every block)

    def holds_cache(self, block: int | None) -> bool:
        return block is not None and (not self.trunk or block < self.trunk)


def _kv(engine: Engine, model: ModelInfo, kv_type: str, ctx: int, slots: int = 1, ubatch: int = 0) -> _Kv:
    """The one place the cache is sized: the engine's bytes per token, and the model's cache at ctx (sliding-window
    layers capped at their window, recurrent state per slot), spread evenly over the layers that hold it."""
    tok = engine.kv_bytes_per_token(model, kv_type)
    kv = model.kv
    if kv.swa_layers or kv.state_layers:
        per_layer = int(kv.bytes_at(ctx, kv_type, slots, per_token=tok, ubatch=ubatch) / max(1, kv.cache_layers))
    else:
        per_layer = int(tok * ctx / max(1, kv.layers))
    return _Kv(ctx=ctx, per_token=tok, per_layer=per_layer, compute=_compute_bytes(model, ctx),
               trunk=model.block_count - model.nextn_layers if model.nextn_layers else 0)


def _gpu_runtime(engine: Engine, g) -> int:
    return 0 if g.remote else engine.gpu_runtime_bytes  # a worker reports its memory after its backend started


def _place(hw: HardwareProfile, model: ModelInfo, rs: rules.RuleSet, engine: Engine, kv: _Kv) -> dict[str, str]:
    """Step 1, placement: the rules resolved against each GPU's budget (VRAM less compute and runtime), a block's KV
    cache counted where its attention goes. -> tensor name -> device, and the rules' warnings."""
    budgets = {f"gpu:{g.index}": _vram_capacity(g) - kv.compute - _gpu_runtime(engine, g) for g in hw.gpus}

    def cost(t: Tensor, dev: str) -> int:
        b = engine.tensor_bytes(t, dev)
        if dev != "cpu" and t.name.endswith(".attn_norm.weight") and kv.holds_cache(t.block):
            b += kv.per_layer  # a block's KV cache lives where its attention does
        return b

    placement = rules.resolve(rs, model, budgets, cost)
    blocked = engine.blockers(model, placement.device_of, hw)
    if blocked:
        raise _Blocked(blocked)
    return placement


@dataclass(frozen=True)
class _Memory:
    """Step 2, device memory: bytes per device of weights (and by tensor class) and KV cache; the GPUs' DeviceUse."""
    weights: dict[str, int]
    groups: dict[str, dict[str, int]]
    kv: dict[str, int]
    gpus: list[DeviceUse]


def _device_memory(hw: HardwareProfile, model: ModelInfo, engine: Engine, dev_of: dict[str, str], kv: _Kv) -> _Memory:
    groups: dict[str, dict[str, int]] = {}
    weights: dict[str, int] = {}
    kv_of: dict[str, int] = {}
    for t in model.tensors:
        d = dev_of[t.name]
        # An MTP block is loaded only to draft with it, which no plan turns on: llama.cpp skips its tensors unless
        # MTP drafting is asked for (0.3.36 src/models/glm4-moe.cpp: mtp_flags |= TENSOR_SKIP when !load_mtp),
        # ik_llama.cpp alike (0.1.5 src/llama-load-tensors.cpp: TENSOR_SKIP when !model.mtp).
        b = 0 if t.cls == "nextn" else engine.tensor_bytes(t, d)
        weights[d] = weights.get(d, 0) + b
        groups.setdefault(d, {})
        groups[d][t.cls] = groups[d].get(t.cls, 0) + b
    # The KV cache of a layer lives on the device llama.cpp gives that layer (where its attention is).
    layer_dev = layer_devices(dev_of, model.block_count)
    for b in {t.block for t in model.tensors if t.name.endswith(".attn_norm.weight") and kv.holds_cache(t.block)}:
        kv_of[layer_dev[b]] = kv_of.get(layer_dev[b], 0) + kv.per_layer
    gpus = []
    for g in hw.gpus:
        d = f"gpu:{g.index}"
        if d not in weights and d not in kv_of:
            continue
        rt = _gpu_runtime(engine, g)
        total = weights.get(d, 0) + kv_of.get(d, 0) + kv.compute + rt
        cap = _vram_capacity(g)
        gpus.append(DeviceUse(device=d, label=g.name, weights=weights.get(d, 0), kv_cache=kv_of.get(d, 0),
                              compute=kv.compute, runtime=rt, total=total, capacity=cap, groups=groups.get(d, {})))
        if total > cap:
            short = (total - cap) / GIB
            raise _DoesNotFit(
                f"{d} ({g.name}) needs {total / GIB:.1f} GiB but has {cap / GIB:.1f} GiB usable: {short:.1f} GiB short "
                f"(weights {weights.get(d, 0) / GIB:.1f}, KV {kv_of.get(d, 0) / GIB:.1f}, compute {kv.compute / GIB:.1f})",
                "try --ctx 4096, --kv-type q4_0, or --rules moe-experts-on-cpu / layer-split", f"{d} {short:.1f} GiB short")
    return _Memory(weights=weights, groups=groups, kv=kv_of, gpus=gpus)


@dataclass(frozen=True)
class _RamFit:
    """Step 3, RAM: the CPU's DeviceUse, whether weights stream from disk, the prompt cache's share."""
    cpu: DeviceUse
    streaming: bool
    resident: float  # share of the CPU-side weights that stays in RAM
    cache_ram: int | None  # the engine's prompt cache in RAM (None: it keeps none)
    warnings: list[str]
    notes: list[str]  # memory reasons for the plan's "Why"


def _prompt_cache(engine: Engine, opts: PlanOptions, kv_total: int, base: int, ram_cap: int) -> tuple[int | None, list[str]]:
    """Its prompt cache keeps copies of slot states in RAM (multi-conversation prefix reuse); unplanned it grows to
    the engine's own default (8 GiB for llama-server), the difference between fitting and swapping for a model
    that fills RAM. `base`: the RAM everything else needs."""
    if engine.prompt_cache_max is None:
        return None, []
    if opts.cache_ram_mib is not None:
        return opts.cache_ram_mib * MIB, []
    cache_ram = min(engine.prompt_cache_max, kv_total)
    if cache_ram and base + cache_ram > ram_cap:
        cache_ram = max(0, (ram_cap - base) // MIB * MIB)
        return cache_ram, [f"prompt cache in RAM cut to {cache_ram / GIB:.2f} GiB so the model fits (--cache-ram sets it)"]
    return cache_ram, []


def _stream_or_refuse(model: ModelInfo, opts: PlanOptions, need: int, fixed: int, ram_cap: int) -> tuple[float, list[str]]:
    """RAM short of the CPU-side weights (`need`) beside everything else (`fixed`): stream them from disk through
    the page cache, or refuse. -> (resident share, warnings)."""
    short = (need + fixed - ram_cap) / GIB
    resident = max(0, ram_cap - fixed) / need if need else 0.0
    if not opts.allow_streaming or resident < MIN_RESIDENT_FOR_STREAMING:
        why = "" if opts.allow_streaming else " (streaming disabled)"
        fixes = (f"a smaller quant, {short:.0f}+ GiB more RAM, a bigger GPU, or --ctx/--kv-type q4_0 to "
                 "shrink the KV cache")
        raise _DoesNotFit(
            f"{model.name or 'model'} does not fit: CPU side needs {(need + fixed) / GIB:.1f} GiB, "
            f"RAM has {ram_cap / GIB:.1f} GiB usable — {short:.1f} GiB short; only {resident:.0%} could stay "
            f"cached{why}", f"use {fixes}", f"RAM {short:.1f} GiB short")
    return resident, [f"RAM is {short:.1f} GiB short of the CPU-side weights: planning to stream them from disk "
                      f"through the page cache (mmap); {resident:.0%} stay resident — expect the predicted, slow speed"]


def _repacked(hw: HardwareProfile, model: ModelInfo, engine: Engine, dev_of: dict[str, str]) -> tuple[int, int]:
    """Bytes of CPU-side weights the engine repacks (copies) for its kernels while the mapped file stays resident,
    and the mapped embedding (only a row per token seen is resident, not the whole)."""
    repack = engine.repacked_types
    on_cpu = [t for t in model.tensors if dev_of[t.name] == "cpu"]
    repacked = sum(t.nbytes for t in on_cpu if len(t.shape) >= 2 and t.type in repack and t.cls != "token_embd")
    return repacked, sum(t.nbytes for t in on_cpu if t.cls == "token_embd")


def _ram_fit(hw: HardwareProfile, model: ModelInfo, opts: PlanOptions, engine: Engine, dev_of: dict[str, str],
             mem: _Memory, kv: _Kv) -> _RamFit:
    warnings, notes = [], []
    cpu_weights = mem.weights.get("cpu", 0)
    need = cpu_weights
    extra, why = engine.extra_ram(mem.groups.get("cpu", {}).get("routed_experts", 0), max(1, len(hw.numa_nodes)))
    if extra:
        need += extra
        warnings.append(why)
    # An engine whose CPU compute buffer holds activations, not logits for a whole ubatch, needs ~1/4 of `compute`
    # (Engine.full_cpu_compute_buffer; llama.cpp: 108 MiB measured for the mid model where `compute` is 370 MiB).
    full = engine.full_cpu_compute_buffer
    cpu_compute = kv.compute if any(d == "cpu" for d in dev_of.values()) and not hw.gpus and full else kv.compute // 4
    runtime = engine.cpu_runtime_bytes
    ram_cap = _ram_capacity(hw)
    cache_ram, cut = _prompt_cache(engine, opts, sum(mem.kv.values()), need + mem.kv.get("cpu", 0) + cpu_compute + runtime,
                                   ram_cap)
    warnings += cut
    fixed = mem.kv.get("cpu", 0) + cpu_compute + runtime + (cache_ram or 0)
    streaming, resident = False, 1.0
    if need + fixed > ram_cap:
        resident, why_stream = _stream_or_refuse(model, opts, need, fixed, ram_cap)
        streaming = True
        warnings += why_stream
    ram_total = need + fixed if not streaming else ram_cap
    mixed = "cpu" in dev_of.values() and len(set(dev_of.values())) > 1
    if engine.repacked_types and hw.cpu.isa != "generic" and maps_weights(opts.load_mode, streaming, mixed) and not streaming:
        repacked, embd = _repacked(hw, model, engine, dev_of)
        if repacked:
            # Clean file pages: in RSS while RAM lasts, dropped first when it does not, so not in the fit check.
            ram_total = min(ram_total + repacked, max(ram_total, ram_cap))
            notes.append(f"CPU memory includes {repacked / GIB:.2f} GiB of {'/'.join(sorted(engine.repacked_types))} "
                         f"weights {engine.name} repacks for its {hw.cpu.isa} kernels (the mapped originals stay resident too)")
        ram_total -= embd
    cpu = DeviceUse(device="cpu", label=hw.cpu.model, weights=cpu_weights if not streaming else int(ram_cap - fixed),
                    kv_cache=mem.kv.get("cpu", 0), compute=cpu_compute, runtime=runtime, total=int(ram_total),
                    capacity=ram_cap, groups=mem.groups.get("cpu", {}), prompt_cache=cache_ram or 0)
    return _RamFit(cpu=cpu, streaming=streaming, resident=resident, cache_ram=cache_ram, warnings=warnings, notes=notes)


@dataclass(frozen=True)
class _Disk:
    """Step 3b, the prompt cache on disk: its keyed directory, its cap, what the "Why" says about it."""
    dir: str = ""
    cap: int = 0
    reasons: list[Reason] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _prompt_cache_disk(model: ModelInfo, opts: PlanOptions, engine: Engine, kv: _Kv) -> _Disk:
    """Conversations' KV states saved to disk (on slot eviction and at shutdown) and restored when their prefix
    returns, after a restart too. The directory is keyed by what a state is only valid for — model file, engine
    build, context per slot, KV type — so a state is never restored into another (server/prompt_cache.py)."""
    if not opts.prompt_cache_dir:
        return _Disk()
    if not engine.saves_slots:
        able = [e.name for e in engines.REGISTRY.values() if e.saves_slots]
        return _Disk(warnings=[f"{engine.name} cannot save a slot's KV state to disk: --prompt-cache-dir is ignored"
                               + (f" ({' and '.join(able)} can)" if able else "")])
    from .diskcache import cache_key, disk_free

    per_slot = kv.ctx // max(1, opts.parallel)
    key = cache_key(model.paths, engine.build_fingerprint(), per_slot, opts.kv_type)
    root = os.path.abspath(os.path.expanduser(opts.prompt_cache_dir))
    cap = int((opts.prompt_cache_gb if opts.prompt_cache_gb is not None else PROMPT_CACHE_GB) * GIB)
    warnings = []
    free = disk_free(root)
    if free is not None and free < cap:
        cut = max(0, int(free * 0.9) // MIB * MIB)
        warnings.append(f"prompt cache on disk cut to {cut / GIB:.2f} GiB: {root} has {free / GIB:.2f} GiB free "
                        f"(--prompt-cache-gb asked {cap / GIB:g})")
        cap = cut
    full = kv.per_token * per_slot  # a full slot's state, the largest one file gets
    states = cap // full if full else 0
    text = (f"prompt cache on disk {cap / GIB:.2f} GiB in {root} (least recently used states go first): a "
            f"conversation's KV state is saved when its slot is reused and at shutdown, and restored when it returns; "
            f"{kv.per_token * 1000 / MIB:.1f} MiB per 1,000 tokens, {full / MIB:.0f} MiB for a full slot "
            f"({states} full slot(s) fit)")
    return _Disk(dir=os.path.join(root, key), cap=cap, reasons=[Reason("prompt-cache-disk", text, round(cap / GIB, 2))],
                 warnings=warnings)


def _threads(hw: HardwareProfile, opts: PlanOptions) -> tuple[int, list[str]]:
    threads = opts.threads or hw.cpu.physical_cores
    if threads <= hw.cpu.physical_cores:
        return threads, []
    # Passed through as asked, but SMT siblings share one core's load ports: predict with the real cores.
    return threads, [f"--threads {threads} is more than the {hw.cpu.physical_cores} physical cores: extra threads add "
                     f"no memory bandwidth and usually slow decode; the prediction uses {hw.cpu.physical_cores}"]


def _prediction(hw: HardwareProfile, model: ModelInfo, opts: PlanOptions, engine: Engine, dev_of: dict[str, str],
                threads: int, ram: _RamFit, kv: _Kv) -> Prediction:
    """Step 4, prediction: the engine's parameters, this box's calibration of the way it runs this placement."""
    params = engine.prediction_params
    if opts.ubatch:  # the experts' share of a prefill batch shrinks with it
        params = replace(params, ubatch=min(opts.ubatch, opts.batch or opts.ubatch))
    key = engine.calibration_key(dev_of, ram.streaming, opts.load_mode)
    rates = hw.calibration.rates(key) if hw.calibration else None
    return predict(PredictInput(model, hw, dev_of, params, threads, opts.kv_type, ram.resident,
                                gpu_cost=lambda t: engine.tensor_bytes(t, "gpu"), kv_bytes_per_token=kv.per_token,
                                parallel=opts.parallel, rates=rates))


def _placement_reasons(hw: HardwareProfile, model: ModelInfo, rs: rules.RuleSet, dev_of: dict[str, str],
                       kv_devices, pred: Prediction) -> list[Reason]:
    out = [Reason("rules", f"rules {rs.name}: {rs.description.splitlines()[0] if rs.description else rs.source}")]
    moved = sorted({t.block for t in model.tensors if t.cls == "routed_experts" and dev_of[t.name] != "cpu"})
    if model.is_moe and hw.gpus and rs.name == "moe-auto-fill":
        out.append(Reason("auto-fill", f"auto-fill: routed experts of {len(moved)} block(s) on the GPU "
                                       f"({ranges(moved) or 'none: no spare VRAM'}), the other "
                                       f"{len(model.moe_blocks) - len(moved)} on the CPU", len(moved)))
    for g in hw.gpus:
        if g.remote and f"gpu:{g.index}" not in set(dev_of.values()) | set(kv_devices):
            out.append(Reason("rpc", f"gpu:{g.index} = {llama_device(g)} on RPC worker {g.endpoint}: unused — the "
                                     f"rules {rs.name} placed nothing there; the engine drops its connection after "
                                     f"loading, and serve does not watch it"))
        elif g.remote:
            out.append(Reason("rpc", f"gpu:{g.index} = {llama_device(g)} on RPC worker {g.endpoint}: "
                                     f"{g.vram_free / GIB:.1f} GiB as it reports; link {g.network_rtt_ms:g} ms round trip, "
                                     f"{g.network_gbs:g} GB/s assumed, {pred.breakdown_ms.get('network', 0):g} ms/token in "
                                     f"all; its memory bandwidth assumed {g.memory_bandwidth_gbs:g} GB/s"))
    return out


def _run_reasons(hw: HardwareProfile, model: ModelInfo, opts: PlanOptions, engine: Engine, threads: int, kv: _Kv,
                 cache_ram: int | None) -> list[Reason]:
    cores = hw.cpu.physical_cores
    out = [Reason("threads", f"threads {threads}: requested ({cores} physical cores)" if opts.threads else
                  f"threads {threads}: physical cores (hyperthreads add no memory bandwidth)", threads)]
    if len(hw.numa_nodes) > 1:
        out.append(Reason("numa", engine.numa_policy(len(hw.numa_nodes)).reason))
    if opts.kv_type != "f16":
        out.append(Reason("kv", f"KV cache {opts.kv_type}: needs flash attention (on)"))
    m = model.kv
    bounded = ((f"; {m.swa_layers} sliding-window layer(s) cache at most {m.swa_window} tokens per slot"
                if m.swa_layers else "")
               + (f"; {m.state_layers} recurrent layer(s) keep {m.state_bytes_per_slot / MIB:.1f} MiB of state per slot"
                  if m.state_layers else ""))
    out.append(Reason("context", f"context {kv.ctx} over {opts.parallel} slot(s); KV cache {engine.kv_form(model)} form, "
                                 f"{kv.per_token:,} B/token" + bounded, kv.ctx))
    if cache_ram is not None:
        how = ("set by --cache-ram)" if opts.cache_ram_mib is not None else
               f"the KV cache size, at most {engine.prompt_cache_max / GIB:g} GiB)")
        out.append(Reason("prompt-cache", f"prompt cache in RAM {cache_ram / MIB:.0f} MiB ({engine.name} --cache-ram; "
                                          + how, cache_ram // MIB))
    return out


def _plan_at(hw: HardwareProfile, model: ModelInfo, opts: PlanOptions, rs: rules.RuleSet, engine: Engine,
             ctx: int) -> Plan:
    """One engine, one context: placement, device memory, RAM fit, threads, prediction, reasons."""
    kv = _kv(engine, model, opts.kv_type, ctx, opts.parallel, opts.ubatch or 0)
    placement = _place(hw, model, rs, engine, kv)
    dev_of = placement.device_of
    mem = _device_memory(hw, model, engine, dev_of, kv)
    ram = _ram_fit(hw, model, opts, engine, dev_of, mem, kv)
    threads, thread_warnings = _threads(hw, opts)
    pred = _prediction(hw, model, opts, engine, dev_of, threads, ram, kv)
    nodes = max(1, len(hw.numa_nodes))
    disk = _prompt_cache_disk(model, opts, engine, kv)
    reasons = ([Reason("memory", n) for n in ram.notes] + _placement_reasons(hw, model, rs, dev_of, mem.kv, pred)
               + _run_reasons(hw, model, opts, engine, threads, kv, ram.cache_ram) + disk.reasons)
    return Plan(
        model_name=model.name, model_path=model.paths[0], arch=model.arch, hardware=hw.id, engine=engine.name,
        rules=rs.name, rules_description=rs.description, ctx=ctx, parallel=opts.parallel, kv_type=opts.kv_type,
        threads=threads, numa=engine.numa_policy(nodes).flag if nodes > 1 else "", flash_attn=opts.kv_type != "f16",
        streaming=ram.streaming, resident_fraction=round(ram.resident, 3), devices=[ram.cpu, *mem.gpus], prediction=pred,
        reasons=reasons, warnings=list(placement.warnings) + ram.warnings + thread_warnings + disk.warnings,
        n_layer=model.block_count, n_expert=model.expert_count, moe_blocks=model.moe_blocks,
        routed_types=sorted(model.groups["routed_experts"].types) if model.is_moe else [], device_of=dict(dev_of),
        batch=opts.batch or 0, ubatch=opts.ubatch or 0, load_mode=opts.load_mode,
        prompt_cache_dir=disk.dir, prompt_cache_bytes=disk.cap,
    )
