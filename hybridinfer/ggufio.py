"""Header-only GGUF reading: metadata and tensor infos, never tensor data.

`gguf.GGUFReader` memory-maps the file and builds a numpy view per array element, which takes seconds on
R1's 129k-token vocabulary; this parser reads the header bytes sequentially and skips arrays it does not need.
Split sets (`name-00001-of-00003.gguf`) are found and checked shard by shard.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import HybridError

SHARD_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_SIZE = {k: struct.calcsize(v) for k, v in _SCALAR.items()}
# ggml types only ik_llama.cpp defines (IQ*_K, IQ*_KS, IQ*_KT trellis, _R4/_R8 repacked rows, ...), so a GGUF
# quantized by ik_llama.cpp can be inspected and an engine can say it cannot run it. id -> (name, block size,
# bytes per block, bytes of per-row metadata). From ik_llama.cpp (vendored in ik-llama-cpp-python 0.1.5):
# ids and block sizes from gguf-py/gguf/constants.py, `row_meta_size` from ggml/src/ggml.c `type_traits`
# (a row is row_meta_size + n/block*bytes, see its ggml_row_size).
IK_TYPES: dict[int, tuple[str, int, int, int]] = {
    31: ("Q4_0_4_4", 32, 18, 0),
    32: ("Q4_0_4_8", 32, 18, 0),
    33: ("Q4_0_8_8", 32, 18, 0),
    36: ("I2_S", 1, 1, 0),
    97: ("Q8_0_X4", 32, 34, 0),
    98: ("Q8_1_X4", 32, 36, 0),
    99: ("Q8_2_X4", 32, 36, 0),
    133: ("Q6_0", 32, 26, 0),
    134: ("IQ1_BN", 64, 13, 2),
    135: ("IQ2_BN", 64, 16, 4),
    136: ("Q8_K64", 64, 68, 0),
    137: ("IQ2_K", 256, 76, 0),
    138: ("IQ3_K", 256, 110, 0),
    139: ("IQ4_K", 256, 144, 0),
    140: ("IQ5_K", 256, 176, 0),
    141: ("IQ6_K", 256, 212, 0),
    144: ("IQ4_KS", 256, 136, 4),
    145: ("IQ2_KS", 256, 70, 2),
    146: ("IQ4_KSS", 256, 128, 4),
    147: ("Q8_K16", 64, 64, 20),
    148: ("Q8_K32", 256, 292, 0),
    149: ("Q8_KR8", 256, 292, 0),
    150: ("Q8_K128", 128, 140, 0),
    151: ("Q8_KV", 32, 32, 8),
    152: ("IQ5_KS", 256, 168, 4),
    153: ("IQ2_KT", 256, 68, 4),
    154: ("IQ3_KT", 256, 100, 4),
    155: ("IQ4_KT", 256, 128, 4),
    156: ("IQ3_KS", 256, 102, 2),
    157: ("IQ2_KL", 256, 86, 2),
    158: ("IQ1_KT", 256, 56, 4),
    202: ("Q4_0_R8", 32, 18, 0),
    206: ("Q5_0_R4", 32, 22, 0),
    208: ("Q8_0_R8", 32, 34, 0),
    210: ("Q2_K_R4", 256, 84, 0),
    211: ("Q3_K_R4", 256, 110, 0),
    212: ("Q4_K_R4", 256, 144, 0),
    213: ("Q5_K_R4", 256, 176, 0),
    214: ("Q6_K_R4", 256, 210, 0),
    216: ("IQ2_XXS_R4", 256, 66, 0),
    217: ("IQ2_XS_R4", 256, 74, 0),
    218: ("IQ3_XXS_R4", 256, 98, 0),
    219: ("IQ1_S_R4", 32, 6, 2),
    220: ("IQ4_NL_R4", 32, 18, 0),
    221: ("IQ3_S_R4", 256, 110, 0),
    222: ("IQ2_S_R4", 256, 82, 0),
    223: ("IQ4_XS_R8", 256, 136, 0),
    229: ("IQ1_M_R4", 32, 7, 2),
    230: ("BF16_R16", 1, 2, 0),
    233: ("Q6_0_R4", 32, 26, 0),
    335: ("IQ2_BN_R4", 64, 16, 4),
    337: ("IQ2_K_R4", 256, 76, 0),
    338: ("IQ3_K_R4", 256, 110, 0),
    339: ("IQ4_K_R4", 256, 144, 0),
    340: ("IQ5_K_R4", 256, 176, 0),
    344: ("IQ4_KS_R4", 256, 136, 4),
    352: ("IQ5_KS_R4", 256, 168, 4),
    398: ("Q8_KV_R8", 32, 32, 4),
    399: ("Q8_K_R8", 256, 258, 0),
}
# Arrays kept in full; other arrays keep only their length (tokenizer tables are huge and not needed to plan).
_KEEP_ARRAYS_MAX = 4096


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # ggml order (fastest dimension first)
    type: int
    nbytes: int
    shard: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def type_name(self) -> str:
        return type_name(self.type)


def type_name(ttype: int) -> str:
    try:
        return GGMLQuantizationType(ttype).name
    except ValueError:
        return IK_TYPES[ttype][0] if ttype in IK_TYPES else f"type{ttype}"


def tensor_nbytes(ttype: int, shape) -> int | None:
    """Bytes of a tensor of this type and ggml shape (rows of shape[0] values); None for an unknown type."""
    if ttype in IK_TYPES:
        _, bs, ts, meta = IK_TYPES[ttype]
    elif ttype in GGML_QUANT_SIZES:
        (bs, ts), meta = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)], 0
    else:
        return None
    rows = 1
    for d in shape[1:]:
        rows *= d
    return rows * (meta + shape[0] // bs * ts) if shape else 0


@dataclass(frozen=True)
class GGUFHeader:
    paths: list[str]
    metadata: dict  # key -> value (big arrays replaced by {"array_len": n})
    tensors: list[TensorEntry]
    file_bytes: int  # sum of shard sizes on disk (apparent size)


class _Buf:
    def __init__(self, f, path: str):
        self.f, self.path = f, path

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise HybridError(f"{self.path}: truncated GGUF header", "the file is incomplete; download it again")
        return b

    def scalar(self, t: int):
        return struct.unpack(_SCALAR[t], self.read(_SIZE[t]))[0]

    def string(self) -> str:
        (n,) = struct.unpack("<Q", self.read(8))
        if n > 1 << 30:
            raise HybridError(f"{self.path}: corrupt GGUF header (string of {n} bytes)", "the file is damaged; download it again")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, t: int):
        if t in _SCALAR:
            return self.scalar(t)
        if t == 8:
            return self.string()
        if t == 9:
            (et,) = struct.unpack("<I", self.read(4))
            (n,) = struct.unpack("<Q", self.read(8))
            if et in _SCALAR:
                raw = self.read(_SIZE[et] * n)
                if n > _KEEP_ARRAYS_MAX:
                    return {"array_len": n}
                return list(struct.unpack("<" + _SCALAR[et][1] * n, raw))
            if et == 8:
                if n > _KEEP_ARRAYS_MAX:
                    self._skip_strings(n)
                    return {"array_len": n}
                return [self.string() for _ in range(n)]
            if et == 9:
                return [self.value(9) for _ in range(n)]
        raise HybridError(f"{self.path}: corrupt GGUF header (unknown value type {t})", "the file is damaged or from a newer GGUF version")

    def _skip_strings(self, n: int) -> None:
        # Read the array in large slabs and walk the length prefixes: ~50x faster than one read per string.
        f = self.f
        pos = f.tell()
        buf = b""
        off = 0
        for _ in range(n):
            if off + 8 > len(buf):
                buf = buf[off:] + f.read(1 << 20)
                pos += off
                off = 0
                if len(buf) < 8:
                    raise HybridError(f"{self.path}: truncated GGUF header", "the file is incomplete; download it again")
            ln = int.from_bytes(buf[off:off + 8], "little")
            off += 8 + ln
            if off > len(buf):
                need = off - len(buf)
                more = f.read(need + (1 << 20))
                if len(more) < need:
                    raise HybridError(f"{self.path}: truncated GGUF header", "the file is incomplete; download it again")
                buf += more
        f.seek(pos + off)


def _read_one(path: str, shard: int) -> tuple[dict, list[TensorEntry], int]:
    md, tensors, end, size = parse(path, shard)
    if size < end:
        raise HybridError(f"{path}: truncated ({size} bytes, the header describes {end})", "the download is incomplete; fetch the file again")
    return md, tensors, size


def parse(path: str, shard: int = 0) -> tuple[dict, list[TensorEntry], int, int]:
    """-> (metadata, tensors, bytes the header says the file spans, bytes on disk)."""
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except FileNotFoundError:
        raise HybridError(f"{path}: no such file", "check the path (a split model is given by its first shard)") from None
    except IsADirectoryError:
        raise HybridError(f"{path}: is a directory", "pass the .gguf file or its directory") from None
    except OSError as e:
        raise HybridError(f"{path}: cannot read ({e.strerror})", "check the file's permissions") from None
    with f:
        b = _Buf(f, path)
        magic = f.read(4)
        if magic != b"GGUF":
            raise HybridError(f"{path}: not a GGUF file (magic {magic!r})", "give a .gguf model file (safetensors/bin must be converted first)")
        version = b.scalar(4)
        if version not in (2, 3):
            raise HybridError(f"{path}: GGUF version {version} is not supported", "re-convert it with a current convert_hf_to_gguf.py (GGUF v3)")
        n_tensors, n_kv = b.scalar(10), b.scalar(10)
        if n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise HybridError(f"{path}: corrupt GGUF header", "the file is damaged; download it again")
        md: dict = {"GGUF.version": version}
        for _ in range(n_kv):
            key = b.string()
            (t,) = struct.unpack("<I", b.read(4))
            md[key] = b.value(t)
        infos = []
        for _ in range(n_tensors):
            name = b.string()
            (nd,) = struct.unpack("<I", b.read(4))
            shape = struct.unpack(f"<{nd}Q", b.read(8 * nd))
            ttype, offset = struct.unpack("<IQ", b.read(12))
            infos.append((name, shape, ttype, offset))
        align = int(md.get("general.alignment", 32))
        data_start = -(-f.tell() // align) * align
    tensors = []
    end = data_start
    for name, shape, ttype, offset in infos:
        nbytes = tensor_nbytes(ttype, shape)
        if nbytes is None:
            raise HybridError(f"{path}: tensor {name} has unknown ggml type {ttype}", "upgrade the gguf package (pip install -U gguf), or this type is a fork's own")
        tensors.append(TensorEntry(name=name, shape=tuple(int(x) for x in shape), type=ttype, nbytes=nbytes, shard=shard))
        end = max(end, data_start + offset + nbytes)
    return md, tensors, end, size


def resolve_paths(path: str | os.PathLike) -> list[str]:
    """A file, the first shard of a split set, or a directory holding one model -> the ordered shard list."""
    p = Path(path)
    if p.is_dir():
        ggufs = sorted(x for x in p.iterdir() if x.suffix == ".gguf" and x.is_file())
        models = {SHARD_RE.match(x.name).group("stem") if SHARD_RE.match(x.name) else x.name for x in ggufs}
        if not ggufs:
            raise HybridError(f"{p}: no .gguf files in this directory", "pass a .gguf file or a directory that holds one model")
        if len(models) > 1:
            raise HybridError(f"{p}: holds {len(models)} models ({', '.join(sorted(models))})", "pass the file (or first shard) of the one you want")
        first = next((x for x in ggufs if not SHARD_RE.match(x.name) or SHARD_RE.match(x.name).group("no") == "00001"), ggufs[0])
        p = first
    if not p.exists():
        raise HybridError(f"{p}: no such file", "check the path (a split model is given by its first shard)")
    m = SHARD_RE.match(p.name)
    if not m:
        return [str(p)]
    count = int(m.group("count"))
    if m.group("no") != "00001":
        raise HybridError(f"{p.name} is shard {int(m.group('no'))} of {count}",
                          f"pass the first shard, {m.group('stem')}-00001-of-{m.group('count')}.gguf")
    paths = [p.with_name(f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [x.name for x in paths if not x.exists()]
    if missing:
        raise HybridError(f"split model is missing {len(missing)} of {count} shards: {', '.join(missing)}",
                          "download every shard into the same directory")
    return [str(x) for x in paths]


def read_header(path: str | os.PathLike) -> GGUFHeader:
    paths = resolve_paths(path)
    metadata: dict = {}
    tensors: list[TensorEntry] = []
    total = 0
    for i, sp in enumerate(paths):
        md, ts, size = _read_one(sp, i)
        total += size
        if len(paths) > 1:
            no, count = md.get("split.no"), md.get("split.count")
            if count is not None and (no != i or count != len(paths)):
                raise HybridError(f"{Path(sp).name}: says it is shard {no}/{count}, expected {i}/{len(paths)}",
                                  "the shards come from different models or downloads; fetch them again together")
        if i == 0:
            metadata = md
        tensors.extend(ts)
    if len(paths) > 1:
        want = metadata.get("split.tensors.count")
        if want is not None and want != len(tensors):
            raise HybridError(f"split model lists {want} tensors but its shards hold {len(tensors)}",
                              "a shard is from a different model; download the set again")
    return GGUFHeader(paths=paths, metadata=metadata, tensors=tensors, file_bytes=total)
