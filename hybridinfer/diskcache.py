"""The prompt cache on disk, what the planner needs of it: the key a saved KV state is valid under, and free disk.

A slot's saved state (llama.cpp's `llama_state_seq_save_file`: magic 'ggsq', version, the slot's tokens, then the
KV cells) is checked on restore by the engine only for its shape — layer count, K/V types and row sizes, cells that
fit (llama.cpp src/llama-kv-cache.cpp `state_read_meta`/`state_read_data`, tag of llama-cpp-python 0.3.36's
vendored tree) — not for which model wrote it: a fine-tune of the same shape, or another build's kernels, would
restore silently wrong. So each state lives in a directory named by everything it is valid for: the model's file
(size and a hash of its first and last MiB, per shard), the engine build (engines' `build_fingerprint`), the
context per slot and the KV cache type. A changed model, build, context or KV type is a different directory: its
states are never seen, and the LRU cap removes them first (they are never used again).
"""

from __future__ import annotations

import hashlib
import os
import shutil

_EDGE = 1 << 20  # bytes hashed at each end of a model file: the GGUF header and metadata, and the last tensor bytes


def model_identity(paths: list[str]) -> str:
    """A model file's identity: name, size and its first and last MiB, per shard (cheap on a 130 GB model)."""
    h = hashlib.sha256()
    for p in paths:
        try:
            size = os.path.getsize(p)
            h.update(f"{os.path.basename(p)}:{size}:".encode())
            with open(p, "rb") as f:
                h.update(f.read(_EDGE))
                if size > 2 * _EDGE:
                    f.seek(size - _EDGE)
                    h.update(f.read(_EDGE))
        except OSError:
            h.update(f"{p}:missing".encode())  # planned where the file is not (another box): its path only
    return h.hexdigest()


def cache_key(paths: list[str], build: str, ctx_per_slot: int, kv_type: str) -> str:
    """The directory name of the states valid for this model, engine build, context per slot and KV type."""
    raw = f"model={model_identity(paths)};build={build};ctx={ctx_per_slot};kv={kv_type}"
    return f"ctx{ctx_per_slot}-{kv_type}-" + hashlib.sha256(raw.encode()).hexdigest()[:16]


def file_fingerprint(paths: list[str]) -> str:
    """Build files' identity (path, size, modification time): a rebuilt engine is a different build."""
    h = hashlib.sha256()
    for p in sorted(set(paths)):
        try:
            st = os.stat(p)
            h.update(f"{os.path.realpath(p)}:{st.st_size}:{st.st_mtime_ns};".encode())
        except OSError:
            pass
    return h.hexdigest()[:16]


def disk_free(path: str) -> int | None:
    """Free bytes on the file system that holds (or would hold) `path`; None when nothing of it exists."""
    p = os.path.abspath(path)
    while p and not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None
