"""The prompt cache that survives restarts, and conversations finding their slot.

A chat's KV state lives in an engine slot. With `--parallel N` hybridinfer picks the slot of every chat request
itself (`id_slot` in the request, which llama-server and ik_llama.cpp's server honour: tools/server/
server-context.cpp `task.id_slot = json_value(data, "id_slot", -1)`, examples/server/server-context.cpp alike):
the free slot already holding the longest prefix of the conversation, so interleaved conversations do not
overwrite each other's prefix while a slot holding it is free. With `--prompt-cache-dir`, a slot about to be
given to another conversation is first saved to disk (`POST /slots/{id}?action=save`), every slot is saved at
shutdown, and a conversation whose prefix is on disk is restored into its slot (`?action=restore`) before its
request runs — after a restart too. The engine then reuses the restored tokens as it reuses a warm slot's
(`timings.cache_n`, `usage.prompt_tokens_details.cached_tokens`): only the new turn is prefilled.

Conversations are recognised by their messages: a chain of hashes, one per message prefix. A raw completion's
prompt (`/v1/completions`, one text or one token list) is chained the same way by blocks of its text or tokens:
a client that sends the conversation so far plus the new turn extends the previous prompt. A saved state is named
by its conversation's chain and matched by the longest common chain prefix that includes a user message (for a
raw prompt: its first block); the engine itself then compares tokens, so a state that matches less than hoped
costs nothing but its read. A state whose chain extends another's holds all of it (a restore reuses the common
prefix of its tokens), so saving it removes the shorter one.

Saved when it is about to be lost (its slot given to another conversation, shutdown) and, so that a killed or
crashed `serve` loses no finished turn, once the server has been idle for IDLE_SAVE_S: never while a request
runs, so a save (the engine writes the slot between two batches of its loop) never stalls a stream.

On disk (`plan.prompt_cache_dir`, a directory keyed by model, engine build, context per slot and KV type —
diskcache.py): `<chain>.slot`, the engine's file (magic 'ggsq', version, the tokens, the KV cells), and
`<chain>.json`, its metadata (chain, tokens, bytes). The engine writes a temporary `tmp-<pid>-<random>.slot`;
hybridinfer renames it and then its metadata into place under an exclusive lock on `<root>/.lock` (fcntl), so a
crash mid-write leaves only a temporary file (removed at the next start once its process is gone) and two `serve`
processes sharing the directory never see half a state. Before a restore: the metadata, the file's size, its
header and token count are checked (anything else is removed and the request prefilled); the engine checks the
shape (layers, K/V types and rows). The directory tree holds at most the cap: least recently used states go first,
states of other keys (another model, build, context) before any of this one's. A save that does not fit (cap or
free disk) or fails (read-only directory, full disk) is skipped and said once in the log and in /health.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import struct
import time
from dataclasses import dataclass, field

from ..diskcache import disk_free
from ..engines.base import EngineFailed, EngineRejected

log = logging.getLogger("hybridinfer.server")
MAGIC = 0x67677371  # 'ggsq': LLAMA_STATE_SEQ_MAGIC (include/llama.h), the first u32 of a slot file
FREE_MARGIN = 256 * 2**20  # disk left free beyond a state's own bytes
IDLE_SAVE_S = 2.0  # unsaved slots go to disk once no request has run for this long
TEXT_BLOCK = 256  # characters per link of a raw prompt's chain
TOKEN_BLOCK = 64  # tokens per link of a token-list prompt's chain


def message_chain(messages) -> list[str]:
    """One hash per message prefix: chain[k] identifies messages[:k+1] (role and text)."""
    out, h = [], hashlib.sha256()
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else getattr(m, "role", "")
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", "")
        if not isinstance(content, str):  # parts: their text
            content = "".join((p.get("text") if isinstance(p, dict) else getattr(p, "text", "")) or "" for p in content or [])
        h.update(f"\x00{role}\x01".encode() + (content or "").encode())
        out.append(h.copy().hexdigest()[:32])
    return out


def prompt_chain(prompt) -> list[str]:
    """One hash per whole block of a raw prompt (text: TEXT_BLOCK characters, token ids: TOKEN_BLOCK): chain[k]
    identifies its first k+1 blocks. A trailing part block is left out: the next turn's prompt extends it."""
    step = TEXT_BLOCK if isinstance(prompt, str) else TOKEN_BLOCK
    out, h = [], hashlib.sha256(b"prompt")
    for i in range(0, len(prompt) - step + 1, step):
        part = prompt[i:i + step]
        h.update(part.encode() if isinstance(part, str) else struct.pack(f"<{len(part)}q", *part))
        out.append(h.copy().hexdigest()[:32])
    return out


def request_chain(body: dict) -> tuple[list[str], int] | None:
    """(chain, links a match must share) of a request the prompt cache can place: chat messages, or one raw prompt
    (a text, or a list of token ids); None for anything else (several prompts: the engine spreads them)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return message_chain(messages), _first_user(messages) + 1  # a shared system prompt alone is no conversation
    prompt = _one_prompt(body)
    return (prompt_chain(prompt), 1) if prompt else None


def _one_prompt(body: dict) -> str | list[int] | None:
    """A raw request's one prompt (a text, or a list of token ids, alone or as a list of one); None otherwise."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt)):
        return prompt
    return None


def _chars(body: dict) -> int:
    """About how long a request's prompt is, in characters (a token counted as 3)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return sum(len(m.get("content")) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))
    prompt = _one_prompt(body) or ""
    return len(prompt) if isinstance(prompt, str) else 3 * len(prompt)


def common_prefix(a: list[str], b: list[str]) -> int:
    """How many leading messages two chains share (hashes are cumulative: equal at k means equal up to k)."""
    n = min(len(a), len(b))
    while n and a[n - 1] != b[n - 1]:
        n -= 1
    return n


def _first_user(messages) -> int:
    for i, m in enumerate(messages):
        if (m.get("role") if isinstance(m, dict) else getattr(m, "role", "")) == "user":
            return i
    return len(messages)


@dataclass
class Slot:
    id: int
    chain: list[str] = field(default_factory=list)  # the conversation (messages sent) whose state it holds
    busy: bool = False
    dirty: bool = False  # holds a state not on disk
    last_used: float = 0.0
    tokens_guess: int = 0  # about how many tokens it holds (for the free-disk check before a save)
    pending: list[str] = field(default_factory=list)  # the chain of the request running in it


@dataclass
class Stats:
    restores: int = 0  # conversations restored from disk into a slot
    restored_tokens: int = 0
    slot_hits: int = 0  # conversations that found their prefix in a free slot
    saves: int = 0
    saved_bytes: int = 0
    skipped: int = 0  # saves skipped: cap, free disk, or the engine could not write
    rejected: int = 0  # states removed instead of restored (corrupt, partial, refused by the engine)
    last_problem: str = ""


def _read_header(path: str) -> tuple[int, int, int] | None:
    """(magic, version, token count) of a slot file (llama-context.cpp state_seq_save_file writes them first)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(12)
    except OSError:
        return None
    return struct.unpack("<III", raw) if len(raw) == 12 else None


class DiskStore:
    """The saved states of one key directory, and the cap over the whole prompt cache directory."""

    def __init__(self, keydir: str, cap: int, stats: Stats):
        self.dir = keydir.rstrip(os.sep)
        self.root = os.path.dirname(self.dir)
        self.cap = cap
        self.stats = stats
        os.makedirs(self.dir, exist_ok=True)
        self.writable = os.access(self.dir, os.W_OK)
        self._said: set[str] = set()
        with self.locked():
            self._clean()

    @contextlib.contextmanager
    def locked(self):
        """An exclusive lock over the directory tree, for renames and removals (other serve processes too)."""
        try:
            fd = os.open(os.path.join(self.root, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # a read-only directory: nothing here will be changed
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def say(self, problem: str) -> None:
        """A problem said once in the log (and kept for /health)."""
        self.stats.last_problem = problem
        kind = problem.split(":")[0]
        if kind not in self._said:
            self._said.add(kind)
            log.warning("prompt cache: %s", problem)

    def _clean(self) -> None:
        """Temporary files of processes that are gone (a crash mid-save) and halves of a pair."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for n in names:
            p = os.path.join(self.dir, n)
            if n.startswith("tmp-"):
                try:
                    pid = int(n.split("-")[1])
                    os.kill(pid, 0)
                    continue  # its process still runs: its save is under way
                except (ValueError, IndexError, ProcessLookupError):
                    pass
                except PermissionError:
                    continue
                _remove(p)
            elif n.endswith(".slot") and n[:-5] + ".json" not in names:
                _remove(p)
            elif n.endswith(".json") and n[:-5] + ".slot" not in names:
                _remove(p)

    # --- reading ---------------------------------------------------------------------------------------
    def entries(self) -> dict[str, dict]:
        """name -> metadata of every complete state (re-read each time: another process may have added some)."""
        out = {}
        try:
            names = os.listdir(self.dir)
        except OSError:
            return out
        for n in names:
            if not n.endswith(".json") or n.startswith("tmp-"):
                continue
            try:
                with open(os.path.join(self.dir, n)) as f:
                    meta = json.load(f)
                out[n[:-5]] = meta
            except (OSError, ValueError):
                continue
        return out

    def lookup(self, chain: list[str]) -> tuple[str | None, int]:
        """The saved state sharing the longest message prefix with `chain` -> (name, messages shared)."""
        best, k = None, 0
        for name, meta in self.entries().items():
            c = common_prefix(chain, meta.get("chain") or [])
            if c > k:
                best, k = name, c
        return best, k

    def check(self, name: str) -> dict | None:
        """The state's metadata when its file is whole (size, header, token count); otherwise it is removed."""
        p = os.path.join(self.dir, name + ".slot")
        try:
            with open(os.path.join(self.dir, name + ".json")) as f:
                meta = json.load(f)
            size = os.path.getsize(p)
        except FileNotFoundError:
            return None  # another process removed it (LRU) since the lookup: a miss
        except (OSError, ValueError):
            meta, size = None, -1
        head = _read_header(p)
        if (not meta or size != meta.get("bytes") or head is None or head[0] != MAGIC
                or head[2] != meta.get("n_packed")):
            self.reject(name, f"{name}.slot is partial or corrupt (size {size}, header {head}): ignored and removed")
            return None
        return meta

    def reject(self, name: str, why: str) -> None:
        self.stats.rejected += 1
        self.say(f"state rejected: {why}")
        with self.locked():
            for ext in (".slot", ".json"):
                _remove(os.path.join(self.dir, name + ext))

    def touch(self, name: str) -> None:
        with contextlib.suppress(OSError):
            os.utime(os.path.join(self.dir, name + ".slot"))

    # --- writing ---------------------------------------------------------------------------------------
    def room_for(self, nbytes: int) -> str:
        """Why a state of about `nbytes` cannot be saved ("" when it can)."""
        if not self.writable:
            return f"not saved: {self.dir} is not writable"
        if nbytes > self.cap:
            return f"not saved: a state of {nbytes / 2**20:.0f} MiB is larger than the cap of {self.cap / 2**30:.2f} GiB"
        free = disk_free(self.dir)
        if free is not None and free < nbytes + FREE_MARGIN:
            return f"not saved: disk full ({free / 2**20:.0f} MiB free in {self.dir}, the state needs {nbytes / 2**20:.0f})"
        return ""

    def tmp_name(self) -> str:
        return f"tmp-{os.getpid()}-{secrets.token_hex(6)}.slot"

    def commit(self, tmp: str, name: str, chain: list[str], n_tokens: int) -> int:
        """The engine's finished temporary file -> `name`, with its metadata; then the cap. -> bytes."""
        tp = os.path.join(self.dir, tmp)
        size = os.path.getsize(tp)
        if size > self.cap:
            _remove(tp)
            return size
        head = _read_header(tp)
        if head is None or head[0] != MAGIC:
            _remove(tp)
            raise OSError(f"the engine wrote no slot file header ({head})")
        # n_tokens: the engine's count; the header counts the serialized token list (server_tokens::serialize)
        meta = {"chain": chain, "n_tokens": n_tokens, "n_packed": head[2], "bytes": size, "key": os.path.basename(self.dir),
                "saved": time.time()}
        mt = os.path.join(self.dir, f"tmp-{os.getpid()}-{secrets.token_hex(6)}.json")
        with open(mt, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        with open(tp, "rb") as f:
            os.fsync(f.fileno())  # the engine's bytes on disk before the name says they are whole
        with self.locked():
            os.replace(tp, os.path.join(self.dir, name + ".slot"))
            os.replace(mt, os.path.join(self.dir, name + ".json"))
            self._supersede(name, chain, n_tokens)
            self._evict()
        return size

    def _supersede(self, name: str, chain: list[str], n_tokens: int) -> None:
        """States of an earlier point of this conversation go: the new one holds their tokens too."""
        for other, meta in self.entries().items():
            c = meta.get("chain") or []
            if other != name and len(c) < len(chain) and common_prefix(chain, c) == len(c) \
                    and int(meta.get("n_tokens") or 0) <= n_tokens:
                _remove(os.path.join(self.dir, other + ".slot"))
                _remove(os.path.join(self.dir, other + ".json"))

    def _evict(self) -> None:
        """Least recently used states out until the tree is under the cap; other keys' states first."""
        files = []
        for d, _, names in os.walk(self.root):
            for n in names:
                if n.endswith(".slot") and not n.startswith("tmp-"):
                    p = os.path.join(d, n)
                    with contextlib.suppress(OSError):
                        st = os.stat(p)
                        files.append((d == self.dir, st.st_mtime, p, st.st_size))
        total = sum(f[3] for f in files)
        for mine, _, p, size in sorted(files):
            if total <= self.cap:
                break
            _remove(p)
            _remove(p[:-5] + ".json")
            total -= size

    def disk_bytes(self) -> tuple[int, int]:
        """(bytes, states) of this key's directory."""
        b = n = 0
        with contextlib.suppress(OSError):
            for e in os.scandir(self.dir):
                if e.name.endswith(".slot") and not e.name.startswith("tmp-"):
                    b += e.stat().st_size
                    n += 1
        return b, n


def _remove(p: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(p)


class PromptCache:
    """Slot choice for every request it can place (request_chain), and the states on disk (None store: affinity
    only). `idle()` says whether the server has no request admitted: only then are slots saved ahead of need."""

    def __init__(self, engine, parallel: int, store: DiskStore | None, kv_bytes_per_token: int, stats: Stats,
                 idle=lambda: True):
        self.engine = engine
        self.slots = [Slot(i) for i in range(parallel)]
        self.store = store
        self.kv_bytes_per_token = kv_bytes_per_token
        self.stats = stats
        self.idle = idle
        self._restarts = engine.restarts
        self._saving = asyncio.Lock()  # held by the idle saver while one slot is written
        self._entering = 0
        self._saver: asyncio.Task | None = None
        self._quiet_since = 0.0
        self._closing = False

    @classmethod
    def create(cls, settings, engine, idle=lambda: True) -> "PromptCache | None":
        """For an engine that takes `id_slot` and saves slots (llama-server's family), else None."""
        if not getattr(engine, "takes_slot_ids", False):
            return None
        stats = Stats()
        store = None
        if settings.prompt_cache_dir:
            try:
                store = DiskStore(settings.prompt_cache_dir, settings.prompt_cache_bytes, stats)
            except OSError as e:
                log.warning("prompt cache: %s cannot be used (%s): no states are saved", settings.prompt_cache_dir, e)
        if settings.parallel < 2 and store is None:
            return None  # one slot and nothing on disk: the engine's own reuse is all there is
        return cls(engine, settings.parallel, store, settings.kv_bytes_per_token, stats, idle)

    # --- around each request -----------------------------------------------------------------------------
    async def enter(self, body: dict) -> Slot | None:
        """Before a request runs (its ticket holds one of the N slots): choose its engine slot, save the state
        it replaces, restore the conversation's state from disk when that beats what any free slot holds. None:
        a request it cannot place (the engine chooses)."""
        placed = request_chain(body)
        if placed is None:
            return None
        chain, need = placed
        self._entering += 1
        try:
            async with self._saving:  # an idle save under way finishes first (it stops after that slot)
                pass
        finally:
            self._entering -= 1
        if self.engine.restarts != self._restarts:  # a restarted engine starts with empty slots
            self._restarts = self.engine.restarts
            for s in self.slots:
                s.chain, s.dirty = [], False
        free = [s for s in self.slots if not s.busy]
        best = max(free, key=lambda s: (common_prefix(chain, s.chain), s.last_used))
        k_slot = common_prefix(chain, best.chain)
        name, k_disk = self.store.lookup(chain) if self.store and chain else (None, 0)
        hit = k_slot >= need and k_slot >= k_disk
        # The slot holding the conversation's prefix, else an empty one, else the least recently used.
        slot = best if hit else min(free, key=lambda s: (bool(s.chain), s.last_used))
        slot.busy = True
        self.stats.slot_hits += int(hit)
        try:
            # What the slot holds beyond this request's prefix (another conversation, or a branch off this
            # one) goes to disk first; then the conversation's own state comes back from it.
            if not hit or k_slot < len(slot.chain):
                await self._save(slot)
            if not hit and name and k_disk >= need:
                await self._restore(slot, name)
        except BaseException:
            slot.busy = False
            raise
        body["id_slot"] = slot.id
        body.setdefault("cache_prompt", True)
        slot.pending = chain
        slot.tokens_guess = _chars(body) // 3 + int(body.get("max_tokens") or 0)
        return slot

    def leave(self, slot: Slot) -> None:
        """After the request (answered, failed or cancelled): the slot holds (a prefix of) this conversation."""
        slot.chain = slot.pending
        slot.dirty = bool(slot.chain)
        slot.last_used = time.monotonic()
        slot.busy = False
        if self.store and slot.dirty:
            self._kick()

    def _kick(self) -> None:
        """(Re)start the idle saver's clock."""
        self._quiet_since = time.monotonic()
        if self._saver is None or self._saver.done():
            try:
                self._saver = asyncio.get_running_loop().create_task(self._save_when_idle())
            except RuntimeError:  # no running loop (a unit test): nothing to schedule
                self._saver = None

    async def _save_when_idle(self) -> None:
        """Once no request has ended for IDLE_SAVE_S and none is admitted, every unsaved slot to disk, one by one; a
        request that arrives stops it after the slot being written (its `enter` waits for that one)."""
        while (wait := self._quiet_since + IDLE_SAVE_S - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        for s in self.slots:
            if self._closing or self._entering or not self.idle() or any(x.busy for x in self.slots):
                return
            if s.dirty and s.chain:
                async with self._saving:
                    await self._save_held(s)

    async def save_all(self) -> None:
        """At shutdown, before the engine stops: every slot's unsaved conversation to disk."""
        if not self.store:
            return
        self._closing = True
        async with self._saving:  # after the idle saver's slot under way, if any
            if self._saver and not self._saver.done():
                self._saver.cancel()  # it waits or sleeps: never mid-save while this holds the lock
            for s in self.slots:
                if s.dirty and not s.busy:
                    await self._save_held(s)

    async def _save_held(self, slot: Slot) -> None:
        """A save outside any request: the slot is held (busy) while the engine writes it."""
        slot.busy = True
        try:
            await self._save(slot)
        finally:
            slot.busy = False

    # --- the engine's slot actions -----------------------------------------------------------------------
    async def _save(self, slot: Slot) -> None:
        if not (self.store and slot.dirty and slot.chain):
            return
        slot.dirty = False
        name = slot.chain[-1]
        estimate = self.kv_bytes_per_token * slot.tokens_guess
        why = self.store.room_for(estimate)
        if why:
            self.stats.skipped += 1
            self.store.say(why)
            return
        tmp = self.store.tmp_name()
        try:
            r = await self.engine.slot_action(slot.id, "save", tmp)
            n = int(r.get("n_saved") or 0)
            if n == 0:
                _remove(os.path.join(self.store.dir, tmp))
                return
            size = self.store.commit(tmp, name, slot.chain, n)
            if size > self.store.cap:
                self.stats.skipped += 1
                self.store.say(f"not saved: a state of {size / 2**20:.1f} MiB is larger than the cap of "
                               f"{self.store.cap / 2**20:.1f} MiB")
                return
        except (EngineRejected, EngineFailed, OSError) as e:
            _remove(os.path.join(self.store.dir, tmp))
            self.stats.skipped += 1
            self.store.say(f"not saved: the engine could not write the state ({e})")
            return
        self.stats.saves += 1
        self.stats.saved_bytes += size

    async def _restore(self, slot: Slot, name: str) -> None:
        meta = self.store.check(name)
        if not meta:
            return
        try:
            r = await self.engine.slot_action(slot.id, "restore", name + ".slot")
        except EngineRejected as e:  # not a state of this shape, or not whole: the engine cleared the slot
            self.store.reject(name, f"the engine refused {name}.slot ({e}): ignored and removed")
            slot.chain = []
            return
        except EngineFailed as e:
            self.store.say(f"restore failed: {e}")
            slot.chain = []
            return
        n = int(r.get("n_restored") or 0)
        self.store.touch(name)
        slot.chain, slot.dirty = list(meta.get("chain") or []), False
        self.stats.restores += 1
        self.stats.restored_tokens += n

    # --- what /health and /metrics show -------------------------------------------------------------------
    def report(self) -> dict:
        st = self.stats
        out = {"slot_affinity": True, "slot_hits": st.slot_hits}
        if self.store:
            b, n = self.store.disk_bytes()
            out.update({"dir": self.store.dir, "cap_bytes": self.store.cap, "disk_bytes": b, "states": n,
                        "restores": st.restores, "restored_tokens": st.restored_tokens, "saves": st.saves,
                        "skipped": st.skipped, "rejected": st.rejected, "last_problem": st.last_problem or None})
        return out

