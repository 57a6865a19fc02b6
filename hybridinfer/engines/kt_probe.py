"""What `probe` reports about the KTransformers family on this box, read from the installed files (never imported:
importing needs CUDA): the legacy server's release (from its tree — its `__version__` lags the tags), the backends
its build has (balance_serve, USE_NUMA), kt-kernel's version and the CPU variant it will load, and SGLang.

The findings travel in `EngineInfo.detail` as "key: value" parts, so a hardware profile written by hand can state
them too: `backends: ktransformers, balance_serve; USE_NUMA: on; IQ patch: applied` (legacy),
`CPU variant: amx` (kt-kernel).
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from importlib import metadata
from pathlib import Path

from ..errors import HybridError
from ..probe import EngineInfo
from .kt_versions import detect_tag

PATCH_APPLIED = "IQ patch: applied"
PATCH_NOT_APPLIED = "IQ patch: not applied"


def detail_field(info: EngineInfo | None, key: str) -> str | None:
    """The value of `key: value` in an engine row's detail (None when absent)."""
    if info is None:
        return None
    m = re.search(rf"(?:^|;\s*){re.escape(key)}:\s*([^;]+)", info.detail or "")
    return m.group(1).strip() if m else None


def patch_state(info: EngineInfo | None) -> str:
    """'applied' | 'not applied' | 'unknown' (a profile that does not say)."""
    v = detail_field(info, "IQ patch")
    if v is None:
        return "unknown"
    return "applied" if v.startswith("applied") else "not applied"


def _site_module(name: str) -> Path | None:
    """A top-level extension module's file, without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin else None


def kt_patch_state(root: Path | None = None) -> str:
    """Whether the legacy KTransformers at root (default: the installed one) carries hybridinfer's IQ patch."""
    from .ktransformers_patch import detect, find

    try:
        state = detect(root or find(None)).state
    except HybridError as e:
        return f"IQ patch: not applicable ({e.problem})"
    return {"patched": PATCH_APPLIED,
            "unpatched": f"{PATCH_NOT_APPLIED} (hybridinfer patch ktransformers --apply)"}.get(state, f"IQ patch: {state}")


def _installed(dist_name: str, module: str) -> tuple[str | None, Path | None]:
    """(package version, package folder) of an installed distribution; (None, None) when it is not installed."""
    try:
        version = metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return None, None
    spec = importlib.util.find_spec(module)
    return version, Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def probe_legacy() -> EngineInfo:
    dist, root = _installed("ktransformers", "ktransformers")
    if dist is None:
        return EngineInfo(name="ktransformers", installed=False, detail="not installed")
    if root is None or not (root / "server" / "args.py").is_file():
        return EngineInfo(name="ktransformers", installed=False, version=dist,
                          detail=f"ktransformers {dist} is the kt-kernel stack's CLI package (no legacy server): "
                                 "use --engine kt-sglang")
    try:
        v, evidence = detect_tag(root)
    except HybridError as e:
        return EngineInfo(name="ktransformers", installed=False, version=dist, path=str(root), detail=e.problem)
    # setup.py: USE_BALANCE_SERVE=1 adds the `balance_serve` CMake extension, installed as top-level `sched_ext`.
    backends = ["ktransformers"] + (["balance_serve"] if _site_module("sched_ext") else [])
    # csrc/ktransformers_ext/CMakeLists.txt links libnuma into cpuinfer_ext when built with USE_NUMA set.
    ext = _site_module("cpuinfer_ext")
    numa = "unknown"
    if ext and ext.is_file():
        numa = "on" if b"libnuma.so" in ext.read_bytes() else "off"
    build = dist.partition("+")[2]  # e.g. cu124torch26fancy: CUDA, torch and CPU instruction set it was built for
    parts = [f"{evidence}, package {dist}", f"backends: {', '.join(backends)}", f"USE_NUMA: {numa}",
             kt_patch_state(root)]
    return EngineInfo(name="ktransformers", installed=True, version=v.name, path=str(root),
                      gpu="cu" in build or not build, detail="; ".join(parts))


# --- kt-kernel -------------------------------------------------------------------------------------------
# kt_kernel/_cpu_detect.py (kt-kernel 0.7.2), detect_cpu_features: the first variant whose flags the CPU has all
# of, in this order; none -> avx2.
KT_KERNEL_VARIANTS = (
    ("amx", ("amx_tile", "amx_int8", "amx_bf16", "avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi", "avx512_bf16")),
    ("avx512_bf16", ("avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi", "avx512_bf16")),
    ("avx512_vbmi", ("avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi")),
    ("avx512_vnni", ("avx512f", "avx512bw", "avx512_vnni")),
    ("avx512_base", ("avx512f", "avx512bw")),
    ("avx2", ("avx2",)),
)


def kt_kernel_variant(flags) -> str:
    """The CPU variant kt-kernel loads for these flags: the words of a /proc/cpuinfo `flags` line, or a profile's list.

    The same test as its own detect_cpu_features (read from /proc/cpuinfo, not cpuid): the flags lower-cased, and a
    flag it requires counts when the CPU lists it as written or with its underscores removed — the kernel writes
    `avx512vbmi` where kt-kernel asks for `avx512_vbmi`, but `avx512_vnni`, `avx512_bf16` as asked. Its
    KT_KERNEL_CPU_VARIANT override concerns the box it runs on; `probe` runs its own code there.
    """
    have = {f.lower() for f in flags}
    for name, need in KT_KERNEL_VARIANTS:
        if all(f in have or f.replace("_", "") in have for f in need):
            return name
    return "avx2"


def methods(experts_py: str) -> list[str]:
    """INFERENCE_METHODS from kt_kernel/experts.py (read, not imported)."""
    for node in ast.walk(ast.parse(experts_py)):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "INFERENCE_METHODS" for t in node.targets):
            call = node.value
            arg = call.args[0] if isinstance(call, ast.Call) and call.args else call
            return sorted(ast.literal_eval(arg))
    return []


def probe_kt_kernel() -> EngineInfo:
    version, root = _installed("kt-kernel", "kt_kernel")
    if version is None:
        return EngineInfo(name="kt-kernel", installed=False, detail="not installed")
    parts = []
    if root and (root / "_cpu_detect.py").is_file():
        # Its own detection code, run alone (the package __init__ would load the compiled kernels).
        s = importlib.util.spec_from_file_location("_hybridinfer_kt_cpu_detect", root / "_cpu_detect.py")
        mod = importlib.util.module_from_spec(s)
        try:
            s.loader.exec_module(mod)
            parts.append(f"CPU variant: {mod.detect_cpu_features()}")
        except Exception as e:  # a newer layout: say so, do not guess
            parts.append(f"CPU variant: unknown ({e.__class__.__name__})")
    if root and (root / "experts.py").is_file():
        parts.append("methods: " + ", ".join(methods((root / "experts.py").read_text())))
    return EngineInfo(name="kt-kernel", installed=True, version=version, path=str(root or ""), detail="; ".join(parts))


def probe_sglang() -> EngineInfo:
    for dist, what in (("sglang-kt", "KTransformers' SGLang fork"), ("sglang", "SGLang")):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        return EngineInfo(name="sglang", installed=True, version=version, detail=f"{what} ({dist})")
    return EngineInfo(name="sglang", installed=False, detail="not installed")


if __name__ == "__main__":  # pragma: no cover - a quick look from a shell
    for row in (probe_legacy(), probe_kt_kernel(), probe_sglang()):
        print(row, file=sys.stdout)
