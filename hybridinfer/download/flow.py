"""`download`: list → choose a quant → predict (from the shards' GGUF headers) → check disk → fetch → verify.

Nothing is fetched before the checks pass. Bytes gather in `<file>.incomplete` and are renamed into place only
when complete, so `serve`/`inspect` never see a partial shard under a model name; a verified quant is recorded
in the registry, which is what `serve --gguf REPO:QUANT` trusts.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from ..errors import HybridError
from ..util import GIB, MIB, cache_dir
from .registry import record_gguf, record_kt_config
from .hubs import get_source, incomplete_path
from .layout import Quant, RemoteFile, config_files, find_quants, pick_quant

HEADER_FIRST_READ = 1 * MIB
HEADER_MAX = 64 * MIB
DEFAULT_KEEP_FREE = 2 * GIB  # left free on the target filesystem after the download


def default_dir(repo: str) -> Path:
    return cache_dir() / "models" / repo


@dataclass(frozen=True)
class Survey:
    """Everything decided before a byte of weights moves."""
    repo: str
    source: str
    endpoint: str
    quants: list[Quant]
    quant: Quant | None
    root: Path
    present: int = 0  # bytes of this quant already on disk (finished files and partial ones)
    free: int = 0
    keep_free: int = DEFAULT_KEEP_FREE
    header_bytes: int = 0
    servable: bool = True
    verdict: str = ""  # the planner's prediction, or why this box cannot serve it
    room: str = ""  # another filesystem with enough space, when this one is short
    lines: list[str] = field(default_factory=list)

    @property
    def need(self) -> int:
        return (self.quant.size if self.quant else 0) - self.present

    @property
    def shortfall(self) -> int:
        return max(0, self.need + self.keep_free - self.free)

    def target(self, f: RemoteFile) -> Path:
        return self.root / f.path


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / MIB:.1f} MiB"


def _present(target: Path, size: int) -> int:
    if target.is_file():
        return size if target.stat().st_size == size else 0
    part = incomplete_path(target)
    return min(part.stat().st_size, size) if part.is_file() else 0


def _free(path: Path) -> tuple[Path, int]:
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return p, shutil.disk_usage(p).free


def _room_elsewhere(need: int, here: Path) -> str:
    """A mounted filesystem (other than `here`'s) with room for `need` bytes, for the error's fix."""
    import psutil

    here_dev = os.stat(here).st_dev
    best = None
    for part in psutil.disk_partitions(all=False):
        try:
            if os.stat(part.mountpoint).st_dev == here_dev or not os.access(part.mountpoint, os.W_OK):
                continue
            free = shutil.disk_usage(part.mountpoint).free
        except OSError:
            continue
        if free >= need and (best is None or free > best[1]):
            best = (part.mountpoint, free)
    return f"--dir on {best[0]} ({_gib(best[1])} free)" if best else ""


def read_headers(hub, repo: str, q: Quant, into: Path) -> tuple[object, int]:
    """Fetch each shard's GGUF header with Range requests and lay it out as a sparse file of the listed size, so
    `inspect` reads exactly what it would read from the full download. -> (ModelInfo, header bytes fetched)."""
    from ..ggufio import parse
    from ..inspect_gguf import inspect

    fetched = 0
    for i, f in enumerate(q.files):
        local = into / PurePosixPath(f.path).name
        buf = hub.read_range(repo, f, 0, min(f.size, HEADER_FIRST_READ) - 1)
        while True:
            local.write_bytes(buf)
            try:
                _, _, end, _ = parse(str(local), i)
                break
            except HybridError as e:
                if "truncated" not in e.problem or len(buf) >= f.size or len(buf) >= HEADER_MAX:
                    raise HybridError(f"{repo}/{f.path} on {hub.name}: {e.problem.split(': ', 1)[-1]}",
                                      "the file on the hub is damaged; pick another quant (or source) or report it") from None
                buf += hub.read_range(repo, f, len(buf), min(f.size, 4 * len(buf)) - 1)
        if end > f.size:
            raise HybridError(f"{repo}/{f.path} on {hub.name}: its header describes {end} bytes but the file has {f.size}",
                              "the file on the hub is truncated; pick another quant (or source) or report it")
        fetched += len(buf)
        os.truncate(local, f.size)  # sparse: the tensor data region costs no disk
    return inspect(into / PurePosixPath(q.first.path).name), fetched


def _box(hw) -> str:
    return "this box" if hw.source == "probe" else hw.id


def _predict(model, hw) -> tuple[bool, str]:
    from ..plan import PlanOptions, make_plan

    try:
        plan = make_plan(hw, model, PlanOptions())
    except HybridError as e:
        return False, f"cannot serve it on {_box(hw)}: {e.problem}"
    p = plan.prediction
    how = "streaming weights from disk, " if plan.streaming else ""
    return True, (f"on {_box(hw)}: engine {plan.engine}, rules {plan.rules}, ctx {plan.ctx}, {how}predicted decode {p.decode_tps:g} tok/s, "
                  f"prefill ~{p.prefill_tps:g} tok/s")


def survey(repo: str, quant: str | None, source: str, root: Path | None, hw=None,
           keep_free: int = DEFAULT_KEEP_FREE, plan_only: bool = False, hub=None) -> Survey:
    hub = hub or get_source(source)
    files = hub.list_files(repo)
    quants = find_quants(files)
    root = Path(root) if root else default_dir(repo)
    base = Survey(repo=repo, source=source, endpoint=hub.endpoint, quants=quants, quant=None, root=root,
                  keep_free=keep_free)
    if not quants:
        raise HybridError(f"{repo} on {source} holds no GGUF quants ({len(files)} files)",
                          f"for a config folder use `hybridinfer download --kt-config {repo}`; for GGUF pick a -GGUF repository")
    table = ", ".join(f"{q.label} {_gib(q.size)}" for q in quants)
    matches = pick_quant(quants, quant)
    if quant is None and len(quants) > 1:
        if plan_only:
            return base
        raise HybridError(f"{repo} has {len(quants)} quants", f"choose one with --quant: {table}")
    if not matches:
        raise HybridError(f"{repo} has no quant '{quant}'", f"available: {table}")
    if len(matches) > 1:
        raise HybridError(f"'{quant}' matches {len(matches)} models in {repo}: {', '.join(q.stem for q in matches)}",
                          "pass the file stem as --quant")
    q = matches[0]
    if q.missing:
        raise HybridError(f"{repo} lists {len(q.files)} of the {q.shard_count} shards of {q.label} "
                          f"(missing {', '.join(q.missing)})",
                          "the repository is incomplete or still uploading; rerun later or pick another quant")
    present = sum(_present(root / f.path, f.size) for f in q.files)
    where, free = _free(root)
    with tempfile.TemporaryDirectory(prefix="hybridinfer-headers-") as tmp:
        model, header_bytes = read_headers(hub, repo, q, Path(tmp))
        if hw is None:
            from ..engines import probe_all
            from ..probe import probe
            hw = probe(engines=probe_all())  # with every registered engine, so `auto` picks among those installed
        servable, verdict = _predict(model, hw)
    s = Survey(repo=repo, source=source, endpoint=hub.endpoint, quants=quants, quant=q, root=root, present=present,
               free=free, keep_free=keep_free, header_bytes=header_bytes, servable=servable, verdict=verdict)
    room = _room_elsewhere(s.need + keep_free, where) if s.shortfall else ""
    return replace(s, room=room)


def report(s: Survey, out=None) -> None:
    out = out or sys.stdout
    w = lambda text="": print(text, file=out)  # noqa: E731
    w(f"{s.repo} on {s.source} ({s.endpoint}): {len(s.quants)} quant(s)")
    for q in s.quants:
        mark = "  <- chosen" if s.quant and q.stem == s.quant.stem else ""
        shards = f"{len(q.files)} file(s)" if not q.missing else f"{len(q.files)} of {q.shard_count} shards"
        w(f"  {q.label:<14} {_gib(q.size):>11}  {shards:<12} {q.stem}{mark}")
    if not s.quant:
        w("choose one with --quant")
        return
    q = s.quant
    w(f"Target: {s.root / PurePosixPath(q.first.path).parent} — {len(q.files)} file(s), {_gib(q.size)}; "
      f"{_gib(s.present)} already here, {_gib(s.need)} to fetch")
    if s.shortfall:
        w(f"Disk: {_gib(s.free)} free, {_gib(s.need)} needed and {_gib(s.keep_free)} kept free — {_gib(s.shortfall)} short")
    else:
        w(f"Disk: {_gib(s.free)} free, {_gib(s.free - s.need)} after the download (keeping {_gib(s.keep_free)} free) — ok")
    w(f"Plan (from the shards' GGUF headers, {_gib(s.header_bytes)} fetched with Range requests): {s.verdict}")


def _check(s: Survey, force: bool) -> None:
    q = s.quant
    if not s.servable and not force:  # first: whether it is wanted at all, then where it would go
        raise HybridError(f"{s.repo} {q.label}: {s.verdict}",
                          "pick a smaller quant, or fetch it anyway with `hybridinfer download … --force` (e.g. to serve it on a bigger machine)")
    if s.shortfall:
        fix = "free space there" + (f", or use {s.room}" if s.room else ", or use --dir on a filesystem with room")
        raise HybridError(f"not enough disk for {q.label}: {s.root} has {_gib(s.free)} free, the download needs "
                          f"{_gib(s.need)} more and {_gib(s.keep_free)} stays free — {s.shortfall / GIB:.1f} GiB short", fix)


def fetch(s: Survey, hub, out=None) -> None:
    """Fetch the files of s.quant not yet complete, through the hub object that listed them (for Hugging Face it
    holds the commit the listing came from, so every shard comes from that commit)."""
    from .progress import Meter

    q = s.quant
    todo = [f for f in q.files if _present(s.target(f), f.size) != f.size or not s.target(f).is_file()]
    meter = Meter(total=q.size, done=s.present, files=len(q.files), out=out)
    try:
        for i, f in enumerate(q.files, 1):
            if f not in todo:
                continue
            target = s.target(f)
            if target.exists():  # wrong size: a stale or foreign file under this name
                target.unlink()
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise HybridError(f"cannot create {target.parent} ({e.strerror})", "choose a --dir you can write to") from None
            meter.start(i, PurePosixPath(f.path).name, f.size, _present(target, f.size))
            hub.fetch(s.repo, f, s.root, meter)
            meter.end_file()
    except KeyboardInterrupt:
        meter.close()
        kept = sum(_present(s.target(f), f.size) for f in q.files)
        print(f"\ninterrupted: {_gib(kept)} of {_gib(q.size)} kept (partial files end in .incomplete); "
              "rerun the same command to resume", file=sys.stderr)
        raise
    finally:
        meter.close()  # also on an error: the live bar must give the terminal back before the error line


def verify(s: Survey) -> Path:
    """Complete set, sizes as listed, every shard's header parses and agrees with the set. A shard that fails is
    removed (it cannot be resumed into a good one). -> the first shard."""
    from ..ggufio import parse
    from ..inspect_gguf import inspect

    q = s.quant
    n = len(q.files)
    for i, f in enumerate(q.files):
        t = s.target(f)
        if not t.is_file():
            raise HybridError(f"{t} is missing after the download", "rerun the download")
        if t.stat().st_size != f.size:
            size = t.stat().st_size
            t.unlink()
            raise HybridError(f"{t.name}: {size} bytes on disk but {f.size} listed; removed", "rerun the download")
        try:
            md, _, end, size = parse(str(t), i)
            if size < end:
                raise HybridError(f"{t}: truncated ({size} bytes, the header describes {end})")
            if n > 1 and md.get("split.count") is not None and (md.get("split.no"), md.get("split.count")) != (i, n):
                raise HybridError(f"{t}: says it is shard {md.get('split.no')} of {md.get('split.count')}, expected {i} of {n}")
        except HybridError as e:
            t.unlink()
            raise HybridError(f"{t.name} failed verification ({e.problem.split(': ', 1)[-1]}); removed",
                              "rerun to fetch it again; if it fails again the file on the hub is damaged") from None
    first = s.target(q.first)
    inspect(first)  # the whole set, as serve will read it
    return first


def serve_command(first: Path) -> str:
    import shlex

    return f"hybridinfer serve --gguf {shlex.quote(str(first))}"


def download_quant(repo: str, quant: str | None, source: str, root: Path | None, *, hw=None, force=False,
                   keep_free=DEFAULT_KEEP_FREE, plan_only=False, out=None) -> Path | None:
    hub = get_source(source)
    s = survey(repo, quant, source, root, hw=hw, keep_free=keep_free, plan_only=plan_only, hub=hub)
    report(s, out)
    if plan_only or not s.quant:
        return None
    _check(s, force)
    fetch(s, hub)
    first = verify(s)
    record_gguf(repo, s.quant.label, source, first, {str(s.target(f)): f.size for f in s.quant.files})
    return first


def download_kt_config(repo: str, source: str, folder: Path | None, out=None) -> Path:
    """Fetch a repository's config/tokenizer/code (no weights) into a folder and record it for KTransformers."""
    import json

    from .progress import Meter

    hub = get_source(source)
    files = config_files(hub.list_files(repo))
    if not any(f.path == "config.json" for f in files):
        raise HybridError(f"{repo} on {source} has no config.json", "give the original model repository, e.g. deepseek-ai/DeepSeek-R1")
    folder = Path(folder) if folder else cache_dir() / "kt-config" / repo
    total = sum(f.size for f in files)
    print(f"{repo} config folder: {len(files)} files, {_gib(total)} (weights excluded) -> {folder}",
          file=out or sys.stdout)
    _, free = _free(folder)
    if total + DEFAULT_KEEP_FREE > free:
        raise HybridError(f"not enough disk for {repo}'s config: {_gib(free)} free", "free space or choose another --dir")
    meter = Meter(total=total, done=0, files=len(files), out=None, interval=30)
    try:
        for i, f in enumerate(files, 1):
            t = folder / f.path
            if t.is_file() and t.stat().st_size == f.size:
                continue
            if t.exists():
                t.unlink()
            t.parent.mkdir(parents=True, exist_ok=True)
            meter.start(i, f.path, f.size, _present(t, f.size))
            hub.fetch(repo, f, folder, meter)
    finally:
        meter.close()
    for f in files:
        if (folder / f.path).stat().st_size != f.size:
            raise HybridError(f"{folder / f.path}: size differs from the listing", "rerun the download")
    try:
        json.loads((folder / "config.json").read_text())
    except ValueError:
        (folder / "config.json").unlink()
        raise HybridError(f"{folder / 'config.json'} is not valid JSON; removed", "rerun the download") from None
    record_kt_config(repo, source, folder, [f.path for f in files])
    return folder
