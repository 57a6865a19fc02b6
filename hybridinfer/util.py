"""Small helpers shared by several stages: JSON round-trips of frozen dataclasses, byte formatting."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import socket
import tempfile
import types
import typing
from pathlib import Path

GIB = 1024**3
MIB = 1024**2


def to_dict(obj):
    """Dataclass (nested) -> plain JSON-able dict."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(cls, data):
    """Plain dict -> dataclass `cls`, following the field type hints (nested dataclasses, lists, dicts)."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} expects an object, not {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name])
    return cls(**kwargs)


def _convert(tp, value):
    if value is None:
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        return _convert(non_none[0], value) if len(non_none) == 1 else value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value)
    if origin in (list, tuple):
        inner = args[0] if args else typing.Any
        items = [_convert(inner, v) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        vt = args[1] if len(args) == 2 else typing.Any
        return {k: _convert(vt, v) for k, v in value.items()}
    return value


def dump_json(obj, indent: int = 2) -> str:
    return json.dumps(to_dict(obj), indent=indent, sort_keys=False)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write via a temp file + rename so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a written report should read like any other file
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cache_dir() -> Path:
    return Path(os.environ.get("HYBRIDINFER_CACHE") or Path.home() / ".cache" / "hybridinfer")


def shell(cmd: list[str]) -> str:
    """An argv as one copy-pasteable shell line."""
    import shlex

    return " ".join(shlex.quote(c) for c in cmd)


def ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    xs = sorted(xs)
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(f"{xs[i]}" if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, port: int) -> None:
    """One line (HybridError) when nothing could listen on host:port, before anything is started."""
    from .errors import HybridError

    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise HybridError(f"cannot listen on {host}:{port} ({e.strerror})",
                              "choose another --port, or stop what is using it") from None
