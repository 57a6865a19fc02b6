"""CPU-feature logic against recorded /proc/cpuinfo flag lines of real CPUs (tests/fixtures/cpu-flags/, each file's
first line names its source), never against the CPU the tests happen to run on: hybridinfer's ISA tier, the CPU
variant kt-kernel loads (kt-kernel 0.7.2's own detect_cpu_features from the PyPI wheel, fed each file as its
/proc/cpuinfo), and install.sh's engine-cache key."""

from __future__ import annotations

import io
import itertools
import subprocess
import types
from pathlib import Path

import pytest

import pypi_src
from hybridinfer.engines.kt_probe import KT_KERNEL_VARIANTS, kt_kernel_variant
from hybridinfer.probe import ISA_FLAGS, isa_flags, probe_cpu

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "cpu-flags"
WHEEL = "kt_kernel-0.7.2-cp311-cp311-manylinux_2_35_x86_64.whl"

# recorded CPU -> (hybridinfer's ISA tier, kt-kernel's CPU variant)
EXPECTED = {
    "amd-epyc-avx512-2vcpu.txt": ("avx512", "avx512_bf16"),  # this project's AVX-512 EPYC
    "amd-epyc-7r13-zen3.txt": ("avx2", "avx2"),  # AVX2-only EPYC (Zen 3)
    "amd-epyc-9654-zen4.txt": ("avx512", "avx512_bf16"),  # Zen 4: the kernel writes avx512vbmi, kt-kernel asks avx512_vbmi
    "intel-xeon-6326-ice-lake.txt": ("avx512", "avx512_vbmi"),  # Ice Lake: VNNI and VBMI, no BF16
    "intel-xeon-8480-sapphire-rapids.txt": ("amx", "amx"),
}
CPUS = sorted(p.name for p in FIXTURES.glob("*.txt"))


def cpuinfo(name: str) -> str:
    return (FIXTURES / name).read_text()


def flag_words(name: str) -> list[str]:
    line = next(x for x in cpuinfo(name).splitlines() if x.startswith("flags"))
    return line.partition(":")[2].split()


@pytest.fixture(scope="module")
def kt_kernel_detect():
    """kt-kernel's detect_cpu_features, reading the given text where it reads /proc/cpuinfo."""
    mod = types.ModuleType("kt_kernel_cpu_detect")
    exec(compile(pypi_src.read(WHEEL, "kt_kernel/_cpu_detect.py"), "kt_kernel/_cpu_detect.py", "exec"), mod.__dict__)

    def detect(text: str) -> str:
        def fake_open(path, *a, **k):
            assert path == "/proc/cpuinfo", path  # the only thing it reads
            return io.StringIO(text)

        mod.open = fake_open  # module globals shadow the builtin
        try:
            return mod.detect_cpu_features()
        finally:
            del mod.open

    return detect


@pytest.fixture(autouse=True)
def _no_variant_override(monkeypatch):
    monkeypatch.delenv("KT_KERNEL_CPU_VARIANT", raising=False)  # kt-kernel's override would skip the detection


def test_every_recorded_cpu_names_its_source_and_is_expected():
    assert set(CPUS) == set(EXPECTED)
    for name in CPUS:
        first, *rest = cpuinfo(name).splitlines()
        assert first.startswith("# ") and ("github.com/" in first or "this project's machines" in first), name
        assert [x for x in rest if x.startswith("model name")] and [x for x in rest if x.startswith("flags")], name


@pytest.mark.parametrize("name", CPUS)
def test_isa_tier_from_the_recorded_flags(name):
    cpu = probe_cpu(cpuinfo(name))
    words = flag_words(name)
    assert cpu.isa == EXPECTED[name][0]
    assert cpu.model == next(x for x in cpuinfo(name).splitlines() if x.startswith("model name")).partition(":")[2].strip()
    assert cpu.logical_cores == 1  # an excerpt without processor lines
    assert cpu.flags == isa_flags(words)
    assert all(f in words or f.replace("_", "") in words for f in cpu.flags)
    assert ("avx512_vbmi" in cpu.flags) == ("avx512vbmi" in words)  # the kernel's spelling is not lost


@pytest.mark.parametrize("name", CPUS)
def test_kt_kernel_variant_is_kt_kernels_own_choice(name, kt_kernel_detect):
    theirs = kt_kernel_detect(cpuinfo(name))
    assert theirs == EXPECTED[name][1]
    assert kt_kernel_variant(flag_words(name)) == theirs  # a profile written from the flags line
    assert kt_kernel_variant(probe_cpu(cpuinfo(name)).flags) == theirs  # what probe keeps (and a probed profile records)


def test_kt_kernel_variant_equals_kt_kernel_for_every_flag_set(kt_kernel_detect):
    """Every subset of the flags it asks for, in both spellings, plus near misses and upper case."""
    needed = {f for _, need in KT_KERNEL_VARIANTS for f in need}
    assert needed <= set(ISA_FLAGS)  # probe keeps every flag the variant depends on
    universe = ["amx_tile", "amx_int8", "amx_bf16", "avx512f", "avx512bw", "avx512_vnni", "avx512vnni", "avx512_vbmi",
                "avx512vbmi", "avx512_bf16", "avx2", "avx512_bw", "AVX512_BF16", "avx512_vbmi2"]
    seen = set()
    for n in range(len(universe) + 1):
        for words in itertools.combinations(universe, n):
            theirs = kt_kernel_detect("processor\t: 0\nflags\t\t: " + " ".join(words) + "\n")
            assert kt_kernel_variant(words) == theirs, words
            assert kt_kernel_variant(isa_flags(words)) == theirs, words
            seen.add(theirs)
    assert seen == {name for name, _ in KT_KERNEL_VARIANTS}


# --- install.sh: the engine cache key ------------------------------------------------------------------------
# The x86 features ggml's CPU code is built for (ggml/src/CMakeLists.txt variants: SSE42 AVX F16C FMA AVX2 BMI2
# AVX_VNNI AVX512 AVX512_VBMI AVX512_VNNI AVX512_BF16 AMX_TILE AMX_INT8; -march=native picks them from these).
GGML_FLAGS = {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx_vnni", "avx512f", "avx512bw", "avx512dq",
              "avx512vl", "avx512cd", "avx512vbmi", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
              "amx_int8", "amx_bf16"}


def cpu_isa(cpuinfo_path: Path) -> list[str]:
    """install.sh's own cpu_isa(), run by bash on a recorded cpuinfo instead of this box's."""
    script = (ROOT / "install.sh").read_text()
    start = script.index("cpu_isa() {")
    func = script[start:script.index("\n}\n", start) + 3]
    r = subprocess.run(["bash", "-c", func + 'cpu_isa "$1"', "cpu_isa", str(cpuinfo_path)],
                       capture_output=True, text=True, check=True)
    return r.stdout.split()


@pytest.mark.parametrize("name", CPUS)
def test_install_cache_key_lists_every_feature_the_build_uses(name):
    key = cpu_isa(FIXTURES / name)
    words = set(flag_words(name))
    assert len(set(key)) == len(key) and set(key) <= words  # the CPU's own flags, each once
    assert GGML_FLAGS & words <= set(key), sorted(GGML_FLAGS & words - set(key))


def test_install_cache_key_differs_whenever_the_build_would():
    """A cached engine build is never served to a CPU whose -march=native build differs."""
    keys = {name: cpu_isa(FIXTURES / name) for name in CPUS}
    for a, b in itertools.combinations(CPUS, 2):
        if GGML_FLAGS & set(flag_words(a)) != GGML_FLAGS & set(flag_words(b)):
            assert keys[a] != keys[b], (a, b)
