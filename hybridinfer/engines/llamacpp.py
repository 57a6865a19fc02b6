"""llama.cpp's `llama-server`: the plan as its exact command line, with flags checked against the build."""

from __future__ import annotations

import functools
import subprocess

from ..plan import Plan
from ..probe import find_llama_binary
from .llamacpp_args import compile_placement

name = "llama.cpp"
serves_openai = True
supports_placement = True


@functools.lru_cache(maxsize=4)
def help_text(binary: str) -> str:
    """The installed build's `--help`: flags differ between llama.cpp versions, so never assume one."""
    try:
        out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30)
        return out.stdout + out.stderr
    except (OSError, subprocess.SubprocessError):
        return ""


def has_flag(binary: str | None, flag: str) -> bool:
    if not binary:
        return True  # no binary to ask (planning another box): write the current flag set
    text = help_text(binary)
    return f"{flag} " in text or f"{flag}," in text or f"{flag}\n" in text


def placement_args(plan: Plan) -> list[str]:
    return compile_placement(plan.device_of, plan.n_layer).args()


def command(plan: Plan, host: str = "127.0.0.1", port: int = 8080, binary: str | None = None,
            extra: list[str] | None = None) -> list[str]:
    binary = binary or (find_llama_binary("llama-server") if plan.hardware else None)
    exe = binary or "llama-server"
    cmd = [exe, "-m", plan.model_path, "-c", str(plan.ctx), "-np", str(plan.parallel),
           "-t", str(plan.threads), "-tb", str(plan.threads)]
    cmd += placement_args(plan)
    if plan.numa:
        cmd += ["--numa", plan.numa]
    if plan.kv_type != "f16":
        cmd += ["-ctk", plan.kv_type, "-ctv", plan.kv_type, "-fa", "on"]
    cpu_experts = any(d == "cpu" for d in plan.device_of.values()) and any(d != "cpu" for d in plan.device_of.values())
    # Weights read into RAM run faster than mmap'd ones when experts stay on the CPU; streaming needs mmap.
    if has_flag(binary, "--load-mode"):
        if plan.streaming:
            cmd += ["--load-mode", "mmap"]
        elif cpu_experts:
            cmd += ["--load-mode", "none"]
    elif cpu_experts and not plan.streaming and has_flag(binary, "--no-mmap"):
        cmd += ["--no-mmap"]
    if has_flag(binary, "--metrics"):
        cmd += ["--metrics"]
    if has_flag(binary, "--jinja"):
        cmd += ["--jinja"]
    if has_flag(binary, "--reasoning-format"):
        cmd += ["--reasoning-format", "none"]  # hybridinfer's server splits <think> itself, for any engine
    cmd += ["--host", host, "--port", str(port)]
    return cmd + list(extra or [])
