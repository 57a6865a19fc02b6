"""The two model hubs, driven through their own client libraries: list a repository, fetch one file resumably,
read a byte range (for GGUF headers before anything is downloaded).

Where each client's endpoint comes from (read from their source, modelscope 1.40 / modelscope-hub 0.5,
huggingface_hub 2.4):
- ModelScope (modelscope 1.40's `HubApi` is a shim over `modelscope_hub.HubApi`, used here directly):
  `HubApi(endpoint=…)`, else `MODELSCOPE_ENDPOINT`, else the deprecated `MODELSCOPE_DOMAIN` (a bare
  domain gets https://, an http:// URL is kept), else https://www.modelscope.cn. Listing is
  `GET /api/v1/models/{repo}/repo/files?Revision=master&Recursive=True`; a file is
  `GET /api/v1/models/{repo}/repo?Revision=…&FilePath=…`, resumed with `Range: bytes=N-` from `<file>.incomplete`
  and renamed into place only after its size (and SHA-256, when the listing has one) match.
- Hugging Face: `HF_ENDPOINT` (read when huggingface_hub is imported), else https://huggingface.co. Listing is
  `GET /api/models/{repo}/revision/main` then `GET /api/models/{repo}/tree/{sha}?recursive=true`; a file is
  `HEAD /{repo}/resolve/{sha}/{path}` (size, redirect to storage) then `GET` with `Range`. huggingface_hub 2.x
  no longer resumes across runs (its temp names are per process), so hybridinfer keeps the partial file under a
  stable name and hands its length to the library's `http_get(resume_size=…)`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
from pathlib import Path

from ..errors import HybridError
from .layout import RemoteFile

SOURCES = ("modelscope", "huggingface")


def incomplete_path(target: Path) -> Path:
    """Where a file's bytes gather until it is complete (the name ModelScope's client also uses)."""
    return target.with_name(target.name + ".incomplete")


def get_source(name: str) -> "ModelScope | HuggingFace":
    if name == "modelscope":
        return ModelScope()
    if name == "huggingface":
        return HuggingFace()
    raise HybridError(f"unknown source '{name}'", f"use one of {', '.join(SOURCES)}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    m = re.search(r"\[Errno -?\d+\] [^'\"()]+", text)  # the socket's own words, not the retry wrapper around them
    if m:
        return m.group(0).strip()
    lines = text.splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _quiet_loggers(*names: str) -> None:
    # The clients log each retry as a warning; hybridinfer reports the outcome as one line instead.
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)


class ModelScope:
    name = "modelscope"
    revision = "master"

    def __init__(self):
        import warnings

        # modelscope 1.40 delegates its hub client (HubApi, snapshot_download, file download) to modelscope_hub;
        # importing that directly skips `import modelscope`, which imports torch when it is installed (~4 s).
        from modelscope_hub.api import HubApi
        from modelscope_hub.config import HubConfig

        _quiet_loggers("modelscope", "modelscope_hub")
        with warnings.catch_warnings():  # MODELSCOPE_DOMAIN still works; its deprecation notice is not ours to print
            warnings.simplefilter("ignore", FutureWarning)
            config = HubConfig()
        self.api = HubApi(config)
        self.endpoint = config.endpoint

    def _fail(self, e: BaseException, repo: str, what: str) -> HybridError:
        from modelscope_hub.errors import AuthenticationError, NetworkError, NotExistError, PermissionDeniedError

        if isinstance(e, NotExistError):
            return HybridError(f"{what}: not found on ModelScope ({self.endpoint})",
                               "check the repository name (owner/name, as on modelscope.cn), or try --source huggingface")
        if isinstance(e, (AuthenticationError, PermissionDeniedError)):
            return HybridError(f"{what}: ModelScope refused access ({_first_line(e)})",
                               "log in with `modelscope login` (or set MODELSCOPE_API_TOKEN) for private repositories")
        if isinstance(e, NetworkError):
            return HybridError(f"cannot reach ModelScope at {self.endpoint} ({_first_line(e)})",
                               "check the network (or MODELSCOPE_ENDPOINT); rerun to resume")
        return HybridError(f"{what}: ModelScope error ({_first_line(e)})", "rerun later; a partial download resumes")

    def list_files(self, repo: str) -> list[RemoteFile]:
        from modelscope_hub.errors import HubError

        try:
            files = self.api.list_repo_files(repo, "model", revision=self.revision, recursive=True)
        except HubError as e:
            raise self._fail(e, repo, repo) from None
        return [RemoteFile(f.path, int(f.size or 0), f.sha256 or None) for f in files if f.type != "tree"]

    def read_range(self, repo: str, f: RemoteFile, start: int, end: int) -> bytes:
        from modelscope_hub.errors import HubError

        try:
            resp = self.api.legacy.download_stream(repo, "model", f.path, self.revision,
                                                   headers={"Range": f"bytes={start}-{end}"})
        except HubError as e:
            raise self._fail(e, repo, f"{repo}/{f.path}") from None
        return _read_range(resp.iter_content(1 << 20), resp.status_code, resp.close, start, end)

    def fetch(self, repo: str, f: RemoteFile, root: Path, meter) -> None:
        """Download f to root/f.path through the client's own resumable download (`<file>.incomplete`)."""
        from modelscope_hub.errors import (FileIntegrityError, FileSizeMismatchError, HubError,
                                           RequestTimeoutError)

        class Callback:  # the client instantiates one per file
            def __init__(self, filename, file_size):
                self.seen = 0

            def update(self, size):
                self.seen += size
                meter.position(self.seen)

            def end(self):
                pass

        part = incomplete_path(root / f.path)
        while True:
            before = part.stat().st_size if part.exists() else 0
            try:
                with _quiet_stderr():  # the client draws its own tqdm bar; hybridinfer draws one for all files
                    self.api.downloader.download_file(repo, "model", f.path, revision=self.revision, local_dir=root,
                                                      file_size=f.size, expected_sha256=f.sha256,
                                                      progress_callbacks=[Callback])
                return
            except FileSizeMismatchError:
                raise HybridError(f"{f.path}: the hub sent a different size than its listing says ({f.size} bytes)",
                                  "the file on the hub is damaged or being replaced; rerun later or pick another quant") from None
            except FileIntegrityError as e:
                raise HybridError(f"{f.path}: content does not match the listed SHA-256 ({_first_line(e)})",
                                  "the file on the hub is damaged or being replaced; rerun later") from None
            except RequestTimeoutError as e:
                # The client gives each file a total time budget (1 h by default); a big shard on a slow link
                # outlives it while still progressing: resume it.
                after = part.stat().st_size if part.exists() else 0
                if after > before:
                    continue
                raise self._fail(e, repo, f"{repo}/{f.path}") from None
            except HubError as e:
                raise self._fail(e, repo, f"{repo}/{f.path}") from None
            except OSError as e:
                raise _write_error(part, e) from None


def _write_error(part: Path, e: OSError) -> HybridError:
    if e.errno == errno.ENOSPC:
        return HybridError(f"disk full while writing {part}", "free space or choose another --dir; rerun to resume")
    return HybridError(f"cannot write {part} ({e.strerror or e})", "choose a --dir you can write to; rerun to resume")


class HuggingFace:
    name = "huggingface"
    revision = "main"

    def __init__(self):
        from huggingface_hub import HfApi, constants

        _quiet_loggers("huggingface_hub")
        self.api = HfApi()
        self.endpoint = constants.ENDPOINT
        self.commit: dict[str, str] = {}  # repo -> commit sha the listing came from

    def _fail(self, e: BaseException, what: str) -> HybridError:
        from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                            RepositoryNotFoundError, RevisionNotFoundError)

        if isinstance(e, GatedRepoError):
            return HybridError(f"{what}: gated on Hugging Face", "accept its terms on the model page and set HF_TOKEN")
        if isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError)):
            return HybridError(f"{what}: not found on Hugging Face ({self.endpoint})",
                               "check the repository name (owner/name), set HF_TOKEN for a private one, or try --source modelscope")
        if isinstance(e, HfHubHTTPError):
            return HybridError(f"{what}: Hugging Face error ({_first_line(e)})", "rerun later; a partial download resumes")
        return HybridError(f"cannot reach Hugging Face at {self.endpoint} ({_first_line(e)})",
                           "check the network (or HF_ENDPOINT); rerun to resume")

    def list_files(self, repo: str) -> list[RemoteFile]:
        from huggingface_hub.hf_api import RepoFile

        try:
            sha = self.api.repo_info(repo, revision=self.revision).sha
            self.commit[repo] = sha
            entries = list(self.api.list_repo_tree(repo, recursive=True, revision=sha))
        except Exception as e:  # noqa: BLE001 — every failure becomes one line naming the hub
            raise self._fail(e, repo) from None
        return [RemoteFile(x.path, int(x.size), x.lfs.sha256 if x.lfs else None) for x in entries if isinstance(x, RepoFile)]

    def _url(self, repo: str, f: RemoteFile) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(repo, f.path, revision=self.commit.get(repo, self.revision))

    def read_range(self, repo: str, f: RemoteFile, start: int, end: int) -> bytes:
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        try:
            with get_session().stream("GET", self._url(repo, f), follow_redirects=True,
                                      headers={**build_hf_headers(), "Range": f"bytes={start}-{end}"}) as resp:
                hf_raise_for_status(resp)
                return _read_range(resp.iter_bytes(1 << 20), resp.status_code, lambda: None, start, end)
        except HybridError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._fail(e, f"{repo}/{f.path}") from None

    def fetch(self, repo: str, f: RemoteFile, root: Path, meter) -> None:
        from huggingface_hub import constants, get_hf_file_metadata
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        if f.size > constants.MAX_HTTP_DOWNLOAD_SIZE:
            raise HybridError(f"{f.path} is {f.size / 1e9:.0f} GB: Hugging Face serves files over 50 GB only through Xet, "
                              "which hybridinfer does not drive", "use --source modelscope for this repository")
        target = root / f.path
        part = incomplete_path(target)
        try:
            meta = get_hf_file_metadata(self._url(repo, f), retry_on_errors=True)
        except Exception as e:  # noqa: BLE001
            raise self._fail(e, f"{repo}/{f.path}") from None
        if meta.size is not None and meta.size != f.size:
            raise HybridError(f"{f.path}: the hub sent a different size than its listing says ({f.size} bytes; it announces {meta.size})",
                              "the file on the hub is damaged or being replaced; rerun later or pick another quant")

        class Bar:  # http_get's tqdm_class: it reports each chunk here
            def __init__(self, *a, initial=0, **kw):
                self.n = initial

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def update(self, n=1):
                self.n += n or 0
                meter.position(self.n)

            def close(self):
                pass

        target.parent.mkdir(parents=True, exist_ok=True)
        have = part.stat().st_size if part.exists() else 0
        if have > f.size:  # longer than the file: not a prefix of it
            part.unlink()
            have = 0
        try:
            with open(part, "ab") as fh:
                http_get(meta.location, fh, resume_size=have, headers=build_hf_headers(), expected_size=f.size,
                         displayed_filename=Path(f.path).name, tqdm_class=Bar)
        except OSError as e:
            if "Consistency check failed" in str(e):
                part.unlink(missing_ok=True)
                raise HybridError(f"{f.path}: the hub sent a different size than its listing says ({f.size} bytes)",
                                  "the file on the hub is damaged or being replaced; rerun later or pick another quant") from None
            raise _write_error(part, e) from None
        except Exception as e:  # noqa: BLE001 — the partial file stays for the next run to resume
            raise self._fail(e, f"{repo}/{f.path}") from None
        got = part.stat().st_size
        if got != f.size:
            part.unlink()
            raise HybridError(f"{f.path}: received {got} of {f.size} bytes", "rerun to fetch it again")
        os.replace(part, target)


def _read_range(chunks, status: int, close, start: int, end: int) -> bytes:
    """Collect bytes start..end from a ranged response; a server that ignores Range (200) is read only that far."""
    want = end - start + 1
    if status == 200 and start:
        close()
        raise HybridError("the hub ignores Range requests", "download the whole file, then run `hybridinfer plan`")
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        if len(buf) >= want:
            break
    close()
    return bytes(buf[:want])


@contextlib.contextmanager
def _quiet_stderr():
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        yield
    sys.stderr.flush()
