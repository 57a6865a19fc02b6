"""Stage 4 — plan: (HardwareProfile, ModelInfo, PlanOptions) -> `Plan`: engine, placement of every tensor,
threads, NUMA policy, context and slots, memory per device, predicted speed, and the engine's exact command —
before anything loads.

`make_plan` takes data, never paths; it refuses with a `HybridError` naming the shortfall and the fixes. What an
engine can run, costs and launches with comes from the engine registry (engines/); with `--engine auto` every
eligible engine is planned and the fastest unblocked one wins, each engine's verdict listed in `Plan.reasons`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from dataclasses import replace

from . import engines, rules
from .engines.base import Engine, maps_weights
from .errors import HybridError
from .inspect_gguf import ModelInfo, Tensor
from .layers import layer_devices
from .predict import Prediction, predict
from .probe import HardwareProfile
from .util import GIB, MIB, from_dict, ranges, to_dict

KV_TYPES = ("f16", "q8_0", "q4_0")
LOAD_MODES = ("auto", "mmap", "ram")
UBATCH = 512
GPU_MARGIN = int(0.75 * GIB)  # VRAM left free for the driver and fragmentation
MIN_RESIDENT_FOR_STREAMING = 0.20  # below this share of CPU weights in RAM, streaming is too slow to offer


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
    reasons: list[str]
    warnings: list[str]
    n_layer: int
    n_expert: int
    moe_blocks: list[int]
    routed_types: list[str]
    device_of: dict[str, str] = field(default_factory=dict)
    compiled: dict = field(default_factory=dict)  # the placement in the engine's own form (engine.compile)
    command: list[str] = field(default_factory=list)  # the engine's argv for this plan (engine.command), once
    # Every GPU of the profile -> its llama.cpp device name and buffer type (CUDA0, RPC0[host:port], ...), and the
    # RPC servers the engine must be given (`--rpc`), in the order that numbers them RPC0, RPC1, ...
    gpu_devices: dict[str, str] = field(default_factory=dict)
    gpu_buffers: dict[str, str] = field(default_factory=dict)
    rpc_servers: list[str] = field(default_factory=list)
    cache_ram: int | None = None  # bytes for the engine's prompt cache (--cache-ram), counted in RAM; None: no such cache
    batch: int = 0  # 0 = the engine's default
    ubatch: int = 0
    load_mode: str = "auto"

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
        plan.reasons.insert(0, f"rules layer-split chosen because {default_rules(hw, model)} does not fit: {first.problem}")
        return plan


def _candidates(hw: HardwareProfile, opts: PlanOptions, model: ModelInfo) -> tuple[list[Engine], list[str]]:
    """Each engine bound to this box, options and model (Engine.for_box), via _registered."""
    cands, skipped = _registered(hw, opts)
    return [e.for_box(hw, opts, model) for e in cands], skipped


def _registered(hw: HardwareProfile, opts: PlanOptions) -> tuple[list[Engine], list[str]]:
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
            skipped.append(f"engine {e.name}: not installed on {hw.id}")
    default = engines.get(engines.DEFAULT)
    if default not in out and not (opts.serving and any(e.serves for e in out)):  # serving: one that is here, if any
        out.insert(0, default)
        skipped.remove(f"engine {default.name}: not installed on {hw.id}")
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


def _blocked(e: Engine, why: list[str]) -> str:
    return f"engine {e.name}: blocked because {why[0]}" + "".join(f"; also {b}" for b in why[1:3])


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
    return replace(best, reasons=[why] + best.reasons)


def _make_plan(hw: HardwareProfile, model: ModelInfo, opts: PlanOptions, rs: rules.RuleSet) -> Plan:
    """Plan every candidate engine; the fastest unblocked one wins. A placement an engine cannot run is a blocker
    (its verdict in the reasons), never an exception — unless that engine was asked for by name."""
    requested = opts.engine != engines.AUTO
    cands, verdicts = _candidates(hw, opts, model)
    planned: list[tuple[Engine, Plan]] = []
    blocked: list[tuple[Engine, str]] = []
    first_error: HybridError | None = None
    for e in cands:
        why = _static_blockers(e, hw, model, opts)
        if not why:
            try:
                p = _plan_for(hw, model, opts, rs, e)
            except _Blocked as b:
                why = b.reasons
            except HybridError as err:
                if requested:
                    raise
                first_error = first_error or err
                why = [f"it does not fit: {err.problem}"]
            else:
                why = e.blockers(model, p.device_of, hw)
        if why and requested:
            raise HybridError(f"{e.name} cannot run this plan: {why[0]}", "use --engine auto (or another engine)")
        if why:
            blocked.append((e, _blocked(e, why)))
        else:
            planned.append((e, p))
    if not planned:
        if first_error:
            raise first_error
        raise HybridError("no engine can run this plan: " + "; ".join(b for _, b in blocked), "see each engine's reason")
    # Fastest decode wins; on a tie an installed engine, then the registry's order. Each engine's figure is measured
    # (this box's calibration of it) or predicted; the reasons say which.
    tps = {e.name: p.prediction.decode_tps for e, p in planned}
    basis = {e.name: _basis(p.prediction, hw) for e, p in planned}
    best_e, best = max(planned, key=lambda ep: (tps[ep[0].name], bool(ep[0].installed(hw)), -cands.index(ep[0])))
    head = [f"engine {best_e.name}: {'requested' if requested else 'chosen'} — {best_e.chosen_because(model, hw)}; "
            f"{tps[best_e.name]:g} tok/s decode ({basis[best_e.name]})"]
    if not best_e.installed(hw):
        head.append(f"note: {best_e.name} is not installed on {hw.id}; the command is what it would run "
                    f"({best_e.install_hint})")
    for e, p in planned:
        if e is not best_e:
            d = tps[e.name]
            head.append(f"engine {e.name}: {'slower' if d < tps[best_e.name] else 'not faster'}: {d:g} tok/s decode ({basis[e.name]})")
    head += [b for _, b in blocked] + verdicts
    best = replace(best, reasons=head + best.reasons)
    best = replace(best, compiled=best_e.compile(best))
    return replace(best, command=best_e.command(best))


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
            plan.reasons.append(f"context {ctx} (the default {ctx_candidates[0]} does not fit: {last_err.short})")
        return plan
    raise HybridError(last_err.problem, last_err.fix)


class _DoesNotFit(Exception):
    def __init__(self, problem, fix, short):
        self.problem, self.fix, self.short = problem, fix, short


class _Blocked(Exception):
    """The engine cannot run this placement at all (checked before its memory is counted)."""

    def __init__(self, reasons: list[str]):
        self.reasons = reasons


def _plan_at(hw, model, opts, rs, engine: Engine, ctx) -> Plan:
    kv_type = opts.kv_type
    kv_tok = engine.kv_bytes_per_token(model, kv_type)
    kv_layer = int(kv_tok * ctx / max(1, model.kv.layers))  # ctx is the total over all slots
    compute = _compute_bytes(model, ctx)
    gpus = {f"gpu:{g.index}": g for g in hw.gpus}
    runtime_gpu = engine.gpu_runtime_bytes
    runtime_cpu = engine.cpu_runtime_bytes

    def runtime_of(g) -> int:  # a worker reports its memory after its backend started: nothing more to reserve
        return 0 if g.remote else runtime_gpu

    budgets = {d: _vram_capacity(g) - compute - runtime_of(g) for d, g in gpus.items()}

    def cost(t: Tensor, dev: str) -> int:
        b = engine.tensor_bytes(t, dev)
        if dev != "cpu" and t.name.endswith(".attn_norm.weight"):
            b += kv_layer  # a block's KV cache lives where its attention does
        return b

    placement = rules.resolve(rs, model, budgets, cost)
    dev_of = placement.device_of
    warnings = list(placement.warnings)
    blocked = engine.blockers(model, dev_of, hw)
    if blocked:
        raise _Blocked(blocked)

    # Per-device accounting.
    devices = []
    groups: dict[str, dict[str, int]] = {}
    weights: dict[str, int] = {}
    kv: dict[str, int] = {}
    for t in model.tensors:
        d = dev_of[t.name]
        b = cost(t, d) - (kv_layer if d != "cpu" and t.name.endswith(".attn_norm.weight") else 0)
        weights[d] = weights.get(d, 0) + b
        groups.setdefault(d, {})
        groups[d][t.cls] = groups[d].get(t.cls, 0) + b
    # The KV cache of a layer lives on the device llama.cpp gives that layer (where its attention is).
    layer_dev = layer_devices(dev_of, model.block_count)
    kv_layers = {t.block for t in model.tensors if t.name.endswith(".attn_norm.weight")}
    for b in kv_layers:
        kv[layer_dev[b]] = kv.get(layer_dev[b], 0) + kv_layer
    for d, g in gpus.items():
        if d not in weights and d not in kv:
            continue
        rt = runtime_of(g)
        total = weights.get(d, 0) + kv.get(d, 0) + compute + rt
        cap = _vram_capacity(g)
        devices.append(DeviceUse(device=d, label=g.name, weights=weights.get(d, 0), kv_cache=kv.get(d, 0), compute=compute,
                                 runtime=rt, total=total, capacity=cap, groups=groups.get(d, {})))
        if total > cap:
            short = (total - cap) / GIB
            raise _DoesNotFit(
                f"{d} ({g.name}) needs {total / GIB:.1f} GiB but has {cap / GIB:.1f} GiB usable: {short:.1f} GiB short "
                f"(weights {weights.get(d, 0) / GIB:.1f}, KV {kv.get(d, 0) / GIB:.1f}, compute {compute / GIB:.1f})",
                "try --ctx 4096, --kv-type q4_0, or --rules moe-experts-on-cpu / layer-split", f"{d} {short:.1f} GiB short")
    numa_nodes = max(1, len(hw.numa_nodes))
    cpu_weights = weights.get("cpu", 0)
    expert_cpu = groups.get("cpu", {}).get("routed_experts", 0)
    ram_need_weights = cpu_weights
    extra, why = engine.extra_ram(expert_cpu, numa_nodes)
    if extra:
        ram_need_weights += extra
        warnings.append(why)
    # An engine whose CPU compute buffer holds activations, not logits for a whole ubatch, needs ~1/4 of `compute`
    # (Engine.full_cpu_compute_buffer; llama.cpp: 108 MiB measured for the mid model where `compute` is 370 MiB).
    full = engine.full_cpu_compute_buffer
    cpu_compute = compute if any(d == "cpu" for d in dev_of.values()) and not gpus and full else compute // 4
    ram_cap = _ram_capacity(hw)
    cache_ram = None
    if engine.prompt_cache_max is not None:
        # Its prompt cache keeps copies of slot states in RAM (multi-conversation prefix reuse); unplanned it grows to
        # the engine's own default (8 GiB for llama-server), the difference between fitting and swapping for a model
        # that fills RAM.
        kv_total = sum(kv.values())
        cache_ram = opts.cache_ram_mib * MIB if opts.cache_ram_mib is not None else min(engine.prompt_cache_max, kv_total)
        base = ram_need_weights + kv.get("cpu", 0) + cpu_compute + runtime_cpu
        if opts.cache_ram_mib is None and cache_ram and base + cache_ram > ram_cap:
            cache_ram = max(0, (ram_cap - base) // MIB * MIB)
            warnings.append(f"prompt cache in RAM cut to {cache_ram / GIB:.2f} GiB so the model fits (--cache-ram sets it)")
    ram_fixed = kv.get("cpu", 0) + cpu_compute + runtime_cpu + (cache_ram or 0)
    streaming, resident = False, 1.0
    if ram_need_weights + ram_fixed > ram_cap:
        short = (ram_need_weights + ram_fixed - ram_cap) / GIB
        avail_for_weights = max(0, ram_cap - ram_fixed)
        resident = avail_for_weights / ram_need_weights if ram_need_weights else 0.0
        fixes = (f"a smaller quant, {short:.0f}+ GiB more RAM, a bigger GPU, or --ctx/--kv-type q4_0 to "
                 "shrink the KV cache")
        if not opts.allow_streaming or resident < MIN_RESIDENT_FOR_STREAMING:
            why = "" if opts.allow_streaming else " (streaming disabled)"
            raise _DoesNotFit(
                f"{model.name or 'model'} does not fit: CPU side needs {(ram_need_weights + ram_fixed) / GIB:.1f} GiB, "
                f"RAM has {ram_cap / GIB:.1f} GiB usable — {short:.1f} GiB short; only {resident:.0%} could stay "
                f"cached{why}", f"use {fixes}", f"RAM {short:.1f} GiB short")
        streaming = True
        warnings.append(f"RAM is {short:.1f} GiB short of the CPU-side weights: planning to stream them from disk "
                        f"through the page cache (mmap); {resident:.0%} stay resident — expect the predicted, slow speed")
    ram_total = ram_need_weights + ram_fixed if not streaming else ram_cap
    mixed = "cpu" in dev_of.values() and len(set(dev_of.values())) > 1
    memory_notes = []
    repack = engine.repacked_types
    if repack and hw.cpu.isa != "generic" and maps_weights(opts.load_mode, streaming, mixed) and not streaming:
        repacked = sum(t.nbytes for t in model.tensors if dev_of[t.name] == "cpu" and len(t.shape) >= 2
                       and t.type in repack and t.cls != "token_embd")
        # A mapped embedding is only read a row per token: its pages are resident for the tokens seen, not whole.
        embd = sum(t.nbytes for t in model.tensors if dev_of[t.name] == "cpu" and t.cls == "token_embd")
        if repacked:
            # Clean file pages: in RSS while RAM lasts, dropped first when it does not, so not in the fit check.
            ram_total = min(ram_total + repacked, max(ram_total, ram_cap))
            memory_notes.append(f"CPU memory includes {repacked / GIB:.2f} GiB of {'/'.join(sorted(repack))} weights {engine.name} "
                                f"repacks for its {hw.cpu.isa} kernels (the mapped originals stay resident too)")
        ram_total -= embd
    devices.insert(0, DeviceUse(device="cpu", label=hw.cpu.model, weights=cpu_weights if not streaming else int(ram_cap - ram_fixed),
                                kv_cache=kv.get("cpu", 0), compute=cpu_compute, runtime=runtime_cpu,
                                total=int(ram_total), capacity=ram_cap, groups=groups.get("cpu", {}),
                                prompt_cache=cache_ram or 0))

    threads = opts.threads or hw.cpu.physical_cores
    if threads > hw.cpu.physical_cores:
        # Passed through as asked, but SMT siblings share one core's load ports: predict with the real cores.
        warnings.append(f"--threads {threads} is more than the {hw.cpu.physical_cores} physical cores: extra threads add no "
                        f"memory bandwidth and usually slow decode; the prediction uses {hw.cpu.physical_cores}")
    policy = engine.numa_policy(numa_nodes)
    numa = policy.flag if numa_nodes > 1 else ""
    params = engine.prediction_params
    if opts.ubatch:  # the experts' share of a prefill batch shrinks with it
        params = replace(params, ubatch=min(opts.ubatch, opts.batch or opts.ubatch))
    rates = hw.calibration.rates(engine.calibration_key(dev_of, streaming, opts.load_mode)) if hw.calibration else None
    pred = predict(model, hw, dev_of, params, threads, kv_type, resident,
                   gpu_cost=lambda t: engine.tensor_bytes(t, "gpu"), kv_bytes_per_token=kv_tok, parallel=opts.parallel,
                   rates=rates)
    reasons = list(memory_notes)
    reasons.append(f"rules {rs.name}: {rs.description.splitlines()[0] if rs.description else rs.source}")
    moved = sorted({t.block for t in model.tensors if t.cls == "routed_experts" and dev_of[t.name] != "cpu"})
    if model.is_moe and gpus and rs.name == "moe-auto-fill":
        reasons.append(f"auto-fill: routed experts of {len(moved)} block(s) on the GPU "
                       f"({ranges(moved) or 'none: no spare VRAM'}), the other {len(model.moe_blocks) - len(moved)} on the CPU")
    for g in hw.gpus:
        if g.remote and f"gpu:{g.index}" in set(dev_of.values()) | set(kv):
            reasons.append(f"gpu:{g.index} = {g.llama_device} on RPC worker {g.endpoint}: {g.vram_free / GIB:.1f} GiB as it "
                           f"reports; link {g.network_rtt_ms:g} ms round trip, {g.network_gbs:g} GB/s assumed, "
                           f"{pred.breakdown_ms.get('network', 0):g} ms/token in all; its memory bandwidth assumed "
                           f"{g.memory_bandwidth_gbs:g} GB/s")
    if opts.threads:
        reasons.append(f"threads {threads}: requested ({hw.cpu.physical_cores} physical cores)")
    else:
        reasons.append(f"threads {threads}: physical cores (hyperthreads add no memory bandwidth)")
    if numa_nodes > 1:
        reasons.append(policy.reason)
    if kv_type != "f16":
        reasons.append(f"KV cache {kv_type}: needs flash attention (on)")
    reasons.append(f"context {ctx} over {opts.parallel} slot(s); KV cache {engine.kv_form(model)} form, "
                   f"{kv_tok:,} B/token")
    if cache_ram is not None:
        reasons.append(f"prompt cache in RAM {cache_ram / MIB:.0f} MiB ({engine.name} --cache-ram; "
                       + ("set by --cache-ram)" if opts.cache_ram_mib is not None else
                          f"the KV cache size, at most {engine.prompt_cache_max / GIB:g} GiB)"))
    return Plan(
        model_name=model.name, model_path=model.paths[0], arch=model.arch, hardware=hw.id, engine=engine.name,
        rules=rs.name, rules_description=rs.description, ctx=ctx, parallel=opts.parallel, kv_type=kv_type,
        threads=threads, numa=numa, flash_attn=kv_type != "f16", streaming=streaming,
        resident_fraction=round(resident, 3), devices=devices, prediction=pred, reasons=reasons, warnings=warnings,
        n_layer=model.block_count, n_expert=model.expert_count, moe_blocks=model.moe_blocks,
        routed_types=sorted(model.groups["routed_experts"].types) if model.is_moe else [], device_of=dict(dev_of),
        gpu_devices={f"gpu:{g.index}": g.llama_device for g in hw.gpus},
        gpu_buffers={f"gpu:{g.index}": g.buffer_type for g in hw.gpus},
        rpc_servers=[g.endpoint for g in sorted((g for g in hw.gpus if g.endpoint), key=lambda g: int(g.llama_device[3:]))],
        cache_ram=cache_ram,
        batch=opts.batch or 0, ubatch=opts.ubatch or 0, load_mode=opts.load_mode,
    )
