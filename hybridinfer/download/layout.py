"""What a model repository holds: its GGUF quants (from file names alone) and its config/tokenizer files.

Unsloth publishes one folder per quant with split shards
(`DeepSeek-R1-UD-IQ1_S/DeepSeek-R1-UD-IQ1_S-00001-of-00003.gguf`); other repositories put single-file quants at
the root (`Qwen3-30B-A3B-Q4_K_M.gguf`, `qwen2.5-7b-instruct-q4_k_m.gguf`). Both are recognised here.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from ..ggufio import SHARD_RE

# A quant label at the end of a file stem (or of its folder): UD-IQ1_S, Q4_K_M, IQ4_XS, Q8_0, BF16, MXFP4_MOE ...
_QUANT_RE = re.compile(r"(?:^|[-_.])((?:UD-)?(?:I?Q\d(?:_[A-Z0-9]+)*|TQ\d_\d|BF16|F16|F32|FP16|MXFP4(?:_MOE)?))$", re.I)
# Files that are not the language model itself (vision projectors, importance matrices).
_NOT_MODEL = ("mmproj", "imatrix")
# Weights that a config folder never needs (the course's `--exclude '*.safetensors'`, plus the other formats).
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.msgpack", "*.onnx")


@dataclass(frozen=True)
class RemoteFile:
    path: str  # inside the repository, '/'-separated
    size: int
    sha256: str | None = None


@dataclass(frozen=True)
class Quant:
    label: str  # as written in the repository (e.g. "UD-IQ1_S")
    stem: str  # file stem without shard suffix, with its folder ("DeepSeek-R1-UD-IQ1_S/DeepSeek-R1-UD-IQ1_S")
    files: tuple[RemoteFile, ...]  # shards in order
    shard_count: int  # what the names say (1 for a single file)
    missing: tuple[str, ...]  # shard names the names promise but the listing lacks

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def first(self) -> RemoteFile:
        return self.files[0]


def _label(stem: str) -> str | None:
    p = PurePosixPath(stem)
    if p.name.lower().startswith(_NOT_MODEL):
        return None
    for text in (p.name, p.parent.name):
        m = _QUANT_RE.search(text)
        if m:
            return m.group(1)
    return None


def find_quants(files: list[RemoteFile]) -> list[Quant]:
    """Group a repository's .gguf files into quants (one per model stem), in listing order."""
    groups: dict[str, list[tuple[int, int, RemoteFile]]] = {}
    for f in files:
        name = PurePosixPath(f.path).name
        if not name.endswith(".gguf"):
            continue
        m = SHARD_RE.match(name)
        base = m.group("stem") if m else name[: -len(".gguf")]
        stem = str(PurePosixPath(f.path).parent / base) if "/" in f.path else base
        no, count = (int(m.group("no")), int(m.group("count"))) if m else (1, 1)
        groups.setdefault(stem, []).append((no, count, f))
    quants = []
    for stem, members in groups.items():
        label = _label(stem)
        if label is None:
            continue
        members.sort(key=lambda x: x[0])
        count = max(c for _, c, _ in members)
        have = {no for no, _, _ in members}
        base = PurePosixPath(stem).name
        missing = tuple(f"{base}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1) if i not in have)
        quants.append(Quant(label=label, stem=stem, files=tuple(f for _, _, f in members), shard_count=count,
                            missing=missing))
    return quants


def pick_quant(quants: list[Quant], wanted: str | None) -> list[Quant]:
    """Quants matching `wanted` (case-insensitive label, or the file stem); all of them when None."""
    if wanted is None:
        return quants
    w = wanted.lower()
    exact = [q for q in quants if q.label.lower() == w or PurePosixPath(q.stem).name.lower() == w]
    return exact or [q for q in quants if q.label.lower().removeprefix("ud-") == w.removeprefix("ud-")]


def config_files(files: list[RemoteFile]) -> list[RemoteFile]:
    """A model repository's files minus its weights: config, tokenizer, generation config, modeling code, docs."""
    return [f for f in files if not any(fnmatch.fnmatch(PurePosixPath(f.path).name, p) for p in WEIGHT_PATTERNS)]
