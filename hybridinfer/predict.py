"""Throughput prediction for a placement: decode from bytes touched per token on each device divided by that
device's bandwidth (plus compute, PCIe crossings and page-cache misses), prefill from compute.

The constants are calibrated against published figures (README: "Prediction vs published"); every one is here,
named, with the reason for its value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .layers import layer_devices

if TYPE_CHECKING:  # annotations only: engines import this module, and inspect asks the engines
    from .inspect_gguf import ModelInfo
    from .probe import HardwareProfile

# Sustained fraction of spec DRAM bandwidth a decode kernel reaches (STREAM-like reads are ~70-80 %).
CPU_BW_EFF = 0.75
GPU_BW_EFF = 0.70
# Quantized GEMV throughput per physical core during decode, GFLOP/s (2 FLOP per weight). Low-bit formats
# spend most of their time unpacking, so decode on a big core is compute-bound well below the bandwidth roof.
DECODE_GFLOPS_PER_CORE = {"generic": 5.0, "avx2": 18.0, "avx512": 29.0, "amx": 29.0}
# Batched (prefill) throughput per core: GEMM amortises the unpacking; AMX tiles help only KTransformers >= 0.3.
PREFILL_GFLOPS_PER_CORE = {"generic": 8.0, "avx2": 30.0, "avx512": 55.0, "amx": 55.0}
# A second NUMA node adds this fraction of its own bandwidth/compute (cross-node traffic, imperfect split).
NUMA_EXTRA_NODE_GAIN = 0.45
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
# Per-token fixed cost: sampling, graph build/launch, detokenize.
TOKEN_OVERHEAD_S = {"gpu": 3e-3, "cpu": 1e-3}
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


def _frac(model: ModelInfo, cls: str) -> float:
    if cls == "routed_experts" and model.expert_count:
        return model.expert_used_count / model.expert_count
    if cls == "token_embd":
        return 1 / max(1, model.vocab_size)
    return 1.0


def predict(model: ModelInfo, hw: HardwareProfile, device_of: dict[str, str], params: PredictionParams, threads: int,
            kv_type: str, resident_fraction: float = 1.0, gpu_cost=None, kv_bytes_per_token: int | None = None) -> Prediction:
    """`params`: the engine's (engine.prediction_params); `gpu_cost(t)`: bytes it reads for t on a GPU."""
    gpu_cost = gpu_cost or (lambda t: t.nbytes)
    cpu_b = cpu_flops = 0.0
    cpu_expert_b_active = 0.0
    gpu_b: dict[str, float] = {}
    gpu_flops = 0.0
    cpu_b_all = 0.0
    cpu_prefill_flops = 0.0
    attn_cpu_layers = attn_gpu_layers = 0
    hops = 0
    blocks_dev: dict[int, set[str]] = {}
    for t in model.tensors:
        dev = device_of[t.name]
        f = _frac(model, t.cls)
        if t.block is not None:
            blocks_dev.setdefault(t.block, set()).add("cpu" if dev == "cpu" else "gpu")
            if t.name.endswith("attn_norm.weight"):
                if dev == "cpu":
                    attn_cpu_layers += 1
                else:
                    attn_gpu_layers += 1
        if dev == "cpu":
            cpu_b += t.nbytes * f
            cpu_flops += 2 * t.n_elements * f
            cpu_b_all += t.nbytes
            cpu_prefill_flops += 2 * t.n_elements * f
            if t.cls == "routed_experts":
                cpu_expert_b_active += t.nbytes * f
        else:
            gpu_b[dev] = gpu_b.get(dev, 0.0) + gpu_cost(t) * f
            gpu_flops += 2 * t.n_elements * f
    for b, devs in blocks_dev.items():
        if len(devs) > 1:
            hops += 2
    # A layer split crosses once each way at the CPU/GPU boundary.
    if hops == 0 and len({d for s in blocks_dev.values() for d in s}) > 1:
        hops = 2
    # The token's path through the devices, in compute order: each block's attention (its layer's device), then
    # its routed experts, then the output layer. GPU-to-GPU changes are extra hops; runs on remote devices cost
    # network round trips.
    layer_dev = layer_devices(device_of, model.block_count)
    exp_dev: dict[int, str] = {}
    for t in model.tensors:
        if t.cls == "routed_experts" and t.block is not None:
            exp_dev[t.block] = device_of[t.name]
    path = []
    for b in range(model.block_count):
        path += [layer_dev[b]] + ([exp_dev[b]] if b in exp_dev else [])
    path.append(layer_dev[-1])
    changes = [(a, b) for a, b in zip(path, path[1:]) if a != b]
    hops += sum(1 for a, b in changes if a != "cpu" and b != "cpu")
    remote = {f"gpu:{g.index}": g for g in hw.gpus if g.remote}
    t_net = 0.0
    for i, d in enumerate(path):
        if d in remote and (i == 0 or path[i - 1] != d):
            g = remote[d]
            t_net += RPC_ROUNDTRIPS_PER_SEGMENT * g.network_rtt_ms / 1e3 + RPC_SEGMENT_SECONDS
            t_net += 2 * model.embedding_length * 4 / ((g.network_gbs or 1.25) * 1e9)

    kv_tok = kv_bytes_per_token or model.kv.bytes_per_token.get(kv_type, model.kv.bytes_per_token["f16"])
    n_layers = max(1, attn_cpu_layers + attn_gpu_layers)
    kv_read_cpu = kv_tok * CONTEXT_FOR_DECODE * attn_cpu_layers / n_layers
    kv_read_gpu = kv_tok * CONTEXT_FOR_DECODE * attn_gpu_layers / n_layers

    nodes = max(1, len(hw.numa_nodes))
    numa_scale = (1 + NUMA_EXTRA_NODE_GAIN * (nodes - 1)) / nodes  # fraction of the sum over nodes
    bw = hw.memory_bandwidth_gbs * 1e9
    cores = min(threads, hw.cpu.physical_cores)
    isa = hw.cpu.isa
    eff = params.cpu_eff
    t_cpu_bw = (cpu_b + kv_read_cpu) / (bw * CPU_BW_EFF * numa_scale) if cpu_b else 0.0
    t_cpu_compute = cpu_flops / (cores * DECODE_GFLOPS_PER_CORE[isa] * 1e9 * numa_scale * eff) if cpu_flops else 0.0

    gpus = {f"gpu:{g.index}": g for g in hw.gpus}
    t_gpu = 0.0
    for dev, b in gpu_b.items():
        g = gpus.get(dev)
        gbw = (g.memory_bandwidth_gbs if g and g.memory_bandwidth_gbs else 500.0) * 1e9
        t_gpu += (b + kv_read_gpu * b / max(1.0, sum(gpu_b.values()))) / (gbw * GPU_BW_EFF)
    t_hops = hops * HOP_SECONDS if gpu_b else 0.0
    t_fixed = TOKEN_OVERHEAD_S["gpu" if gpu_b else "cpu"]

    notes = []
    t_disk = 0.0
    if resident_fraction < 1.0:
        hit = resident_fraction ** PAGE_CACHE_LOCALITY_EXP
        miss_bytes = cpu_expert_b_active * (1 - hit)
        t_disk = miss_bytes / (hw.disk_read_gbs * 1e9)
        notes.append(f"{resident_fraction:.0%} of CPU-side weights stay in the page cache; ~{1 - hit:.0%} of expert "
                     f"reads ({miss_bytes / 1e9:.2f} GB/token) come from disk at {hw.disk_read_gbs:g} GB/s")
    parts = {"cpu_memory": t_cpu_bw, "cpu_compute": t_cpu_compute, "gpu": t_gpu, "pcie_hops": t_hops,
             "disk": t_disk, "fixed": t_fixed}
    if remote:
        parts["network"] = t_net
    total = sum(parts.values())
    decode = 1 / total
    bound = max(parts, key=parts.get)

    limit_t = (cpu_b + kv_read_cpu) / bw if cpu_b else 0.0
    for dev, b in gpu_b.items():
        g = gpus.get(dev)
        limit_t += b / ((g.memory_bandwidth_gbs if g and g.memory_bandwidth_gbs else 500.0) * 1e9)
    if resident_fraction < 1.0:
        limit_t += cpu_expert_b_active * (1 - resident_fraction ** PAGE_CACHE_LOCALITY_EXP) / (hw.disk_read_gbs * 1e9)
    limit = 1 / limit_t if limit_t else decode

    # Prefill: compute-bound. Some engines with a GPU upload CPU-resident weights over PCIe for big batches
    # (one ubatch) when that beats computing them on the CPU.
    if params.prefill_gflops_per_core_amx and isa == "amx":
        pre_core = params.prefill_gflops_per_core_amx
    else:
        pre_core = PREFILL_GFLOPS_PER_CORE[isa] * params.prefill_cpu_scale
    t_pre_cpu = cpu_prefill_flops / (cores * pre_core * 1e9 * numa_scale * eff) if cpu_prefill_flops else 0.0
    local = [g for g in hw.gpus if not g.remote]  # ggml-rpc offers no op offload (offload_op = NULL)
    if params.prefill_uploads_weights and gpu_b and local:
        t_upload = cpu_b_all / (local[0].pcie_gbs * 0.8e9) / params.ubatch
        if t_upload < t_pre_cpu:
            t_pre_cpu = t_upload
            notes.append(f"prefill: the engine streams CPU-resident weights to the GPU per {params.ubatch}-token batch")
    tflops = sum((g.fp16_tflops or GPU_FP16_TFLOPS_DEFAULT) for g in hw.gpus) if gpu_b else 0
    t_pre_gpu = gpu_flops / (tflops * 1e12 * 0.35) if gpu_flops and tflops else 0.0
    prefill = 1 / max(1e-9, t_pre_cpu + t_pre_gpu + (t_disk if resident_fraction < 1 else 0.0) / 8)

    return Prediction(
        decode_tps=round(decode, 2), prefill_tps=round(prefill, 1), decode_limit_tps=round(limit, 2),
        fraction_of_limit=round(decode / limit, 3) if limit else 1.0, bound=bound,
        breakdown_ms={k: round(v * 1e3, 3) for k, v in parts.items()},
        cpu_bytes_per_token=int(cpu_b), gpu_bytes_per_token=int(sum(gpu_b.values())), notes=notes,
    )
