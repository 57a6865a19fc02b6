"""Read llama.cpp's own load log and compare it with a plan: which buffer every tensor went to, and how many bytes
of model weights, KV cache and compute buffers each device holds — tensor by tensor and GiB by GiB.

The lines (llama.cpp tree vendored by llama-cpp-python 0.3.36; the per-tensor ones are debug level, `-v`):
  src/llama-model.cpp        "load_tensors: layer %3d assigned to device %s, is_swa = %d"            (-v)
                             "load_tensors: %12s model buffer size = %8.2f MiB"
  src/llama-model-loader.cpp "tensor %s (%zu MiB %s) buffer type overridden to %s"                  (-v)
                             "tensor '%s' (%s) (and %zu others) cannot be used with preferred buffer type %s, using %s instead" (-v)
  src/llama-kv-cache.cpp     "llama_kv_cache: %10s KV buffer size = %8.2f MiB"
  src/llama-context.cpp      "%10s compute buffer size = %8.2f MiB", "%10s  output buffer size = %8.2f MiB"
A tensor without an override line lives on its layer's device (blk.N -> layer N, output* -> layer n_layer,
token_embd -> CPU: llama.cpp's input layer is always the CPU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..util import MIB

_LOAD = re.compile(r"loading model tensors")
_LAYER = re.compile(r"layer\s+(\d+) assigned to device (\S+?),")
_OVERRIDE = re.compile(r"tensor (\S+) \(\d+ MiB \w+\) buffer type overridden to (\S+)")
_MOVED = re.compile(r"tensor '(\S+)' \(\w+\) \(and (\d+) others\) cannot be used with preferred buffer type (\S+), using (\S+) instead")
_SIZE = re.compile(r"(\S+)\s+(model|KV|compute|output) buffer size =\s+([\d.]+) MiB")
_DEVICE = re.compile(r"using device (\S+) \((.*?)\)")


@dataclass
class LoadLog:
    layer_device: dict[int, str] = field(default_factory=dict)  # layer -> llama.cpp device name ("CPU", "RPC0")
    overridden: dict[str, str] = field(default_factory=dict)  # tensor -> buffer type
    moved: list[str] = field(default_factory=list)  # tensors that fell back from their layer's buffer type
    buffers: dict[str, dict[str, int]] = field(default_factory=dict)  # kind (model/KV/compute/output) -> buffer -> bytes
    devices: list[str] = field(default_factory=list)  # llama.cpp's model devices, in order


def parse(text: str) -> LoadLog:
    out = LoadLog()
    for line in text.splitlines():
        if _LOAD.search(line):  # a dry run before the real load (e.g. --fit) must not count twice
            out.buffers.clear()
            out.layer_device.clear()
            out.overridden.clear()
        if m := _LAYER.search(line):
            out.layer_device[int(m.group(1))] = m.group(2)
        elif m := _OVERRIDE.search(line):
            out.overridden[m.group(1)] = m.group(2)
        elif m := _MOVED.search(line):
            out.moved.append(m.group(1))
        elif m := _SIZE.search(line):
            out.buffers.setdefault(m.group(2), {})[m.group(1)] = int(round(float(m.group(3)) * MIB))
        elif (m := _DEVICE.search(line)) and m.group(1) not in out.devices:
            out.devices.append(m.group(1))
    return out


def device_of_buffer(buffer: str, plan) -> str:
    """A buffer type or device name -> the plan's device ("cpu", "gpu:N"); "?" if the plan has no such device."""
    if buffer.startswith("CPU") or buffer.endswith("_Host"):  # CPU, CPU_Mapped, CPU_REPACK, CUDA_Host (pinned RAM)
        return "cpu"
    compiled = plan.compiled or {}
    for d, b in compiled.get("gpu_buffers", {}).items():
        if b == buffer:
            return d
    for d, n in compiled.get("gpu_devices", {}).items():
        if n == buffer:
            return d
    if not compiled.get("gpu_devices") and re.fullmatch(r"CUDA\d+", buffer):
        return "gpu:" + buffer[4:]
    return "?"


def tensor_devices(log: LoadLog, plan) -> dict[str, str]:
    """Where llama.cpp put each of the plan's tensors, as plan devices."""
    n_layer = plan.n_layer
    out = {}
    for name in plan.device_of:
        if name in log.overridden:
            out[name] = device_of_buffer(log.overridden[name], plan)
            continue
        m = re.match(r"blk\.(\d+)\.", name)
        if name.startswith("token_embd"):
            out[name] = "cpu"
        else:
            layer = int(m.group(1)) if m else n_layer
            out[name] = device_of_buffer(log.layer_device.get(layer, "?"), plan) if layer in log.layer_device else "?"
    return out


@dataclass(frozen=True)
class DeviceMemory:
    device: str
    kind: str  # weights | kv | compute
    predicted: int
    measured: int

    @property
    def ratio(self) -> float:
        return self.measured / self.predicted if self.predicted else (1.0 if not self.measured else float("inf"))


def measured_bytes(log: LoadLog, plan) -> dict[str, dict[str, int]]:
    """device -> {"weights", "kv", "compute", "repack"} bytes from the log's buffer sizes (output buffer = compute).

    With the file mmap'd (CPU_Mapped), the CPU backend still copies the tensors it repacks for its kernels
    (Q4_0/Q4_K/Q8_0/IQ4_NL... per ISA and shape, ggml-cpu/repack.cpp) into CPU_REPACK, while their original bytes
    stay in the mapping: that copy is counted apart ("repack"). Without mmap they live only in CPU_REPACK."""
    out: dict[str, dict[str, int]] = {}
    mapped = any(b.endswith("_Mapped") for b in log.buffers.get("model", {}))
    for kind, key in (("model", "weights"), ("KV", "kv"), ("compute", "compute"), ("output", "compute")):
        for buf, n in log.buffers.get(kind, {}).items():
            d = device_of_buffer(buf, plan)
            k = "repack" if (kind == "model" and mapped and buf == "CPU_REPACK") else key
            out.setdefault(d, {"weights": 0, "kv": 0, "compute": 0, "repack": 0})[k] += n
    return out


def compare(plan, text: str) -> dict:
    """The plan against llama.cpp's load log: tensor mismatches and per-device bytes, predicted vs measured."""
    log = parse(text)
    got = tensor_devices(log, plan)
    mismatched = {n: (plan.device_of[n], got[n]) for n in plan.device_of if got[n] != plan.device_of[n]}
    meas = measured_bytes(log, plan)
    rows = []
    for d in plan.devices:
        m = meas.get(d.device, {"weights": 0, "kv": 0, "compute": 0, "repack": 0})
        rows += [DeviceMemory(d.device, "weights", d.weights, m["weights"]),
                 DeviceMemory(d.device, "kv", d.kv_cache, m["kv"]),
                 DeviceMemory(d.device, "compute", d.compute, m["compute"])]
        if m["repack"]:  # not in the plan: llama.cpp's extra copy of repacked tensors next to the mapped file
            rows.append(DeviceMemory(d.device, "repack", 0, m["repack"]))
    for d, m in meas.items():  # a device the plan did not use, holding something: always a mismatch
        if d not in {x.device for x in plan.devices} and any(m.values()):
            rows += [DeviceMemory(d, k, 0, v) for k, v in m.items()]
    layers = {il: device_of_buffer(dev, plan) for il, dev in sorted(log.layer_device.items())}
    return {"tensors": len(got), "mismatched": mismatched, "memory": rows, "layer_devices": layers,
            "log_devices": log.devices, "moved": log.moved}


def load(plan, timeout: float = 180.0) -> tuple[str, int]:
    """Run the plan's own llama-server command with -v until it is ready; -> (its log, its RSS in bytes once
    loaded). For checking a plan against the real engine (tests, benchmarks/memory.py); stops it afterwards."""
    import os
    import signal
    import subprocess
    import tempfile
    import time

    import httpx

    from .llamacpp import ENGINE
    from .supervisor import engine_env, free_port

    port = free_port()
    argv = ENGINE.strip_runtime(plan.command) + ["--host", "127.0.0.1", "--port", str(port), "-v"]
    with tempfile.TemporaryFile("w+") as logf:
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=engine_env(plan))
        rss = 0
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        with open(f"/proc/{proc.pid}/status") as f:
                            rss = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        logf.seek(0)
        text = logf.read()
    if not rss:
        last = "\n".join(text.splitlines()[-5:])
        raise RuntimeError(f"llama-server did not become ready (exit {proc.returncode}):\n{last}")
    return text, rss
