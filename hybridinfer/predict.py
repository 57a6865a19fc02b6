"""Throughput prediction for a placement: decode from bytes touched per token on each device divided by that
device's bandwidth (plus compute, PCIe crossings and page-cache misses), prefill from compute. On a calibrated box
(calibration.py) the CPU side is instead the sum of its measured per-type costs.

The constants are fitted to published figures (docs/planning.md: "Prediction vs published figures"); every one is
here, named, with the reason for its value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .layers import layer_devices

if TYPE_CHECKING:
    from .calibration import EngineRates  # annotations only: engines import this module, and inspect asks the engines
    from .inspect_gguf import ModelInfo
    from .probe import HardwareProfile

# Sustained fraction of spec DRAM bandwidth a decode kernel reaches (STREAM-like reads are ~70-80 %).
CPU_BW_EFF = 0.75
GPU_BW_EFF = 0.70
# Quantized GEMV throughput per physical core during decode, GFLOP/s (2 FLOP per weight). Low-bit formats
# spend most of their time unpacking, so decode on a big core is compute-bound well below the bandwidth roof.
# avx2 measured on this project's Zen 3 VM with llama.cpp (benchmarks/measured_vs_predicted.py): the mid benchmark
# model (R1 UD-IQ1_S type mix, 5.2 GFLOP per token) decodes at 4.2-4.9 tok/s on one thread (from CPU time) and
# 8.7 tok/s on two (llama-bench tg128, quiet box); 30 GFLOP/s x llama.cpp's 0.85 predict 4.5 and 9.0. It also
# moves budget-2080ti (AVX2 Haswell) from 3.0 to 3.6 tok/s against its published 3-5.
DECODE_GFLOPS_PER_CORE = {"generic": 5.0, "avx2": 30.0, "avx512": 29.0, "amx": 29.0}
# Batched (prefill) throughput per core at a saturated batch: GEMM amortises the unpacking; AMX tiles help only
# KTransformers >= 0.3. avx2 measured on the same VM, 2 threads, quiet box (benchmarks/measured_vs_predicted.py):
# llama-bench pp512 on the mid model 23.2-26.2 (IQ1_S mix, three runs) and 22.9 tok/s (Q4_K_M mix) -> 84 with the
# expert-batch term below and llama.cpp's 0.85. AVX-512 was not measured here: the same kernels run on an AVX-512
# core at least as fast.
PREFILL_GFLOPS_PER_CORE = {"generic": 8.0, "avx2": 84.0, "avx512": 84.0, "amx": 84.0}
# Routed experts in a prefill batch each see only ubatch x used / count tokens, and a quantized GEMM over few rows
# does not amortise its unpacking: expert FLOPs cost (1 + N0 / tokens-per-expert) times the saturated rate.
# Measured on the mid model (llama-bench pp512, 2 threads, -ub 512 / 171 / 64 = 48 / 16 / 6 tokens per expert):
# 23.2 / 18.2 / 12.2 tok/s fit 1/rate = a + b/n with b/(expert share of the time) = 12 tokens. R1 at ubatch 512
# gets 16 tokens per expert (8 of 256), so its experts run at 57 % of the saturated rate, the mid model's at 80 %.
PREFILL_EXPERT_BATCH_N0 = 12.0
# Each hop of the hidden state between GPU and CPU (one MoE block with experts on the CPU = 2 hops).
HOP_SECONDS = 25e-6
# A remote (RPC) device: each run of consecutive layer parts computed there costs this many network round trips
# per token, plus the hidden state (n_embd f32) each way over the link, plus a fixed cost per run. ggml-rpc.cpp
# sends the inputs and the graph without waiting (set_tensor_async, GRAPH_COMPUTE/RECOMPUTE) and waits once,
# reading the outputs back for the next split; the fixed part (the graph (de)serialised, the worker woken, the
# scheduler's copies) is measured: tiny demo model (6 blocks), llama-bench tg128 on this project's 2-core box with a
# loopback worker, both OpenMP-passive — attention on the worker + experts on the CPU (6 runs per token) 5.41 ms
# per token, everything on the worker (1 run) 2.84 ms: 0.51 ms per extra run, of which 0.05 ms is the round trip.
RPC_ROUNDTRIPS_PER_SEGMENT = 1
RPC_SEGMENT_SECONDS = 0.46e-3
# Per-token fixed cost outside the layers: sampling, graph build, detokenize.
TOKEN_OVERHEAD_S = {"gpu": 0.3e-3, "cpu": 1e-3}
# GPU-resident layers cost a fixed time per token on top of their bytes: each block is ~15 kernel launches
# and a sync for attention, and MoE routing (router GEMV, top-k argsort, get_rows, one mul_mat_id per
# projection over the selected experts) roughly doubles that. Fitted to published fully-offloaded
# llama.cpp decode of Qwen3-30B-A3B Q4_K_M (48 MoE blocks, ~2 GB read per token): ~196 tok/s on an RTX 4090
# (runaihome.com, "Qwen3-30B-A3B Local AI Guide", 2026) and 166.9 tok/s at 4K context on an RTX 3090 Ti
# (smeltcore.com recipe "Qwen3-30B-A3B on RTX 3090 Ti") — both 1008 GB/s cards, where bytes / bandwidth
# alone says ~350 tok/s. 48 x (20 + 30) us + 0.3 ms + ~3 ms of reads = 5.7 ms -> 176 tok/s.
# Each extra sequence in a decode batch adds this fraction of one token's CPU compute time: most of a single
# token's "compute" is per-step work (thread start/sync, unpacking latency) that a batch shares.
# Fitted to the published "5 concurrent users, 6-8 tok/s each" on xeon4-ddr5-4090 (KTransformers, R1
# UD-IQ1_S, reference-machines table) against its ~12 tok/s for one user.
BATCH_COMPUTE_GROWTH = 0.05  # -> 6.5 tok/s each for 5 users
GPU_BLOCK_S = 20e-6  # per block whose attention runs on a GPU
GPU_MOE_BLOCK_S = 30e-6  # extra per block whose routed experts run on a GPU
# Page cache of mmapped expert weights: routing has locality, so the hit rate beats the resident fraction.
PAGE_CACHE_LOCALITY_EXP = 1 / 4  # hit = resident ** exp
GPU_FP16_TFLOPS_DEFAULT = 50.0
CONTEXT_FOR_DECODE = 1024  # the context length at which decode speed is quoted


@dataclass(frozen=True)
class PredictionParams:
    """What differs between engines in the model below; each engine module sets its own (engines/*.py)."""
    cpu_eff: float = 0.85  # kernel efficiency on CPU-resident MoE relative to the best engine's kernels
    prefill_gflops_per_core_amx: float | None = None  # batched GEMM per core with AMX tiles, if its kernels use them
    prefill_cpu_scale: float = 1.0  # measured prefill speed-up of its CPU kernels over the base figures
    prefill_uploads_weights: bool = False  # with a GPU, streams CPU-resident weights to it per ubatch for prefill
    ubatch: int = 512
    # Expert-batch term of CPU prefill (PREFILL_EXPERT_BATCH_N0, measured with llama.cpp's kernels); 0 where the
    # engine's per-core prefill figure was fitted to R1 itself.
    prefill_expert_batch_n0: float = PREFILL_EXPERT_BATCH_N0
    # A second NUMA node adds this fraction of its own bandwidth/compute (0 = none: one copy of the weights).
    numa_extra_node_gain: float = 0.0
    # CPU decode cost per FLOP by weight type, relative to DECODE_GFLOPS_PER_CORE ((type, factor) pairs; others 1.0),
    # and whether memory reads overlap compute (a token costs the larger, not the sum). CPU-only plans.
    cpu_type_cost: tuple[tuple[str, float], ...] = ()
    overlap_cpu_reads: bool = False


@dataclass(frozen=True)
class Prediction:
    decode_tps: float
    prefill_tps: float
    decode_limit_tps: float  # bandwidth roof of this placement on this box (no compute, no overhead)
    fraction_of_limit: float
    bound: str  # what dominates decode time
    breakdown_ms: dict[str, float]  # per-token decode time by part
    cpu_bytes_per_token: int
    gpu_bytes_per_token: int
    notes: list[str]
    parallel: int = 1  # slots decoding at once for the aggregate figure
    aggregate_decode_tps: float = 0.0  # tokens/s summed over `parallel` busy slots (one weight read per step)
    # Where the figures come from: "calibrated" (this box's measured per-type costs), "calibrated CPU, predicted
    # GPU", or "predicted" (the published-figure model: a profile of another box, or an uncalibrated one).
    source: str = "predicted"
    source_detail: str = ""  # e.g. "measured on this box 2026-12-04 (ik_llama.cpp -rtr, 2 threads)"


def frac(model: ModelInfo, cls: str) -> float:
    """The share of a tensor class's weights a token reads."""
    if cls == "nextn":  # an MTP block: the engines load it only to draft (llama.cpp: TENSOR_SKIP), never read it
        return 0.0
    if cls == "routed_experts" and model.expert_count:
        return model.expert_used_count / model.expert_count
    if cls == "token_embd":
        return 1 / max(1, model.vocab_size)
    return 1.0


def in_prefill(model: ModelInfo, t) -> bool:
    """Whether a tensor works on every prompt token. llama.cpp-family engines compute logits only for the tokens
    that need them and cut the last block's rows to those before its FFN (`inp_out_ids`), so the output layer and the
    last block's FFN see one token of a prompt."""
    if t.cls in ("output", "nextn"):
        return False
    last = model.block_count - 1 - model.nextn_layers  # the last block of the trunk (an MTP block follows it)
    return not (t.block == last and t.cls in ("dense_ffn", "shared_experts", "routed_experts", "router"))


def calibrated_cpu(model: ModelInfo, device_of: dict[str, str], rates: EngineRates, cores: int,
                   ubatch: int) -> tuple[float, float, float] | None:
    """Seconds per token of the CPU-resident weights from this box's calibration: (decode, of which routed
    experts, prefill per prompt token). None when a type on the CPU has no figure at all."""
    per_expert = ubatch * model.expert_used_count / model.expert_count if model.expert_count else ubatch
    batch_cost = 1 + rates.prefill_n0 / max(1.0, per_expert)
    dec = dec_exp = pre = 0.0
    blocks = set()
    for t in model.tensors:
        if device_of[t.name] != "cpu" or t.cls == "nextn":
            continue
        if t.block is not None:
            blocks.add(t.block)
        if len(t.shape) < 2 or t.type == "F32":  # norms and F32 routers: in the per-block cost, as calibrated
            continue
        d, p = rates.decode_cost(t.type), rates.prefill_cost(t.type)
        if d is None or p is None:
            return None
        w = t.n_elements * frac(model, t.cls)
        if t.cls == "routed_experts":
            dec += w * d
            dec_exp += w * d
            if in_prefill(model, t):
                pre += w * p * batch_cost
        else:
            dec += w * d * rates.dense_decode
            if in_prefill(model, t):
                pre += w * p * rates.dense_prefill
    # Fewer threads than calibrated: the kernels are compute-bound on these boxes, time grows with fewer cores.
    scale = max(1.0, rates.threads / max(1, cores))
    heads = model.head_count - rates.heads
    blk_dec = rates.block_decode_us + heads * rates.head_decode_us
    # attention over the prompt: a prompt of one ubatch averages ubatch/2 tokens of context per token
    blk_pre = rates.block_prefill_us + heads * rates.head_prefill_us * ubatch / rates.prompt_tokens
    dec = (dec * 1e-9 + len(blocks) * max(0.0, blk_dec) * 1e-6) * scale
    pre = (pre * 1e-9 + len(blocks) * max(0.0, blk_pre) * 1e-6) * scale
    return dec, dec_exp * 1e-9 * scale, pre


@dataclass(frozen=True)
class PredictInput:
    """Everything `predict` reads: a placement of a model on a box, run by an engine."""
    model: ModelInfo
    hw: HardwareProfile
    device_of: dict[str, str]  # tensor name -> "cpu" | "gpu:N"
    params: PredictionParams  # the engine's (engine.prediction_params)
    threads: int
    kv_type: str
    resident_fraction: float = 1.0  # share of the CPU-side weights the page cache holds (streaming: < 1)
    gpu_cost: Callable | None = None  # t -> bytes the engine reads for t on a GPU (None: the file's bytes)
    kv_bytes_per_token: int | None = None  # None: the model's figure for kv_type
    parallel: int = 1
    rates: EngineRates | None = None  # this box's calibration of the engine: replaces the CPU side's modelled costs


@dataclass
class _Traffic:
    """Bytes and FLOPs per token on each side of the placement (one pass over the tensors)."""
    cpu_b: float = 0.0  # bytes read per token on the CPU (routed experts: the used share)
    cpu_flops: float = 0.0
    cpu_expert_b: float = 0.0  # of cpu_b, routed experts
    cpu_b_all: float = 0.0  # every CPU-resident byte (what a prefill upload streams)
    cpu_prefill_flops: float = 0.0
    gpu_b: dict = field(default_factory=dict)  # device -> bytes per token
    gpu_flops: dict = field(default_factory=dict)
    gpu_moe_blocks: set = field(default_factory=set)
    attn_cpu: int = 0  # layers whose attention runs on the CPU / a GPU
    attn_gpu: int = 0
    blocks_dev: dict = field(default_factory=dict)  # block -> {"cpu", "gpu"}


def _traffic(inp: PredictInput) -> _Traffic:
    model, p = inp.model, inp.params
    gpu_cost = inp.gpu_cost or (lambda t: t.nbytes)
    per_expert = p.ubatch * model.expert_used_count / model.expert_count if model.expert_count else p.ubatch
    expert_batch_cost = 1 + p.prefill_expert_batch_n0 / max(1.0, per_expert)
    cpu_only = set(inp.device_of.values()) == {"cpu"}
    type_cost = dict(p.cpu_type_cost) if cpu_only else {}  # measured for CPU-only plans only
    tr = _Traffic()
    for t in model.tensors:
        if t.cls == "nextn":  # not computed per token (frac): neither read nor a block of the token's path
            continue
        dev = inp.device_of[t.name]
        f = frac(model, t.cls)
        if t.block is not None:
            tr.blocks_dev.setdefault(t.block, set()).add("cpu" if dev == "cpu" else "gpu")
            if t.name.endswith("attn_norm.weight"):
                if dev == "cpu":
                    tr.attn_cpu += 1
                else:
                    tr.attn_gpu += 1
        if dev == "cpu":
            tr.cpu_b += t.nbytes * f
            tr.cpu_flops += 2 * t.n_elements * f * type_cost.get(t.type, 1.0)
            tr.cpu_b_all += t.nbytes
            tr.cpu_prefill_flops += 2 * t.n_elements * f * (expert_batch_cost if t.cls == "routed_experts" else 1.0)
            if t.cls == "routed_experts":
                tr.cpu_expert_b += t.nbytes * f
        else:
            tr.gpu_b[dev] = tr.gpu_b.get(dev, 0.0) + gpu_cost(t) * f
            tr.gpu_flops[dev] = tr.gpu_flops.get(dev, 0.0) + 2 * t.n_elements * f
            if t.cls == "routed_experts":
                tr.gpu_moe_blocks.add(t.block)
    return tr


def _token_path(model: ModelInfo, device_of: dict[str, str]) -> list[str]:
    """The token's path through the devices, in compute order: each block's attention (its layer's device), then
    its routed experts, then the output layer."""
    layer_dev = layer_devices(device_of, model.block_count)
    exp_dev: dict[int, str] = {}
    for t in model.tensors:
        if t.cls == "routed_experts" and t.block is not None:
            exp_dev[t.block] = device_of[t.name]
    path = []
    for b in range(model.block_count):
        path += [layer_dev[b]] + ([exp_dev[b]] if b in exp_dev else [])
    path.append(layer_dev[-1])
    return path


def _hops_and_network(inp: PredictInput, tr: _Traffic) -> tuple[int, float, dict]:
    """PCIe crossings per token, seconds per token on the network to remote devices, and the remote devices."""
    hops = sum(2 for devs in tr.blocks_dev.values() if len(devs) > 1)
    # A layer split crosses once each way at the CPU/GPU boundary.
    if hops == 0 and len({d for s in tr.blocks_dev.values() for d in s}) > 1:
        hops = 2
    # GPU-to-GPU changes are extra hops; runs on remote devices cost network round trips.
    path = _token_path(inp.model, inp.device_of)
    hops += sum(1 for a, b in zip(path, path[1:]) if a != b and a != "cpu" and b != "cpu")
    remote = {f"gpu:{g.index}": g for g in inp.hw.gpus if g.remote}
    t_net = 0.0
    for i, d in enumerate(path):
        if d in remote and (i == 0 or path[i - 1] != d):
            g = remote[d]
            t_net += RPC_ROUNDTRIPS_PER_SEGMENT * g.network_rtt_ms / 1e3 + RPC_SEGMENT_SECONDS
            t_net += 2 * inp.model.embedding_length * 4 / ((g.network_gbs or 1.25) * 1e9)
    return hops, t_net, remote


@dataclass(frozen=True)
class _Box:
    """The box's side of the model: bandwidth, cores, NUMA share."""
    bw: float  # bytes/s, whole box
    cores: int
    numa_scale: float  # fraction of the sum over nodes the engine reaches
    kv_read_cpu: float  # KV cache bytes read per token at CONTEXT_FOR_DECODE, CPU and GPU layers
    kv_read_gpu: float


def _box(inp: PredictInput, tr: _Traffic) -> _Box:
    model, hw = inp.model, inp.hw
    kv_tok = inp.kv_bytes_per_token or model.kv.bytes_per_token.get(inp.kv_type, model.kv.bytes_per_token["f16"])
    n_layers = max(1, tr.attn_cpu + tr.attn_gpu)
    nodes = max(1, len(hw.numa_nodes))
    return _Box(bw=hw.memory_bandwidth_gbs * 1e9, cores=min(inp.threads, hw.cpu.physical_cores),
                numa_scale=(1 + inp.params.numa_extra_node_gain * (nodes - 1)) / nodes,
                kv_read_cpu=kv_tok * CONTEXT_FOR_DECODE * tr.attn_cpu / n_layers,
                kv_read_gpu=kv_tok * CONTEXT_FOR_DECODE * tr.attn_gpu / n_layers)


def _gpu_bw(hw: HardwareProfile, dev: str) -> float:
    g = next((g for g in hw.gpus if f"gpu:{g.index}" == dev), None)
    return (g.memory_bandwidth_gbs if g and g.memory_bandwidth_gbs else 500.0) * 1e9


def _decode_parts(inp: PredictInput, tr: _Traffic, box: _Box, cal, hops: int) -> dict[str, float]:
    """Seconds per token by part (before disk and network)."""
    eff, isa = inp.params.cpu_eff, inp.hw.cpu.isa
    t_cpu_bw = (tr.cpu_b + box.kv_read_cpu) / (box.bw * CPU_BW_EFF * box.numa_scale) if tr.cpu_b else 0.0
    t_cpu_compute = (tr.cpu_flops / (box.cores * DECODE_GFLOPS_PER_CORE[isa] * 1e9 * box.numa_scale * eff)
                     if tr.cpu_flops else 0.0)
    if cal:  # measured per-type costs include the weights' reads: only the KV cache is left to bandwidth
        t_cpu_compute = cal[0]
        t_cpu_bw = box.kv_read_cpu / (box.bw * CPU_BW_EFF) if tr.cpu_b else 0.0
    t_gpu = 0.0
    for dev, b in tr.gpu_b.items():
        t_gpu += (b + box.kv_read_gpu * b / max(1.0, sum(tr.gpu_b.values()))) / (_gpu_bw(inp.hw, dev) * GPU_BW_EFF)
    t_hops = hops * HOP_SECONDS if tr.gpu_b else 0.0
    t_fixed = TOKEN_OVERHEAD_S["gpu" if tr.gpu_b else "cpu"] + (
        tr.attn_gpu * GPU_BLOCK_S + len(tr.gpu_moe_blocks) * GPU_MOE_BLOCK_S if tr.gpu_b else 0.0)
    if cal and not tr.gpu_b:  # the calibration's per-block and per-token costs replace the modelled fixed cost
        t_fixed = inp.rates.token_us * 1e-6
    return {"cpu_memory": t_cpu_bw, "cpu_compute": t_cpu_compute, "gpu": t_gpu, "pcie_hops": t_hops, "fixed": t_fixed}


def _disk(inp: PredictInput, tr: _Traffic, notes: list[str]) -> float:
    """Seconds per token reading expert pages the page cache does not hold (streaming)."""
    if inp.resident_fraction >= 1.0:
        return 0.0
    hit = inp.resident_fraction ** PAGE_CACHE_LOCALITY_EXP
    miss_bytes = tr.cpu_expert_b * (1 - hit)
    notes.append(f"{inp.resident_fraction:.0%} of CPU-side weights stay in the page cache; ~{1 - hit:.0%} of expert "
                 f"reads ({miss_bytes / 1e9:.2f} GB/token) come from disk at {inp.hw.disk_read_gbs:g} GB/s")
    return miss_bytes / (inp.hw.disk_read_gbs * 1e9)


def _limit(inp: PredictInput, tr: _Traffic, box: _Box, decode: float) -> float:
    """The bandwidth roof of this placement on this box: bytes / spec bandwidth, nothing else."""
    limit_t = (tr.cpu_b + box.kv_read_cpu) / box.bw if tr.cpu_b else 0.0
    for dev, b in tr.gpu_b.items():
        limit_t += b / _gpu_bw(inp.hw, dev)
    if inp.resident_fraction < 1.0:
        limit_t += (tr.cpu_expert_b * (1 - inp.resident_fraction ** PAGE_CACHE_LOCALITY_EXP)
                    / (inp.hw.disk_read_gbs * 1e9))
    return 1 / limit_t if limit_t else decode


def _prefill(inp: PredictInput, tr: _Traffic, box: _Box, cal, t_disk: float, notes: list[str]) -> float:
    """Prefill tok/s: compute-bound. Some engines with a GPU upload CPU-resident weights over PCIe for big batches
    (one ubatch) when that beats computing them on the CPU."""
    p, hw = inp.params, inp.hw
    if p.prefill_gflops_per_core_amx and hw.cpu.isa == "amx":
        pre_core = p.prefill_gflops_per_core_amx
    else:
        pre_core = PREFILL_GFLOPS_PER_CORE[hw.cpu.isa] * p.prefill_cpu_scale
    t_pre_cpu = (tr.cpu_prefill_flops / (box.cores * pre_core * 1e9 * box.numa_scale * p.cpu_eff)
                 if tr.cpu_prefill_flops else 0.0)
    if cal:
        t_pre_cpu = cal[2]
    local = [g for g in hw.gpus if not g.remote]  # ggml-rpc offers no op offload (offload_op = NULL)
    if p.prefill_uploads_weights and tr.gpu_b and local:
        t_upload = tr.cpu_b_all / (local[0].pcie_gbs * 0.8e9) / p.ubatch
        if t_upload < t_pre_cpu:
            t_pre_cpu = t_upload
            notes.append(f"prefill: the engine streams CPU-resident weights to the GPU per {p.ubatch}-token batch")
    # A layer split runs its GPUs one after the other: each computes its own layers, the times add up.
    gpus = {f"gpu:{g.index}": g for g in hw.gpus}
    t_pre_gpu = sum(f / ((gpus[d].fp16_tflops if d in gpus and gpus[d].fp16_tflops else GPU_FP16_TFLOPS_DEFAULT)
                         * 1e12 * 0.35) for d, f in tr.gpu_flops.items())
    return 1 / max(1e-9, t_pre_cpu + t_pre_gpu + (t_disk if inp.resident_fraction < 1 else 0.0) / 8)


def _aggregate(inp: PredictInput, tr: _Traffic, box: _Box, cal, parts: dict[str, float], decode: float,
               notes: list[str]) -> float:
    """N busy slots decode as one batch per step: the dense weights are read once for all N; each MoE block reads
    the union of the experts its N tokens chose (1 - (1 - k/E)^N of them); compute and KV reads scale with N;
    per-layer fixed costs are paid once per step."""
    n, model = inp.parallel, inp.model
    if n <= 1:
        return decode
    k_e = model.expert_used_count / model.expert_count if model.expert_count else 1.0
    union = (1 - (1 - k_e) ** n) / k_e if model.expert_count else 1.0
    cpu_dense_b = tr.cpu_b - tr.cpu_expert_b
    t_bw_n = ((cpu_dense_b + tr.cpu_expert_b * union + box.kv_read_cpu * n)
              / (box.bw * CPU_BW_EFF * box.numa_scale)) if tr.cpu_b else 0.0
    growth = n - 1
    t_cpu_n = parts["cpu_compute"] * (1 + BATCH_COMPUTE_GROWTH * growth)
    if cal:  # measured costs hold the reads: the experts' part grows with the union they touch
        t_bw_n = box.kv_read_cpu * n / (box.bw * CPU_BW_EFF) if tr.cpu_b else 0.0
        t_cpu_n = (parts["cpu_compute"] - cal[1]) * (1 + BATCH_COMPUTE_GROWTH * growth) + cal[1] * union
    t_step = (t_bw_n + t_cpu_n + parts["gpu"] * (1 + 0.02 * growth)
              + parts["pcie_hops"] + parts["disk"] * union + parts["fixed"] + TOKEN_OVERHEAD_S["cpu"] * 0.1 * growth)
    aggregate = n / t_step
    notes.append(f"{n} busy slots: ~{aggregate:.1f} tok/s in total, ~{aggregate / n:.1f} each")
    return aggregate


def predict(inp: PredictInput) -> Prediction:
    """Decode, prefill and aggregate speed of one placement; on a calibrated box (`inp.rates`) the CPU side is the
    sum of its measured costs."""
    tr = _traffic(inp)
    box = _box(inp, tr)
    hops, t_net, remote = _hops_and_network(inp, tr)
    rates = inp.rates
    cal = calibrated_cpu(inp.model, inp.device_of, rates, box.cores, inp.params.ubatch) if rates and tr.cpu_b else None
    notes: list[str] = []
    parts = _decode_parts(inp, tr, box, cal, hops)
    parts = {**{k: parts[k] for k in ("cpu_memory", "cpu_compute", "gpu", "pcie_hops")},
             "disk": _disk(inp, tr, notes), "fixed": parts["fixed"]}
    if remote:
        parts["network"] = t_net
    total = sum(parts.values())
    if inp.params.overlap_cpu_reads and set(inp.device_of.values()) == {"cpu"} and not cal:
        total -= min(parts["cpu_memory"], parts["cpu_compute"])
    decode = 1 / total
    limit = _limit(inp, tr, box, decode)
    prefill = _prefill(inp, tr, box, cal, parts["disk"], notes)
    aggregate = _aggregate(inp, tr, box, cal, parts, decode, notes)
    return Prediction(
        decode_tps=round(decode, 2), prefill_tps=round(prefill, 1), decode_limit_tps=round(limit, 2),
        fraction_of_limit=round(decode / limit, 3) if limit else 1.0, bound=max(parts, key=parts.get),
        breakdown_ms={k: round(v * 1e3, 3) for k, v in parts.items()},
        cpu_bytes_per_token=int(tr.cpu_b), gpu_bytes_per_token=int(sum(tr.gpu_b.values())), notes=notes,
        parallel=inp.parallel, aggregate_decode_tps=round(aggregate, 2),
        source=("calibrated" if not tr.gpu_b else "calibrated CPU, predicted GPU") if cal else "predicted",
        source_detail=f"{rates.key}, {rates.threads} threads" if cal else "",
    )
