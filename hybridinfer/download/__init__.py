"""Models by name from ModelScope or Hugging Face: `hybridinfer download REPO --quant Q`, `--kt-config REPO`, and
`serve --gguf REPO:QUANT`. Hub access goes through the hubs' own client libraries (see `hubs.py`)."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import HybridError
from .registry import find_gguf, kt_config_dir

__all__ = ["is_repo_ref", "parse_ref", "local_gguf", "ensure_gguf", "kt_config_dir"]

_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?::(?P<quant>[\w.-]+))?$")


def is_repo_ref(value: str | None) -> bool:
    """`owner/name[:QUANT]` that is not a file on this machine (a path wins when both could be meant)."""
    if not value or Path(value).exists() or value.endswith(".gguf"):
        return False
    return bool(_REF.match(value))


def parse_ref(value: str) -> tuple[str, str | None]:
    m = _REF.match(value)
    if not m:
        raise HybridError(f"'{value}' is not a repository reference", "write it as owner/name:QUANT, e.g. unsloth/DeepSeek-R1-GGUF:UD-IQ1_S")
    return m.group("repo"), m.group("quant")


def local_gguf(value: str) -> str:
    """A path as given, or the first shard of a verified download for `owner/name:QUANT` (never downloads)."""
    if not is_repo_ref(value):
        return value
    repo, quant = parse_ref(value)
    found = find_gguf(repo, quant) if quant else None
    if found is None:
        raise HybridError(f"{value} is not downloaded", f"run `hybridinfer download {repo}{' --quant ' + quant if quant else ''}` first")
    return str(found)


def ensure_gguf(value: str, source: str = "modelscope", hw=None) -> str:
    """`serve --gguf`: a path as given; a repository reference resolves to its verified download, fetching it
    first (after the same listing, disk and plan checks as `hybridinfer download`) when it is not here."""
    if not is_repo_ref(value):
        return value
    repo, quant = parse_ref(value)
    found = find_gguf(repo, quant) if quant else None
    if found is not None:
        return str(found)
    from .flow import download_quant

    return str(download_quant(repo, quant, source, None, hw=hw))
