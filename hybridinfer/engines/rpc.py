"""llama.cpp's RPC backend: `rpc-server` serves one ggml device over TCP, `llama-server --rpc HOST:PORT,...` sees
each as device RPC0, RPC1, ... (numbered over all servers in --rpc order) — a second device on any box, and
llama.cpp's way to spread one model over several machines.

Facts used (llama.cpp tree vendored by llama-cpp-python 0.3.36):
- tools/rpc/rpc-server.cpp: `-H host` (default 127.0.0.1; any other prints "Never expose the RPC server to an open
  network!"), `-p port` (default 50052), `-t threads`, `-d devices`, `-c` local cache. It prints each device as
  "  NAME: DESC (TOTAL MiB, FREE MiB free)" before listening, serves one client connection at a time, and has
  no authentication.
- ggml/src/ggml-rpc/ggml-rpc.cpp: the client reports a device's memory by asking the server
  (RPC_CMD_GET_DEVICE_MEMORY -> ggml_backend_dev_memory of the served device); an unreachable server is a
  GGML_ABORT ("Failed to connect to HOST:PORT"), so hybridinfer checks every worker before llama.cpp starts.
- common/common.cpp `--list-devices`: "  RPC0: HOST:PORT (TOTAL MiB, FREE MiB free)" for each device — how
  hybridinfer asks the workers for their memory, through llama-server itself.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import HybridError
from ..probe import GpuInfo, HardwareProfile
from .binaries import find_llama_binary
from ..util import is_loopback

DEFAULT_PORT = 50052
LOOPBACK_GBS = 5.0  # loopback TCP: memory copies through the kernel, not a wire
LAN_GBS = 1.25  # a 10 GbE link, the common case for a second box; stated in the plan's reasons
NO_AUTH = ("llama.cpp RPC has no authentication and no encryption: anyone who can reach this port can use the "
           "device and read what it computes — keep it on a trusted network")


@dataclass(frozen=True)
class Worker:
    endpoint: str  # host:port
    device: str  # RPC<n> as llama.cpp numbers it
    total: int  # bytes, as the worker reports its device
    free: int
    rtt_ms: float  # TCP connect round trip, best of a few


def parse_endpoint(text: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[?([^\]\s]+?)\]?:(\d{1,5})", text.strip())
    if not m or not (0 < int(m.group(2)) < 65536):
        raise HybridError(f"RPC worker '{text}' is not HOST:PORT", f"e.g. --rpc 192.168.1.20:{DEFAULT_PORT},192.168.1.21:{DEFAULT_PORT}")
    return m.group(1), int(m.group(2))


def split_endpoints(text: str) -> list[str]:
    eps = [e.strip() for e in text.split(",") if e.strip()]
    if not eps:
        raise HybridError("--rpc needs at least one HOST:PORT", f"e.g. --rpc 127.0.0.1:{DEFAULT_PORT}")
    for e in eps:
        parse_endpoint(e)
    if len(set(eps)) != len(eps):
        raise HybridError(f"--rpc lists a worker twice ({text})", "name each worker once")
    return eps



def round_trip(endpoint: str, timeout: float = 3.0, tries: int = 3) -> float:
    """Seconds for a TCP connect (one round trip), best of `tries`; HybridError naming the worker if it is not
    there. The worker sees a client that connects and leaves, which it handles like any closed connection."""
    host, port = parse_endpoint(endpoint)
    best = None
    for _ in range(tries):
        t0 = time.perf_counter()
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as e:
            why = e.strerror or e.__class__.__name__
            raise HybridError(f"RPC worker {endpoint} is unreachable ({why})",
                              f"start it there with `hybridinfer worker --host {host} --port {port}` "
                              "(or drop it from --rpc)") from None
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best


def check_reachable(endpoints: list[str], tries: int = 3) -> dict[str, float]:
    return {e: round_trip(e, tries=tries) for e in endpoints}


def dead_links(pid: int, endpoints: list[str]) -> list[str]:
    """Workers whose connection from engine process `pid` is gone or closed by the worker (TCP CLOSE_WAIT), read
    from /proc — never by connecting: a worker accepts one client and queues at most two more (listen backlog 1
    in ggml-rpc's transport.cpp), so probing a busy worker would itself fail. IPv4 only; [] where /proc says nothing."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
                  if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
        rows = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return []
    state: dict[str, str] = {}  # "HEXIP:HEXPORT" remote -> state of the engine's socket to it
    for row in rows:
        f = row.split()
        if len(f) > 9 and f[9] in inodes:
            state[f[2]] = f[3] if state.get(f[2]) != "01" else "01"
    dead = []
    for e in endpoints:
        host, port = parse_endpoint(e)
        try:
            ip = socket.gethostbyname(host)
        except OSError:
            continue
        key = "%08X:%04X" % (int.from_bytes(socket.inet_aton(ip), "little"), port)
        if state.get(key) != "01":  # 01 = ESTABLISHED
            dead.append(e)
    return dead


def query(endpoints: list[str], binary: str | None = None, timeout: float = 20.0) -> list[Worker]:
    """Each worker's device and memory as llama.cpp sees it (`llama-server --rpc ... --list-devices`)."""
    rtts = check_reachable(endpoints)  # first: llama.cpp aborts on an unreachable worker
    binary = binary or find_llama_binary("llama-server")
    if not binary:
        raise HybridError("llama-server not found (it asks the RPC workers for their memory)",
                          "run ./install.sh, or set HYBRIDINFER_LLAMA_SERVER")
    try:
        out = subprocess.run([binary, "--rpc", ",".join(endpoints), "--list-devices"], capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise HybridError(f"RPC worker(s) {', '.join(endpoints)} accepted the connection but did not answer in "
                          f"{timeout:.0f} s", "a worker serves one client at a time: stop the llama-server using it") from None
    text = out.stdout + out.stderr
    if "RPC not supported" in text:
        raise HybridError(f"{binary} is built without RPC", "rebuild with ./install.sh (it enables -DGGML_RPC=ON)")
    found = {m.group(2): (m.group(1), int(m.group(3)), int(m.group(4))) for m in
             re.finditer(r"^\s*(RPC\d+): (\S+) \((\d+) MiB, (\d+) MiB free\)", text, re.M)}
    workers = []
    for e in endpoints:
        if e not in found:
            last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "no output")
            raise HybridError(f"RPC worker {e} did not report a device ({last.strip()})",
                              "check that it is a hybridinfer worker / rpc-server of the same llama.cpp version")
        dev, total, free = found[e]
        workers.append(Worker(endpoint=e, device=dev, total=total << 20, free=free << 20, rtt_ms=rtts[e] * 1e3))
    return workers


def with_workers(hw: HardwareProfile, workers: list[Worker]) -> HardwareProfile:
    """The box plus one GPU entry per worker device: its memory as the worker reports it, its link as a
    per-token cost. Memory bandwidth of a remote device is not reported; this box's is assumed."""
    gpus = list(hw.gpus)
    for w in workers:
        host, _ = parse_endpoint(w.endpoint)
        gpus.append(GpuInfo(index=len(gpus), name=f"RPC worker {w.endpoint}", vram_total=w.total, vram_free=w.free,
                            memory_bandwidth_gbs=hw.memory_bandwidth_gbs, device=w.device, endpoint=w.endpoint,
                            network_gbs=LOOPBACK_GBS if is_loopback(host) else LAN_GBS,
                            network_rtt_ms=round(w.rtt_ms, 3)))
    return replace(hw, gpus=gpus)


def shares_cores(endpoints: list[str]) -> bool:
    """A worker on this machine computes on the same cores as the engine."""
    return any(is_loopback(parse_endpoint(e)[0]) for e in endpoints)


def passive_env(env: dict | None = None) -> dict:
    """The environment for an engine or worker sharing cores with the other: OpenMP threads that sleep instead of
    spinning between parallel regions (llama.cpp's build uses OpenMP). Measured on this project's 2-core box, tiny
    demo model, attention on a loopback worker and experts on the CPU: 70.6 tok/s with the engine spinning, 184.8
    with both passive (docs/devices.md). A value already set is kept."""
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_WAIT_POLICY", "passive")
    return env


def worker_command(host: str = "127.0.0.1", port: int = DEFAULT_PORT, threads: int | None = None,
                   binary: str | None = None, cache: bool = False) -> list[str]:
    exe = binary or find_llama_binary("rpc-server")
    if not exe:
        raise HybridError("rpc-server not found", "run ./install.sh (it builds llama.cpp with RPC), or set HYBRIDINFER_RPC_SERVER")
    cmd = [exe, "-H", host, "-p", str(port)]
    if threads:
        cmd += ["-t", str(threads)]
    if cache:
        cmd += ["-c"]  # rpc-server.cpp: $LLAMA_CACHE or ~/.cache/llama.cpp, subdirectory rpc
    return cmd


