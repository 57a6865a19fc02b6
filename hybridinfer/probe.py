"""Stage 1 — probe: what this box is (CPU, NUMA, ISA, RAM, bandwidth, GPUs, engines) as a `HardwareProfile`.

The engine rows come from each engine's own probe() (engines.probe_all()), passed in by the caller.

A profile round-trips through JSON, so `plan --hardware FILE` can plan a box we do not have
(see benchmarks/hardware/ for the reference machines).
"""

from __future__ import annotations

import json
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

from .calibration import Calibration
from .errors import HybridError
from .util import from_dict, to_dict

# The ISA flags KTransformers and kt-kernel look at, spelled as they ask for them. /proc/cpuinfo spells most the
# same; avx512_vbmi it writes `avx512vbmi`, which kt-kernel accepts too (a flag counts without its underscores).
ISA_FLAGS = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_vbmi",
    "amx_tile", "amx_int8", "amx_bf16",
)


def isa_flags(words) -> list[str]:
    """The ISA_FLAGS among the words of a /proc/cpuinfo `flags` line, in ISA_FLAGS' order and spelling; a flag
    counts as written or without its underscores, as in kt-kernel's detection (engines/kt_probe.py)."""
    have = {w.lower() for w in words}
    return [f for f in ISA_FLAGS if f in have or f.replace("_", "") in have]


@dataclass(frozen=True)
class NumaNode:
    id: int
    cpus: list[int]
    memory_bytes: int


@dataclass(frozen=True)
class CpuInfo:
    model: str
    logical_cores: int
    physical_cores: int
    sockets: int
    flags: list[str]

    @property
    def isa(self) -> str:
        """Best kernel tier, in KTransformers' ladder: amx > avx512 > avx2 > generic."""
        f = set(self.flags)
        if {"amx_tile", "amx_int8", "amx_bf16"} <= f:
            return "amx"
        if "avx512f" in f:
            return "avx512"
        if "avx2" in f:
            return "avx2"
        return "generic"


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    vram_total: int
    vram_free: int
    compute_capability: str = ""
    pcie_gen: int = 4
    pcie_width: int = 16
    memory_bandwidth_gbs: float = 0.0  # device memory bandwidth (spec), for decode prediction
    fp16_tflops: float = 0.0  # dense fp16 tensor throughput (spec), for prefill prediction; 0 = unknown
    # A remote device: "RPC<n>" (the n-th RPC server; "" = a local GPU), served by `endpoint` (host:port of the
    # worker); engines/binaries.py turns these into llama.cpp's device names.
    device: str = ""
    endpoint: str = ""
    network_gbs: float = 0.0  # link to a remote device: bandwidth (GB/s) and round trip (ms), per-token costs
    network_rtt_ms: float = 0.0

    @property
    def remote(self) -> bool:
        return bool(self.endpoint)

    @property
    def pcie_gbs(self) -> float:
        per_lane = {3: 0.985, 4: 1.969, 5: 3.938}.get(self.pcie_gen, 1.969)
        return per_lane * self.pcie_width


@dataclass(frozen=True)
class EngineInfo:
    name: str
    installed: bool
    version: str = ""
    path: str = ""
    gpu: bool = False  # built with CUDA support
    detail: str = ""


@dataclass(frozen=True)
class HardwareProfile:
    id: str
    description: str
    cpu: CpuInfo
    numa_nodes: list[NumaNode]
    ram_total: int
    ram_available: int
    memory_bandwidth_gbs: float  # whole box, all sockets
    bandwidth_source: str  # "spec" | "measured" | "estimate"
    gpus: list[GpuInfo] = field(default_factory=list)
    engines: list[EngineInfo] = field(default_factory=list)
    disk_read_gbs: float = 2.0  # sequential read of the model's disk, for planning weight streaming
    source: str = "probe"  # "probe" (this box) or "profile" (a file describing another box)
    bandwidth_method: str = ""  # how a measured bandwidth was measured (kernel, threads, passes)
    # This box's calibration (`hybridinfer calibrate`): measured per-engine, per-type costs the planner predicts
    # from. None for a profile of another box, or where it was skipped (--no-calibrate).
    calibration: Calibration | None = None

    def engine(self, name: str) -> EngineInfo | None:
        return next((e for e in self.engines if e.name == name and e.installed), None)

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "HardwareProfile":
        return from_dict(cls, json.loads(text))


def load_profile(path: str | os.PathLike) -> HardwareProfile:
    """Read a hardware profile: a path, or the id of a shipped reference machine (e.g. `desktop-4090`)."""
    p = Path(path)
    if not p.exists():
        shipped = reference_profiles_dir() / f"{path}.json"
        if shipped.exists():
            p = shipped
        else:
            names = ", ".join(sorted(x.stem for x in reference_profiles_dir().glob("*.json")))
            raise HybridError(f"hardware profile '{path}' not found",
                              f"give a JSON file from `hybridinfer probe --json` or one of: {names}")
    try:
        return HardwareProfile.from_json(p.read_text())
    except (ValueError, TypeError, KeyError) as e:
        raise HybridError(f"{p} is not a valid hardware profile ({e.__class__.__name__}: {e})",
                          "regenerate it with `hybridinfer probe --json > FILE`") from None


def reference_profiles_dir() -> Path:
    env = os.environ.get("HYBRIDINFER_HARDWARE_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for cand in (here / "hardware", here.parent / "benchmarks" / "hardware"):
        if cand.is_dir():
            return cand
    return here.parent / "benchmarks" / "hardware"


# --- live probing ---------------------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _parse_cpulist(text: str) -> list[int]:
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-")
            cpus.extend(range(int(a), int(b) + 1))
        else:
            cpus.append(int(part))
    return cpus


def probe_cpu(cpuinfo: str | None = None) -> CpuInfo:
    """This box's CPU from /proc/cpuinfo, or from `cpuinfo` text: a whole file, or a recorded excerpt without
    `processor` lines (`model name` and `flags`, as in tests/fixtures/cpu-flags/), read as one logical CPU."""
    text = cpuinfo if cpuinfo is not None else _read("/proc/cpuinfo")
    model = ""
    flags: set[str] = set()
    cores: set[tuple[str, str]] = set()
    sockets: set[str] = set()
    logical = 0
    phys = core = "0"
    blocks = [b for b in text.split("\n\n") if re.search(r"^processor\s*:", b, re.M)]
    for block in blocks or ([text] if re.search(r"^(flags|Features)\s*:", text, re.M) else []):
        logical += 1
        for line in block.splitlines():
            key, _, val = line.partition(":")
            key, val = key.strip(), val.strip()
            if key == "model name" and not model:
                model = val
            elif key in ("flags", "Features") and not flags:
                flags = set(val.split())
            elif key == "physical id":
                phys = val
            elif key == "core id":
                core = val
        sockets.add(phys)
        cores.add((phys, core))
    logical = logical or os.cpu_count() or 1
    physical = len(cores) or logical
    return CpuInfo(model=model or platform.processor() or "unknown", logical_cores=logical,
                   physical_cores=physical, sockets=max(1, len(sockets)),
                   flags=isa_flags(flags))


def probe_numa(sysfs: str = "/sys/devices/system/node") -> list[NumaNode]:
    nodes = []
    base = Path(sysfs)
    for d in sorted(base.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        mem = 0
        m = re.search(r"MemTotal:\s+(\d+) kB", _read(str(d / "meminfo")))
        if m:
            mem = int(m.group(1)) * 1024
        nodes.append(NumaNode(id=int(d.name[4:]), cpus=_parse_cpulist(_read(str(d / "cpulist"))), memory_bytes=mem))
    return nodes


def probe_gpus() -> list[GpuInfo]:
    """NVIDIA GPUs through NVML; no driver / no GPU is a normal, empty result."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    gpus = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                cc = "%d.%d" % pynvml.nvmlDeviceGetCudaComputeCapability(h)
            except Exception:
                cc = ""
            try:
                gen = pynvml.nvmlDeviceGetMaxPcieLinkGeneration(h)
                width = pynvml.nvmlDeviceGetMaxPcieLinkWidth(h)
            except Exception:
                gen, width = 4, 16
            try:  # bus width (bits) x memory clock (MHz) x 2 (DDR) -> GB/s
                bw = pynvml.nvmlDeviceGetMemoryBusWidth(h) * pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM) * 2 / 8 / 1000
            except Exception:
                bw = 0.0
            gpus.append(GpuInfo(index=i, name=name, vram_total=int(mem.total), vram_free=int(mem.free),
                                compute_capability=cc, pcie_gen=int(gen), pcie_width=int(width),
                                memory_bandwidth_gbs=round(bw, 1)))
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return gpus


def measure_bandwidth(threads: int | None = None):
    """Sustained multi-threaded read bandwidth (see hybridinfer.bandwidth) -> Bandwidth(gbs, method, ...)."""
    from .bandwidth import measure

    return measure(threads)


def probe(measure: bool = False, engines: list[EngineInfo] | None = None) -> HardwareProfile:
    """This box. `engines`: the engine table to record (engines.probe_all(); probe itself knows no engine)."""
    import psutil

    cpu = probe_cpu()
    numa = probe_numa() or [NumaNode(id=0, cpus=list(range(cpu.logical_cores)), memory_bytes=psutil.virtual_memory().total)]
    vm = psutil.virtual_memory()
    method = ""
    if measure:
        m = measure_bandwidth()
        bw, src, method = m.gbs, "measured", m.detail
    else:
        # Rough, stated as an estimate: ~8 GB/s per physical core, a typical share of DRAM bandwidth.
        bw, src = round(min(8.0 * cpu.physical_cores, 400.0), 1), "estimate"
    return HardwareProfile(
        id=platform.node() or "this-box",
        description=f"{cpu.model}, {cpu.physical_cores} cores, {vm.total / 1024**3:.0f} GiB RAM (probed)",
        cpu=cpu, numa_nodes=numa, ram_total=int(vm.total), ram_available=int(vm.available),
        memory_bandwidth_gbs=bw, bandwidth_source=src, bandwidth_method=method, gpus=probe_gpus(),
        engines=list(engines or []), source="probe",
    )
