"""Vectorized torch dequantizers for ggml's IQ quant types (the ones Unsloth's dynamic R1 quants use).

`dequantize(data, "IQ1_S", device="cuda", dtype=torch.bfloat16)` turns raw GGUF block bytes into a flat tensor.
Every type is a handful of whole-tensor ops on (n_blocks, ...) views: no Python loop per block. The lookup grids
(ggml's iq*_grid tables, taken from the `gguf` package) are expanded once per device into float tensors.
Arithmetic is float32 in the same order as `gguf.quants` (which matches ggml's C `to_float`), so results are
bit-identical; the output dtype conversion happens last.

torch is imported lazily: the rest of hybridinfer does not need it.
"""

from __future__ import annotations

from functools import lru_cache

QK_K = 256
# name -> (ggml type id, elements per block, bytes per block)
TYPES = {
    "IQ2_XXS": (16, 256, 66), "IQ2_XS": (17, 256, 74), "IQ3_XXS": (18, 256, 98), "IQ1_S": (19, 256, 50),
    "IQ4_NL": (20, 32, 18), "IQ3_S": (21, 256, 110), "IQ2_S": (22, 256, 82), "IQ4_XS": (23, 256, 136),
    "IQ1_M": (29, 256, 56),
}
BY_ID = {v[0]: k for k, v in TYPES.items()}
KVALUES_IQ4 = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
IQ1_DELTA = 0.125


def _torch():
    import torch

    return torch


GRID_SOURCE: dict | None = None  # {name: (grid_map, grid_hex, shape)}; set where `gguf` is absent (the KT patch)


def grid_source() -> dict:
    """ggml's packed grids as gguf-py stores them: values map, hex-packed indices, shape."""
    if GRID_SOURCE is not None:
        return GRID_SOURCE
    from gguf import quants

    return {n: (tuple(getattr(quants, n).grid_map), bytes(getattr(quants, n).grid_hex), tuple(getattr(quants, n).grid_shape))
            for n in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S")} | \
        {"KSIGNS": ((), bytes(quants.IQ2_XXS.ksigns), (128,))}


@lru_cache(maxsize=None)
def _np_tables():
    """ggml's grids (float32, rows of 4 or 8) and ksigns (uint8), decoded like gguf-py's init_grid."""
    import numpy as np

    src = grid_source()
    grids = {}
    for name, (gmap, ghex, shape) in src.items():
        if name == "KSIGNS":
            continue
        bits = int(np.ceil(np.log2(len(gmap))))
        per_byte = 8 // bits
        g = np.frombuffer(ghex, dtype=np.uint8).reshape(-1, 2)
        g = (np.where(g > 0x40, g + 9, g) & 0x0F) << np.array([4, 0], dtype=np.uint8)
        g = (g[:, 0] | g[:, 1]).reshape(-1, 1) >> np.arange(0, 8, 8 // per_byte, dtype=np.uint8)
        g = (g & ((1 << bits) - 1)).reshape(-1)
        grids[name] = np.asarray(gmap, dtype=np.float32)[g].reshape(shape)
    return grids, np.frombuffer(src["KSIGNS"][1], dtype=np.uint8).copy()


def _signs(bits, width):
    """uint8 array of sign bytes -> (..., width) of ±1.0 from their low `width` bits (set bit = negative)."""
    import numpy as np

    b = (bits[..., None] >> np.arange(width, dtype=np.uint8)) & 1
    return np.where(b == 0, 1.0, -1.0).astype(np.float32)


@lru_cache(maxsize=None)
def _table(name: str, device: str):
    """The expanded lookup table of one type, built once per device: every (grid row, signs) combination already
    multiplied out, so dequantizing is one gather and one multiply by the scale. Sign flips are exact in float,
    so the products equal the reference's (scale * grid) * sign bit for bit."""
    import numpy as np

    grids, ksigns = _np_tables()
    if name == "IQ2_XXS":    # index = grid byte * 128 + 7-bit sign index          -> rows of 8
        t = grids[name][:, None, :] * _signs(ksigns, 8)[None, :, :]
    elif name == "IQ2_XS":   # index = the stored uint16: sign index << 9 | grid index -> rows of 8
        t = grids[name][None, :, :] * _signs(ksigns, 8)[:, None, :]
    elif name in ("IQ2_S",):  # index = (grid index * 2 + half) * 16 + sign nibble      -> rows of 4
        g = grids[name].reshape(-1, 4)
        t = g[:, None, :] * _signs(np.arange(16, dtype=np.uint8), 4)[None, :, :]
    elif name in ("IQ3_XXS", "IQ3_S"):  # index = grid index * 16 + sign nibble       -> rows of 4
        t = grids[name][:, None, :] * _signs(np.arange(16, dtype=np.uint8), 4)[None, :, :]
    elif name == "IQ1_S":    # index = grid index * 2 + delta sign bit               -> rows of 8
        d = np.array([IQ1_DELTA, -IQ1_DELTA], dtype=np.float32)
        t = grids[name][:, None, :] + d[None, :, None]
    elif name == "KSIGNS":   # 7-bit sign index -> the 8 sign bits as a byte
        return _torch().from_numpy(ksigns.astype(np.int32)).to(device)
    elif name == "IQ4_PAIRS":  # a byte -> the values of its low and high nibble
        kv = np.array(KVALUES_IQ4, dtype=np.float32)
        b = np.arange(256)
        t = np.stack([kv[b & 15], kv[b >> 4]], axis=-1)
    else:
        raise KeyError(name)
    t = np.ascontiguousarray(t, dtype=np.float32)
    return _torch().from_numpy(t.reshape(-1, t.shape[-1])).to(device)


def _f16(b):
    """(n, 2) uint8 -> (n,) float32 from little-endian f16."""
    return b.contiguous().view(_torch().float16).float().reshape(-1)


def _u16(b):
    """(..., 2k) uint8 -> (..., k) int32 holding little-endian uint16 values."""
    t = _torch()
    b = b.to(t.int32)
    return b[..., 0::2] | (b[..., 1::2] << 8)


def _u32(b):
    t = _torch()
    b = b.to(t.int64)
    return (b[..., 0::4] | (b[..., 1::4] << 8) | (b[..., 2::4] << 16) | (b[..., 3::4] << 24))


def _nibbles(b):
    """(..., k) uint8 -> (..., k, 2) int32: low nibble, high nibble."""
    t = _torch()
    b = b.to(t.int32)
    return t.stack([b & 15, b >> 4], dim=-1)


def _emit(out, table, idx, scale, groups):
    """out[...] = table[idx] * scale, written straight into `out` ((n, block) float32).
    scale: (n, groups) float32, one factor per `groups` equal slices of each block."""
    t = _torch()
    o = out.view(-1, table.shape[1])
    t.index_select(table, 0, idx.reshape(-1).long(), out=o)
    out.view(out.shape[0], groups, -1).mul_(scale.reshape(out.shape[0], groups, 1))


# --- one function per type: (n_blocks, type_size) uint8 -> fills out (n_blocks, block elements) float32 -------------

def _iq2_xxs(blk, out):
    t, dev = _torch(), str(blk.device)
    n = blk.shape[0]
    d = _f16(blk[:, :2])
    aux = _u32(blk[:, 2:].reshape(n, 8, 8)[..., 4:])[..., 0]                       # (n, 8) sign/scale words
    db = d[:, None] * (0.5 + (aux >> 28).to(t.float32)) * 0.25
    sidx = (aux[..., None] >> t.tensor([0, 7, 14, 21], device=dev)) & 0x7F          # (n, 8, 4)
    gidx = blk[:, 2:].reshape(n, 8, 8)[..., :4].to(t.int64)                         # (n, 8, 4) grid bytes
    _emit(out, _table("IQ2_XXS", dev), gidx * 128 + sidx, db, 8)


def _iq2_xs(blk, out):
    t, dev = _torch(), str(blk.device)
    n = blk.shape[0]
    d = _f16(blk[:, :2])
    qs = _u16(blk[:, 2:2 + QK_K // 4])                                              # (n, 32)
    sc = _nibbles(blk[:, 2 + QK_K // 4:]).reshape(n, 16).to(t.float32)
    db = d[:, None] * (0.5 + sc) * 0.25
    _emit(out, _table("IQ2_XS", dev), qs, db, 16)


def _iq2_s(blk, out):
    t, dev = _torch(), str(blk.device)
    n = blk.shape[0]
    d = _f16(blk[:, :2])
    o = 2
    qs = blk[:, o:o + QK_K // 8].to(t.int64); o += QK_K // 8
    sb = blk[:, o:o + QK_K // 8]; o += QK_K // 8
    qh = blk[:, o:o + QK_K // 32].to(t.int64); o += QK_K // 32
    sc = _nibbles(blk[:, o:]).reshape(n, 16).to(t.float32)
    db = d[:, None] * (0.5 + sc) * 0.25
    hi = ((qh[..., None] >> t.tensor([0, 2, 4, 6], device=dev)) & 3).reshape(n, 32)
    g = (qs | (hi << 8))[..., None] * 2 + t.tensor([0, 1], device=dev)              # (n, 32, 2) half-rows
    idx = g * 16 + _nibbles(sb).to(t.int64)
    _emit(out, _table("IQ2_S", dev), idx, db, 16)


def _iq3_xxs(blk, out):
    t, dev = _torch(), str(blk.device)
    n = blk.shape[0]
    d = _f16(blk[:, :2])
    qs = blk[:, 2:2 + QK_K // 4].to(t.int64).reshape(n, 8, 4, 2)                    # grid rows of 4
    aux = _u32(blk[:, 2 + QK_K // 4:])                                              # (n, 8)
    db = d[:, None] * (0.5 + (aux >> 28).to(t.float32)) * 0.5
    sidx = (aux[..., None] >> t.tensor([0, 7, 14, 21], device=dev)) & 0x7F          # (n, 8, 4)
    sbyte = _table("KSIGNS", dev)[sidx]
    nib = t.stack([sbyte & 15, sbyte >> 4], dim=-1).to(t.int64)                     # (n, 8, 4, 2)
    _emit(out, _table("IQ3_XXS", dev), qs * 16 + nib, db, 8)


def _iq3_s(blk, out):
    t, dev = _torch(), str(blk.device)
    n = blk.shape[0]
    d = _f16(blk[:, :2])
    o = 2
    qs = blk[:, o:o + QK_K // 4].to(t.int64); o += QK_K // 4
    qh = blk[:, o:o + QK_K // 32].to(t.int64); o += QK_K // 32
    sb = blk[:, o:o + QK_K // 8]; o += QK_K // 8
    sc = _nibbles(blk[:, o:]).reshape(n, 8)
    db = d[:, None] * (1 + 2 * sc).to(t.float32)
    hi = ((qh[..., None] >> t.arange(8, device=dev)) & 1).reshape(n, 64)
    idx = (qs | (hi << 8)) * 16 + _nibbles(sb).reshape(n, 64).to(t.int64)
    _emit(out, _table("IQ3_S", dev), idx, db, 8)


def _iq1_s(blk, out):
    t, dev = _torch(), str(blk.device)
    n = blk.shape[0]
    d = _f16(blk[:, :2])
    qs = blk[:, 2:2 + QK_K // 8].to(t.int64).reshape(n, 8, 4)
    qh = _u16(blk[:, 2 + QK_K // 8:]).to(t.int64)                                   # (n, 8)
    dl = d[:, None] * (2 * ((qh >> 12) & 7) + 1).to(t.float32)
    hi = (qh[..., None] >> t.tensor([0, 3, 6, 9], device=dev)) & 7                  # (n, 8, 4)
    neg = (qh[..., None] >> 15) & 1
    _emit(out, _table("IQ1_S", dev), (qs | (hi << 8)) * 2 + neg, dl, 8)


def _iq1_m(blk, out):
    t, dev = _torch(), str(blk.device)
    n = blk.shape[0]
    qs = blk[:, :QK_K // 8].to(t.int64)                                             # (n, 32)
    qh = _nibbles(blk[:, QK_K // 8:QK_K // 8 + QK_K // 16]).reshape(n, 32).to(t.int64)
    sc = _u16(blk[:, QK_K // 8 + QK_K // 16:])                                      # (n, 4)
    # the block's f16 scale is spread over the top nibbles of the four scale words
    dbits = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00) | (sc[:, 3] & 0xF000)
    d = _u16_to_f16(dbits)
    s = ((sc[..., None] >> t.tensor([0, 3, 6, 9], device=dev)) & 7).reshape(n, 16)
    dl = d[:, None] * (2 * s + 1).to(t.float32)
    idx = (qs | ((qh & 7) << 8)) * 2 + (qh >> 3)
    _emit(out, _table("IQ1_S", dev), idx, dl, 16)


def _u16_to_f16(x):
    """int32 tensor holding uint16 bit patterns -> float32 values of those f16 numbers."""
    t = _torch()
    return t.stack([(x & 0xFF).to(t.uint8), ((x >> 8) & 0xFF).to(t.uint8)], dim=-1).contiguous() \
        .view(t.float16).float().reshape(x.shape)


def _iq4_nl(blk, out):
    t, dev = _torch(), str(blk.device)
    n = blk.shape[0]
    d = _f16(blk[:, :2])
    q = blk[:, 2:].reshape(-1).to(t.int64)                                           # low nibbles first, then high
    pairs = t.index_select(_table("IQ4_PAIRS", dev), 0, q).view(n, 16, 2)
    t.mul(pairs.permute(0, 2, 1), d.view(n, 1, 1), out=out.view(n, 2, 16))


def _iq4_xs(blk, out):
    t, dev = _torch(), str(blk.device)
    n = blk.shape[0]
    d = _f16(blk[:, :2])
    sh = _u16(blk[:, 2:4]).reshape(n, 1)
    sl = _nibbles(blk[:, 4:4 + QK_K // 64]).reshape(n, 8)
    shi = (sh >> (2 * t.arange(8, device=dev, dtype=t.int32))) & 3
    dl = d[:, None] * ((sl | (shi << 4)) - 32).to(t.float32)
    q = blk[:, 4 + QK_K // 64:].reshape(-1).to(t.int64)
    pairs = t.index_select(_table("IQ4_PAIRS", dev), 0, q).view(n, 8, 16, 2)      # byte -> (low, high) values
    t.mul(pairs.permute(0, 1, 3, 2), dl.view(n, 8, 1, 1), out=out.view(n, 8, 2, 16))


_FUNCS = {"IQ2_XXS": _iq2_xxs, "IQ2_XS": _iq2_xs, "IQ2_S": _iq2_s, "IQ3_XXS": _iq3_xxs, "IQ3_S": _iq3_s,
          "IQ1_S": _iq1_s, "IQ1_M": _iq1_m, "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs}
CHUNK_BLOCKS = 16384  # CPU: work in cache-sized slices; one pass over the output in memory


def type_name(qtype) -> str:
    """'IQ1_S', 19, or a gguf GGMLQuantizationType -> 'IQ1_S'."""
    if isinstance(qtype, str):
        name = qtype.upper()
    else:
        name = BY_ID.get(int(qtype))
    if name not in TYPES:
        raise ValueError(f"no torch dequantizer for ggml type {qtype!r}; have {', '.join(TYPES)}")
    return name


def dequantize(data, qtype, device=None, dtype=None):
    """Raw block bytes (bytes, numpy uint8 or a torch uint8 tensor) of an IQ type -> flat tensor of its elements.

    device: where to compute (default: the tensor's own, else CPU). dtype: float32 (default), float16 or bfloat16.
    """
    import numpy as np

    t = _torch()
    name = type_name(qtype)
    _, block, size = TYPES[name]
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = np.frombuffer(data, dtype=np.uint8)
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        data = t.from_numpy(data if data.flags.writeable else data.copy())
    if data.dtype != t.uint8:
        raise TypeError(f"expected raw bytes (uint8), got {data.dtype}")
    data = data.reshape(-1)
    if data.numel() % size:
        raise ValueError(f"{data.numel()} bytes is not a whole number of {name} blocks ({size} bytes each)")
    if device is not None:
        data = data.to(device)
    blk = data.reshape(-1, size)
    n = blk.shape[0]
    out = t.empty((n, block), dtype=t.float32, device=data.device)
    step = n if data.device.type != "cpu" else CHUNK_BLOCKS
    for i in range(0, n, step):
        _FUNCS[name](blk[i:i + step], out[i:i + step])
    dtype = dtype or t.float32
    return out.reshape(-1) if dtype == t.float32 else out.reshape(-1).to(dtype)
