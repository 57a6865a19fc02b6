"""llama.cpp-family binaries and device names: where an engine binary is, whether it was built with CUDA, and how
llama.cpp names a profile's GPU (CUDA<i>, RPC<n>) and its buffer type. Here, not in `probe`, because they are
llama.cpp's conventions, not facts of the box."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from ..probe import GpuInfo


def find_llama_binary(name: str) -> str | None:
    """An engine binary by name: HYBRIDINFER_<NAME> (e.g. HYBRIDINFER_LLAMA_SERVER), then this environment's bin/
    (install.sh links there), then PATH."""
    env = os.environ.get("HYBRIDINFER_" + name.upper().replace("-", "_"))
    if env:
        return env if os.access(env, os.X_OK) else None
    local = Path(sys.prefix) / "bin" / name
    if local.exists() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def binary_has_cuda(path: str) -> bool:
    """A CUDA-enabled ggml carries its CUDA backend's symbols, whether or not a GPU is present now."""
    try:
        real = os.path.realpath(path)
        with open(real, "rb") as f:
            data = f.read()
        if b"ggml_backend_cuda" in data:
            return True
        libdir = Path(real).parent
        return any(libdir.glob("libggml-cuda*"))
    except OSError:
        return False


def llama_device(g: GpuInfo) -> str:
    """The llama.cpp device a profile's GPU is: CUDA<index>, or RPC<n> for the n-th `--rpc` server (llama.cpp
    numbers RPC devices over all servers in --rpc order)."""
    return g.device or f"CUDA{g.index}"


def buffer_type(g: GpuInfo) -> str:
    """llama.cpp's buffer-type name, as `-ot` and the load log spell it. An rpc-server numbers its own devices from 0
    (ggml-rpc.cpp: "RPC" + device-on-server + "[" + endpoint + "]"); hybridinfer's workers serve one device each."""
    return f"RPC0[{g.endpoint}]" if g.endpoint else llama_device(g)


def rpc_servers(gpus: list[GpuInfo]) -> list[str]:
    """The RPC servers to pass as `--rpc`, in the order that numbers them RPC0, RPC1, ..."""
    return [g.endpoint for g in sorted((g for g in gpus if g.endpoint), key=lambda g: int(llama_device(g)[3:]))]


def rpc_of(plan) -> list[str]:
    """The RPC servers a plan's engine is given (its compiled part, from `rpc_servers`)."""
    return (plan.compiled or {}).get("rpc_servers", [])


def rpc_used(plan) -> list[str]:
    """The RPC servers holding something of the plan (a tensor or KV cache on their gpu:N). llama.cpp connects to
    every --rpc server while loading and closes its connection to one it put nothing on, so only these are
    watched once the engine serves."""
    c = plan.compiled or {}
    buffers = c.get("gpu_buffers") or {}
    used = set(plan.device_of.values()) | {d.device for d in plan.devices if d.weights or d.kv_cache}
    eps = {b[b.index("[") + 1:-1] for g, b in buffers.items() if g in used and "[" in b}
    return [e for e in rpc_of(plan) if e in eps]
