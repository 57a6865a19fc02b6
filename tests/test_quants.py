"""Torch IQ dequantizers: bit-exact against gguf.quants (and ggml's own C to_float where llama-cpp-python is
installed) on random blocks and edge values, every output dtype, CPU (and CUDA when present)."""

import ctypes

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="install.sh --dev installs torch (CPU build)")
from gguf import GGMLQuantizationType, quants  # noqa: E402

from conftest import gpu  # noqa: E402
from hybridinfer.quants import TYPES, dequantize  # noqa: E402

NAMES = list(TYPES)


def reference(raw: np.ndarray, name: str) -> np.ndarray:
    size = TYPES[name][2]
    with np.errstate(all="ignore"):
        return quants.dequantize(raw.reshape(-1, size), GGMLQuantizationType[name]).reshape(-1)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical floats, with any NaN equal to any NaN (an all-ones f16 scale is NaN in both)."""
    na, nb = np.isnan(a), np.isnan(b)
    return a.shape == b.shape and np.array_equal(na, nb) and np.array_equal(a[~na].view(np.uint32), b[~nb].view(np.uint32))


def blocks(name: str, kind: str, n: int = 64, seed: int = 0) -> np.ndarray:
    _, _, size = TYPES[name]
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.integers(0, 256, size=n * size, dtype=np.uint8)
    if kind == "zeros":
        return np.zeros(n * size, dtype=np.uint8)
    if kind == "ones":  # every sign bit, every high bit, every sub-scale at its maximum; f16 scale NaN
        return np.full(n * size, 0xFF, dtype=np.uint8)
    if kind == "finite":  # random payload, the f16 super-block scale set to a range of finite values
        raw = rng.integers(0, 256, size=n * size, dtype=np.uint8).reshape(n, size)
        if name == "IQ1_M":  # its scale lives in the top nibbles of the last four uint16 words
            d = np.float16(rng.uniform(-2, 2, n)).view(np.uint16)
            sc = raw[:, -8:].copy().view(np.uint16) & 0x0FFF
            for k in range(4):
                sc[:, k] |= ((d >> (4 * k)) & 0xF) << 12
            raw[:, -8:] = sc.view(np.uint8)
        else:
            raw[:, :2] = np.float16(rng.uniform(-2, 2, n)).view(np.uint8).reshape(n, 2)
        return raw.reshape(-1)
    if kind == "one-scale":  # d = 1.0, payload all ones: largest grid index, all signs negative
        raw = np.full((n, size), 0xFF, dtype=np.uint8)
        if name != "IQ1_M":
            raw[:, :2] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
        else:
            raw[:, -8:] = np.frombuffer(np.array([0x0FFF, 0x0FFF, 0xCFFF, 0x3FFF], np.uint16).tobytes(), np.uint8)
        return raw.reshape(-1)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["random", "finite", "zeros", "ones", "one-scale"])
@pytest.mark.parametrize("name", NAMES)
def test_bit_exact_against_gguf(name, kind):
    raw = blocks(name, kind)
    got = dequantize(raw, name).numpy()
    assert got.dtype == np.float32 and got.size == raw.size // TYPES[name][2] * TYPES[name][1]
    assert same_bits(got, reference(raw, name))
    if kind == "zeros" and name not in ("IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS"):
        assert not got.any()  # d = 0 -> all zeros


@pytest.mark.parametrize("name", NAMES)
def test_every_grid_row_and_sign(name):
    # Many blocks of random bytes reach every grid index, sign pattern and scale nibble.
    raw = blocks(name, "finite", n=4096, seed=7)
    assert same_bits(dequantize(raw, name).numpy(), reference(raw, name))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", NAMES)
def test_output_dtypes(name, dtype):
    raw = blocks(name, "finite", n=32)
    dt = getattr(torch, dtype)
    got = dequantize(raw, name, dtype=dt)
    want = torch.from_numpy(reference(raw, name)).to(dt)
    assert got.dtype == dt and torch.equal(got, want)


def test_inputs_and_errors():
    raw = blocks("IQ1_S", "finite", n=8)
    a = dequantize(raw, "IQ1_S")
    assert torch.equal(dequantize(raw.tobytes(), "iq1_s"), a)
    assert torch.equal(dequantize(torch.from_numpy(raw), 19), a)
    assert torch.equal(dequantize(raw, GGMLQuantizationType.IQ1_S), a)
    with pytest.raises(ValueError, match="whole number of IQ1_S blocks"):
        dequantize(raw[:-1], "IQ1_S")
    with pytest.raises(ValueError, match="no torch dequantizer"):
        dequantize(raw, "Q4_K")
    big = blocks("IQ2_XXS", "finite", n=40000)  # more than one CPU chunk
    assert same_bits(dequantize(big, "IQ2_XXS").numpy(), reference(big, "IQ2_XXS"))


def _ggml_to_float():
    """ggml's own C dequantizer (type traits' to_float) from the libggml llama-cpp-python ships."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import llama_cpp._ggml  # noqa: F401  (loads libggml)

    lib = llama_cpp._ggml.libggml

    class Traits(ctypes.Structure):
        _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                    ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                    ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]

    lib.ggml_get_type_traits.restype = ctypes.POINTER(Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    fn_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)

    def to_float(raw: np.ndarray, type_id: int) -> np.ndarray:
        tr = lib.ggml_get_type_traits(type_id).contents
        n = raw.size // tr.type_size * tr.blck_size
        out = np.empty(n, dtype=np.float32)
        raw = np.ascontiguousarray(raw)
        fn_t(tr.to_float)(raw.ctypes.data, out.ctypes.data, n)
        return out

    return to_float


@pytest.mark.parametrize("name", NAMES)
def test_bit_exact_against_ggml_c(name):
    to_float = _ggml_to_float()
    raw = blocks(name, "finite", n=256, seed=3)
    assert same_bits(dequantize(raw, name).numpy(), to_float(raw, TYPES[name][0]))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_cuda_equals_cpu(name):
    raw = blocks(name, "finite", n=2048)
    got = dequantize(torch.from_numpy(raw).cuda(), name)
    assert got.is_cuda
    assert same_bits(got.cpu().numpy(), reference(raw, name))
