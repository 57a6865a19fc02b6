"""Our patches to the engines' source (patches/<engine>/): the deepseek-v3 pre-tokenizer without recursion.

Each engine's real unicode.cpp (from the sdist install.sh builds) is compiled twice, as shipped and with the patch,
into the same small driver; both must split thousands of random strings identically, and only the patched one
survives 50 KB runs of one character class (the shipped one dies with SIGSEGV: llama.cpp #26965).
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC_CACHE = Path(os.environ.get("HYBRIDINFER_SRC_CACHE", Path.home() / ".cache" / "hybridinfer" / "src"))
TREES = {
    "llama.cpp": ("llama_cpp_python-0.3.36.tar.gz", "llama_cpp_python-0.3.36/vendor/llama.cpp"),
    "ik_llama.cpp": ("ik_llama_cpp_python-0.1.5.tar.gz", "ik_llama_cpp_python-0.1.5/vendor/ik_llama.cpp"),
}
PIECES = ["src/unicode.cpp", "src/unicode.h", "src/unicode-data.cpp", "src/unicode-data.h"]
ALPHABET = [" ", "  ", "\n", "\r", "\t", "\v", "\f", "a", "Z", "q", "-", "!", '"', "'", "$", "+", "`", "~", "_", "0",
            "7", "é", "ß", "中", "文", "あ", "ー", "カ", "\u0301", "\u00a0", "\u2028", "\u3000", "€", "«", "😀", "\u0085",
            "١", "½", "§", "\u200b", "\x01", "Ω", "ँ", "가"]


def _build(engine: str, tmp: Path, patched: bool) -> Path:
    sdist, tree = TREES[engine]
    path = SRC_CACHE / sdist
    if not path.exists():
        pytest.skip(f"{sdist} not in {SRC_CACHE} (./install.sh downloads it)")
    src = tmp / ("patched" if patched else "shipped")
    with tarfile.open(path) as tf:
        for piece in PIECES:
            member = tf.getmember(f"{tree}/{piece}")
            member.name = piece
            tf.extract(member, src, filter="data")
    if patched:
        patch = ROOT / "patches" / engine / "0001-deepseek-v3-pretokenizer-no-recursion.patch"
        subprocess.run(["patch", "-s", "-p1", "-d", str(src), "-i", str(patch)], check=True)
    exe = src / "split"
    subprocess.run(["g++", "-O1", "-std=c++17", f"-I{src / 'src'}", str(ROOT / "patches" / "pretokenizer_check.cpp"),
                    str(src / "src/unicode.cpp"), str(src / "src/unicode-data.cpp"), "-o", str(exe)], check=True)
    return exe


def _split(exe: Path, texts: list[str]) -> subprocess.CompletedProcess:
    data = "".join(t.encode().hex() + "\n" for t in texts)
    return subprocess.run([str(exe)], input=data, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not shutil.which("g++") or not shutil.which("patch"), reason="needs g++ and patch")
@pytest.mark.parametrize("engine", sorted(TREES))
def test_patched_pretokenizer_matches_std_regex_and_survives_long_runs(engine, tmp_path):
    shipped, patched = _build(engine, tmp_path, False), _build(engine, tmp_path, True)
    rng = random.Random(0)
    texts = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 24))) for _ in range(20000)]
    texts += ["Hello, world!\n\n  def f(x):\n\treturn x**2  # ok", "DeepSeek-R1 的推理 カタカナ 123456789 ...!!!\r\n"]
    a, b = _split(shipped, texts), _split(patched, texts)
    assert a.returncode == 0 and b.returncode == 0
    assert a.stdout == b.stdout  # identical splits, word for word

    long = [" " * 50000, "-" * 50000, "\n" * 50000, "ab" * 25000, "中" * 20000, "é" * 25000]
    b = _split(patched, long)
    assert b.returncode == 0, b.stderr
    assert b.stdout.splitlines()[0] == "50000,"  # one run of spaces is one word, as before
    soft, _ = resource.getrlimit(resource.RLIMIT_STACK)
    if soft != resource.RLIM_INFINITY and soft <= 64 << 20:
        a = _split(shipped, [" " * 50000])
        assert a.returncode != 0  # the shipped tokenizer overflows its stack: what the patch removes
