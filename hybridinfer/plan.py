"""Stage 4 — plan: (HardwareProfile, ModelInfo, PlanOptions) -> `Plan`: engine, placement of every tensor,
threads, NUMA policy, context and slots, memory per device and predicted speed — before anything loads.

`make_plan` takes data, never paths; it refuses with a `HybridError` naming the shortfall and the fixes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from . import kernels, rules
from .errors import HybridError
from .inspect_gguf import ModelInfo, Tensor
from .predict import Prediction, predict
from .probe import HardwareProfile
from .util import GIB, MIB, from_dict, to_dict

KV_TYPES = ("f16", "q8_0", "q4_0")
LOAD_MODES = ("auto", "mmap", "ram")
ENGINES = ("auto", "llama.cpp", "ktransformers")
UBATCH = 512
GPU_MARGIN = int(0.75 * GIB)  # VRAM left free for the driver and fragmentation
GPU_RUNTIME = {"llama.cpp": int(0.45 * GIB), "ktransformers": int(1.2 * GIB)}  # CUDA context, cuBLAS, torch
# Process memory beyond the engine's buffers: llama-server's RSS on the mid benchmark model is its buffers plus
# <0.1 GiB (benchmarks/results/measured_vs_predicted.json); KTransformers carries Python and torch.
CPU_RUNTIME = {"llama.cpp": int(0.1 * GIB), "ktransformers": int(0.5 * GIB)}
# ggml's CPU backend repacks weights of these types (matrices and expert stacks alike; not the embedding, which
# it only gathers rows from) into its CPU_REPACK buffer for its AVX2/AVX-512 kernels (ggml-cpu/repack.cpp; load
# log: "repack tensor blk.0.attn_q.weight with q4_K_8x8"). With the file mapped, the originals stay mapped too:
# RSS counts those bytes twice (measured: the mid model's Q4_K_M variant). The originals are never read again,
# so under memory pressure they are the first pages dropped: the fit check does not count them.
REPACKED_TYPES = {"Q4_0", "Q4_K", "IQ4_NL"}
MIN_RESIDENT_FOR_STREAMING = 0.20  # below this share of CPU weights in RAM, streaming is too slow to offer
KT_MARLIN_BITS = 4.25  # KTransformers runs GPU-resident experts as Marlin int4 (+ group scales)


@dataclass(frozen=True)
class PlanOptions:
    rules: str | None = None  # name or path; None = choose for the box
    engine: str = "auto"
    ctx: int | None = None
    parallel: int = 1
    kv_type: str = "f16"
    threads: int | None = None
    allow_streaming: bool = True
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
    numa: str  # llama.cpp --numa value, "" for none
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


def maps_weights(load_mode: str, streaming: bool, mixed: bool) -> bool:
    """Whether the engine maps the weights file (mmap) rather than reading it into RAM: asked for, needed for
    streaming, or (auto) unless experts stay on the CPU beside a GPU, where read-in weights run faster."""
    return streaming or load_mode == "mmap" or (load_mode == "auto" and not mixed)


def default_rules(hw: HardwareProfile, model: ModelInfo) -> str:
    if not hw.gpus:
        return "cpu-only"
    if not model.is_moe:
        return "layer-split"
    return "multi-gpu" if len(hw.gpus) > 1 else "moe-auto-fill"


def _kv_layer_bytes(model: ModelInfo, kv_type: str, ctx: int) -> int:
    """KV bytes for one layer at ctx tokens (llama.cpp: -c is the total over all slots)."""
    per_tok = model.kv.bytes_per_token[kv_type]
    return int(per_tok * ctx / max(1, model.kv.layers))


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


def choose_engine(hw: HardwareProfile, model: ModelInfo, requested: str, rules_name: str) -> tuple[str, list[str]]:
    reasons = []
    kt = hw.engine("ktransformers") or hw.engine("kt-kernel")
    routed = set(model.groups["routed_experts"].types) if model.is_moe else set()
    if requested == "llama.cpp":
        return "llama.cpp", ["engine llama.cpp: requested"]
    blockers = []
    if not model.is_moe:
        blockers.append("dense model: no routed experts to keep on the CPU")
    if not hw.gpus:
        blockers.append("no NVIDIA GPU: KTransformers runs attention on CUDA")
    if model.arch != "deepseek2":
        blockers.append(f"architecture {model.arch}: hybridinfer compiles KTransformers rules for DeepSeek V2/V3/R1 only")
    bad = sorted(routed - kernels.KT_CPU_EXPERTS)
    if bad:
        blockers.append(f"routed experts in {'/'.join(bad)} are not computed by its CPU kernel (would run silently wrong)")
    nonexp = set()
    for name, g in model.groups.items():
        if name != "routed_experts":
            nonexp |= set(g.types)
    if nonexp - kernels.KT_DEQUANT_PATCHED:
        blockers.append(f"{'/'.join(sorted(nonexp - kernels.KT_DEQUANT_PATCHED))} tensors cannot be dequantized")
    if rules_name in ("layer-split", "cpu-only", "multi-gpu"):
        blockers.append(f"rules {rules_name}: KTransformers places only routed experts off the GPU")
    if requested == "ktransformers":
        if blockers:
            raise HybridError(f"KTransformers cannot run this plan: {blockers[0]}", "use --engine llama.cpp (or auto)")
        reasons.append("engine ktransformers: requested")
        if not kt:
            reasons.append("note: KTransformers is not installed on this box; the command is what it would run")
        return "ktransformers", reasons
    if not kt:
        blockers.insert(0, "KTransformers is not installed")
    if blockers:
        return "llama.cpp", [f"engine llama.cpp: {blockers[0]}"] + [f"  also: {b}" for b in blockers[1:3]]
    why = "installed, NVIDIA GPU present, DeepSeek architecture, every routed-expert type runs on its CPU kernel"
    patch = nonexp - kernels.KT_DEQUANT
    if patch and "IQ patch: applied" in (kt.detail if kt else ""):
        why += f"; {'/'.join(sorted(patch))} load through hybridinfer's patch (applied)"
    elif patch:
        why += f"; needs `hybridinfer patch ktransformers --apply` for {'/'.join(sorted(patch))}"
    return "ktransformers", [f"engine ktransformers: {why}"]


def make_plan(hw: HardwareProfile, model: ModelInfo, opts: PlanOptions = PlanOptions()) -> Plan:
    if opts.kv_type not in KV_TYPES:
        raise HybridError(f"unknown KV cache type '{opts.kv_type}'", f"use one of {', '.join(KV_TYPES)}")
    if opts.engine not in ENGINES:
        raise HybridError(f"unknown engine '{opts.engine}'", f"use one of {', '.join(ENGINES)}")
    if opts.parallel < 1:
        raise HybridError(f"--parallel must be at least 1, not {opts.parallel}", "use --parallel 1 for one user")
    if opts.load_mode not in LOAD_MODES:
        raise HybridError(f"unknown load mode '{opts.load_mode}'", f"use one of {', '.join(LOAD_MODES)}")
    for flag, v in (("--batch", opts.batch), ("--ubatch", opts.ubatch)):
        if v is not None and v < 1:
            raise HybridError(f"{flag} must be at least 1, not {v}", f"drop {flag} for the engine's default")
    try:
        return _make_plan(hw, model, opts, rules.load(opts.rules or default_rules(hw, model)))
    except HybridError as first:
        # With no rules asked for, a GPU too small for the attention side still allows a layer split.
        if opts.rules or not hw.gpus or default_rules(hw, model) == "layer-split" or "gpu:" not in str(first):
            raise
        plan = _make_plan(hw, model, opts, rules.load("layer-split"))
        plan.reasons.insert(0, f"rules layer-split chosen because {default_rules(hw, model)} does not fit: {first.problem}")
        return plan


def _make_plan(hw: HardwareProfile, model: ModelInfo, opts: PlanOptions, rs: rules.RuleSet) -> Plan:
    engine, reasons = choose_engine(hw, model, opts.engine, rs.name)
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
            plan = _plan_at(hw, model, opts, rs, engine, reasons, ctx)
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


def _plan_at(hw, model, opts, rs, engine, reasons, ctx) -> Plan:
    kv_type = opts.kv_type
    kv_layer = _kv_layer_bytes(model, kv_type, ctx)
    compute = _compute_bytes(model, ctx)
    gpus = {f"gpu:{g.index}": g for g in hw.gpus}
    runtime_gpu = GPU_RUNTIME.get(engine, GPU_RUNTIME["llama.cpp"])
    budgets = {d: _vram_capacity(g) - compute - runtime_gpu for d, g in gpus.items()}

    def marlin(t: Tensor) -> int:
        return int(t.n_elements * KT_MARLIN_BITS / 8)

    def cost(t: Tensor, dev: str) -> int:
        b = t.nbytes
        if dev != "cpu" and engine == "ktransformers" and t.cls == "routed_experts":
            b = max(b, marlin(t))
        if dev != "cpu" and t.name.endswith(".attn_norm.weight"):
            b += kv_layer  # a block's KV cache lives where its attention does
        return b

    placement = rules.resolve(rs, model, budgets, cost)
    dev_of = placement.device_of
    warnings = list(placement.warnings)

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
        if t.name.endswith(".attn_norm.weight"):
            kv[d] = kv.get(d, 0) + kv_layer
    for d, g in gpus.items():
        if d not in weights:
            continue
        total = weights[d] + kv.get(d, 0) + compute + runtime_gpu
        cap = _vram_capacity(g)
        devices.append(DeviceUse(device=d, label=g.name, weights=weights[d], kv_cache=kv.get(d, 0), compute=compute,
                                 runtime=runtime_gpu, total=total, capacity=cap, groups=groups.get(d, {})))
        if total > cap:
            short = (total - cap) / GIB
            raise _DoesNotFit(
                f"{d} ({g.name}) needs {total / GIB:.1f} GiB but has {cap / GIB:.1f} GiB usable: {short:.1f} GiB short "
                f"(weights {weights[d] / GIB:.1f}, KV {kv.get(d, 0) / GIB:.1f}, compute {compute / GIB:.1f})",
                "try --ctx 4096, --kv-type q4_0, or --rules moe-experts-on-cpu / layer-split", f"{d} {short:.1f} GiB short")
    numa_nodes = max(1, len(hw.numa_nodes))
    cpu_weights = weights.get("cpu", 0)
    expert_cpu = groups.get("cpu", {}).get("routed_experts", 0)
    ram_need_weights = cpu_weights
    if engine == "ktransformers" and numa_nodes > 1:
        ram_need_weights += expert_cpu * (numa_nodes - 1)
        warnings.append(f"KTransformers legacy with USE_NUMA=1 keeps a copy of the CPU experts per NUMA node: "
                        f"{numa_nodes} x {expert_cpu / GIB:.1f} GiB of RAM")
    # llama.cpp's CPU compute buffer holds activations, not logits for a whole ubatch: ~1/4 of `compute`
    # (108 MiB measured for the mid model at ubatch 512, vocab 102k, where `compute` is 370 MiB).
    cpu_compute = compute if any(d == "cpu" for d in dev_of.values()) and not gpus and engine != "llama.cpp" else compute // 4
    cpu_runtime = CPU_RUNTIME.get(engine, CPU_RUNTIME["ktransformers"])
    ram_fixed = kv.get("cpu", 0) + cpu_compute + cpu_runtime
    ram_cap = _ram_capacity(hw)
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
    if engine == "llama.cpp" and hw.cpu.isa != "generic" and maps_weights(opts.load_mode, streaming, mixed) and not streaming:
        repacked = sum(t.nbytes for t in model.tensors if dev_of[t.name] == "cpu" and len(t.shape) >= 2
                       and t.type in REPACKED_TYPES and t.cls != "token_embd")
        # A mapped embedding is only read a row per token: its pages are resident for the tokens seen, not whole.
        embd = sum(t.nbytes for t in model.tensors if dev_of[t.name] == "cpu" and t.cls == "token_embd")
        if repacked:
            # Clean file pages: in RSS while RAM lasts, dropped first when it does not, so not in the fit check.
            ram_total = min(ram_total + repacked, max(ram_total, ram_cap))
            memory_notes.append(f"CPU memory includes {repacked / GIB:.2f} GiB of {'/'.join(sorted(REPACKED_TYPES))} weights llama.cpp "
                                f"repacks for its {hw.cpu.isa} kernels (the mapped originals stay resident too)")
        ram_total -= embd
    devices.insert(0, DeviceUse(device="cpu", label=hw.cpu.model, weights=cpu_weights if not streaming else int(ram_cap - ram_fixed),
                                kv_cache=kv.get("cpu", 0), compute=cpu_compute, runtime=cpu_runtime,
                                total=int(ram_total), capacity=ram_cap, groups=groups.get("cpu", {})))

    threads = opts.threads or hw.cpu.physical_cores
    if threads > hw.cpu.physical_cores:
        # Passed through as asked, but SMT siblings share one core's load ports: predict with the real cores.
        warnings.append(f"--threads {threads} is more than the {hw.cpu.physical_cores} physical cores: extra threads add no "
                        f"memory bandwidth and usually slow decode; the prediction uses {hw.cpu.physical_cores}")
    numa = "distribute" if numa_nodes > 1 and engine == "llama.cpp" else ""
    pred = predict(model, hw, dev_of, engine, threads, kv_type, resident,
                   gpu_cost=(lambda t: max(t.nbytes, marlin(t))) if engine == "ktransformers" else None,
                   parallel=opts.parallel)
    reasons = list(reasons) + memory_notes
    reasons.append(f"rules {rs.name}: {rs.description.splitlines()[0] if rs.description else rs.source}")
    moved = sorted({t.block for t in model.tensors if t.cls == "routed_experts" and dev_of[t.name] != "cpu"})
    if model.is_moe and gpus and rs.name == "moe-auto-fill":
        reasons.append(f"auto-fill: routed experts of {len(moved)} block(s) on the GPU "
                       f"({_ranges(moved) or 'none: no spare VRAM'}), the other {len(model.moe_blocks) - len(moved)} on the CPU")
    if opts.threads:
        reasons.append(f"threads {threads}: requested ({hw.cpu.physical_cores} physical cores)")
    else:
        reasons.append(f"threads {threads}: physical cores (hyperthreads add no memory bandwidth)")
    if numa_nodes > 1:
        reasons.append(f"NUMA: {numa_nodes} nodes; " + ("llama.cpp --numa distribute spreads threads and pages"
                                                        if engine == "llama.cpp" else "one KTransformers thread pool per node"))
    if kv_type != "f16":
        reasons.append(f"KV cache {kv_type}: needs flash attention (on)")
    reasons.append(f"context {ctx} over {opts.parallel} slot(s); KV cache {model.kv.form} form, "
                   f"{model.kv.bytes_per_token[kv_type]:,} B/token")
    return Plan(
        model_name=model.name, model_path=model.paths[0], arch=model.arch, hardware=hw.id, engine=engine,
        rules=rs.name, rules_description=rs.description, ctx=ctx, parallel=opts.parallel, kv_type=kv_type,
        threads=threads, numa=numa, flash_attn=kv_type != "f16", streaming=streaming,
        resident_fraction=round(resident, 3), devices=devices, prediction=pred, reasons=reasons, warnings=warnings,
        n_layer=model.block_count, n_expert=model.expert_count, moe_blocks=model.moe_blocks,
        routed_types=sorted(model.groups["routed_experts"].types) if model.is_moe else [], device_of=dict(dev_of),
        batch=opts.batch or 0, ubatch=opts.ubatch or 0, load_mode=opts.load_mode,
    )


def _ranges(xs: list[int]) -> str:
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(f"{xs[i]}" if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)
