"""Where verified downloads live: a small JSON file in the hybridinfer cache dir (HYBRIDINFER_CACHE); and the
catalog of known giant-MoE quants `hybridinfer download --list` shows (CATALOG).

`serve --gguf REPO:QUANT` and `plan` find a downloaded quant here; the KTransformers engine finds the config
folder of a repository through `kt_config_dir(repo)`. An entry is written only after verification, so a
partial download is never found here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from dataclasses import dataclass

from ..util import atomic_write, cache_dir


@dataclass(frozen=True)
class Known:
    """One published quant worth knowing: where it is, the files to fetch, its size, the header shape the tests
    plan it with (hybridinfer/demo/shapes.py) and where the size comes from."""
    repo: str
    quant: str
    include: str  # file pattern, as `modelscope download --include` / `huggingface-cli download --include` take it
    size: float | None  # published bytes (decimal GB as the hub lists them); None: no published size found
    arch: str
    shape: str
    source: str


def _catalog() -> tuple[Known, ...]:
    from ..demo.shapes import FLAGSHIPS, MODELS

    out = [Known("unsloth/DeepSeek-R1-GGUF", "UD-IQ1_S", "**UD-IQ1_S**", 131e9, "deepseek2", "r1-ud-iq1_s",
                 "131 GB: Unsloth's 1.58-bit DeepSeek-R1 (README; unsloth.ai/blog/deepseekr1-dynamic)")]
    for shape, (repo, quant, size, source) in FLAGSHIPS.items():
        out.append(Known(repo, quant, f"**{quant}**", size, MODELS[shape][0], shape, source))
    return tuple(out)


CATALOG = _catalog()


def catalog_lines() -> list[str]:
    """`download --list`: one line per known quant, ready to paste into `download REPO --quant Q`."""
    lines = [f"{'repository':44s} {'quant':11s} {'size':>9s}  arch"]
    for k in CATALOG:
        size = f"{k.size / 1e9:6.1f} GB" if k.size else f"{'n/a':>9s}"
        lines.append(f"{k.repo:44s} {k.quant:11s} {size}  {k.arch}")
    lines.append("fetch one with: hybridinfer download REPO --quant QUANT [--plan-only]")
    return lines


def _path() -> Path:
    return cache_dir() / "downloads.json"


def load() -> dict:
    try:
        data = json.loads(_path().read_text())
    except (OSError, ValueError):
        return {"gguf": {}, "kt_config": {}}
    data.setdefault("gguf", {})
    data.setdefault("kt_config", {})
    return data


def _save(data: dict) -> None:
    atomic_write(_path(), json.dumps(data, indent=2) + "\n")


def gguf_key(repo: str, quant: str) -> str:
    return f"{repo}:{quant}".lower()


def record_gguf(repo: str, quant: str, source: str, first: Path, files: dict[str, int]) -> None:
    data = load()
    data["gguf"][gguf_key(repo, quant)] = {"repo": repo, "quant": quant, "source": source, "path": str(first),
                                           "files": files, "verified": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _save(data)


def find_gguf(repo: str, quant: str) -> Path | None:
    """The first shard of a verified download whose files are all still there at their recorded sizes."""
    e = load()["gguf"].get(gguf_key(repo, quant))
    if not e:
        return None
    for p, size in e["files"].items():
        if not Path(p).is_file() or Path(p).stat().st_size != size:
            return None
    return Path(e["path"])


def record_kt_config(repo: str, source: str, folder: Path, files: list[str]) -> None:
    data = load()
    data["kt_config"][repo.lower()] = {"repo": repo, "source": source, "dir": str(folder), "files": files,
                                       "verified": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _save(data)


def kt_config_dir(repo: str) -> Path | None:
    """The folder holding `repo`'s config/tokenizer/code (KTransformers' --model_path), or None if not fetched."""
    e = load()["kt_config"].get(repo.lower())
    if not e:
        return None
    folder = Path(e["dir"])
    return folder if (folder / "config.json").is_file() else None
