"""llama.cpp in-process through llama-cpp-python: single-user serving where no `llama-server` binary exists.

It honours the same placement as the server: `Llama(...)` silently ignores keyword arguments it does not know,
so the plan's tensor overrides are written into the C-level `llama_model_params.tensor_buft_overrides` (the field
behind llama-server's `-ot`) through the params `Llama` starts from. The engine's own log is captured, so the
override lines ("tensor … buffer type overridden to CPU") prove the placement took effect.

Generation runs on one worker thread (a llama context is not thread-safe); chunks cross to the event loop through a
queue, and a cancelled stream stops generating at the next token.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import ctypes
import logging
import threading
import time
import uuid

from importlib import metadata
from typing import TYPE_CHECKING

from ..probe import EngineInfo
from .base import Engine, EngineFailed, EngineRejected, NumaPolicy, RunningBase, RunSettings, maps_weights
from .llamacpp import LlamaCpp, compiled_of
from .llamacpp_args import buffer_name

if TYPE_CHECKING:
    from ..plan import Plan

log = logging.getLogger("hybridinfer.engine")


class LlamaCppPython(Engine):
    """The same ggml kernels as llama-server, so the same capabilities and prediction; one request at a time."""
    name = "llama-cpp-python"
    summary = "llama.cpp in-process through llama-cpp-python: same kernels and placement, one request at a time"
    kind = "in-process"
    max_slots = 1  # one llama context, generation on one worker thread
    distribution = "llama_cpp_python"
    install_hint = "run ./install.sh --llama-cpp-python (builds it, ~10 min the first time)"
    prediction_params = LlamaCpp.prediction_params
    calibrate_as = LlamaCpp.name  # the same tree and build flags: llama-bench's figures are its kernels'
    archs = LlamaCpp.archs  # the same tree (llama-cpp-python 0.3.36)
    gpu_runtime_bytes = LlamaCpp.gpu_runtime_bytes
    full_cpu_compute_buffer = LlamaCpp.full_cpu_compute_buffer
    compile = LlamaCpp.compile
    ngl_counts_output = LlamaCpp.ngl_counts_output  # what compile reads: mainline's -ngl rule

    def numa_policy(self, nodes: int) -> NumaPolicy:
        return NumaPolicy("distribute", f"NUMA: {nodes} nodes; Llama(numa=True) spreads ggml's threads and pages")

    def probe(self) -> EngineInfo:
        try:
            version = metadata.version(self.distribution)
        except metadata.PackageNotFoundError:
            return EngineInfo(name=self.name, installed=False, detail="not installed")
        return EngineInfo(name=self.name, installed=True, version=version)

    def chosen_because(self, model, hw) -> str:
        return "runs every GGUF quant type, in this process"

    def blockers(self, model, placement, hw) -> list[str]:
        out = super().blockers(model, placement, hw)
        if placement and len(hw.gpus) > 1 and any(d != "cpu" for d in placement.values()):
            # Llama() would split layers (and their KV) over every GPU by free memory, not as planned
            out.append("several GPUs: hybridinfer gives the in-process engine no device list or layer split")
        return out

    def command(self, plan: "Plan") -> list[str]:
        """Not an argv to exec: the `Llama(...)` call it makes, written like one for the plan and the banner."""
        c = compiled_of(plan)
        ov = ",".join(f"{rx}={buffer_name(d)}" for rx, d in c.overrides)
        return ["llama_cpp.Llama", f"model_path={plan.model_path}", f"n_ctx={plan.ctx}",
                f"n_gpu_layers={c.ngl}", f"n_threads={plan.threads}"] + ([f"tensor_buft_overrides={ov}"] if ov else [])

    def runner(self, plan: "Plan", settings: RunSettings) -> "InProcess":
        if not available():
            raise self.not_installed_error()
        return InProcess(plan, log_file=settings.log_file, on_line=settings.on_line)


class BuftOverride(ctypes.Structure):
    """struct llama_model_tensor_buft_override (llama.h); llama-cpp-python declares the field but not the struct."""
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 — a broken install (missing shared library) counts as absent
        return False


def buffer_types(llama_cpp) -> dict[str, int]:
    """Buffer-type name -> ggml_backend_buffer_type_t for every backend device, as llama-server resolves `-ot X=NAME`."""
    from llama_cpp import _ggml

    lib = _ggml.libggml
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    lib.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_buft_name.restype = ctypes.c_char_p
    llama_cpp.llama_backend_init()
    out = {}
    for i in range(lib.ggml_backend_dev_count()):
        buft = lib.ggml_backend_dev_buffer_type(lib.ggml_backend_dev_get(i))
        if buft:
            out[lib.ggml_backend_buft_name(buft).decode()] = buft
    return out


class InProcess(RunningBase):
    """A llama-cpp-python `Llama` behind the engine interface of engines/base.py."""

    def __init__(self, plan: "Plan", log_file: str | None = None, on_line=None):
        self.plan = plan
        self.compiled = compiled_of(plan)
        self.log_file = log_file
        self.on_line = on_line
        self.state = "starting"
        self.restarts = 0
        self.started_at = 0.0
        self.ready_at = 0.0
        self.llm = None
        self.fatal: str | None = None  # a load failure: retrying cannot help
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self._ready = asyncio.Event()
        self._loader: asyncio.Future | None = None
        self._log_cb = None  # keeps the ctypes callback alive
        self._log_lines: list[str] = []
        self._log_partial = ""
        self._active: set[threading.Event] = set()

    def command(self) -> list[str]:
        return list(self.plan.command)

    async def start(self) -> None:
        self.state = "loading"
        self.started_at = time.monotonic()
        loop = asyncio.get_running_loop()
        self._loader = loop.run_in_executor(self._pool, self._load)
        self._loader.add_done_callback(self._loaded)

    def _loaded(self, fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        if fut.exception() is not None:
            self.state = "down"
            self.fatal = f"llama-cpp-python could not load the model: {fut.exception()}"
            log.error("%s", self.fatal)
            return
        self.state = "ready"
        self.ready_at = time.monotonic()
        self._ready.set()
        log.info("llama-cpp-python ready in %.1f s", self.ready_at - self.started_at)

    # --- loading (worker thread) ---------------------------------------------------------------------
    def _on_log(self, level: int, text: bytes, _user) -> None:
        s = self._log_partial + text.decode(errors="replace")
        *lines, self._log_partial = s.split("\n")
        for line in lines:
            self._log_lines.append(line)
            if self.log_file:
                with open(self.log_file, "a") as f:
                    f.write(line + "\n")
            if self.on_line:
                self.on_line(line)

    def _load(self) -> None:
        import llama_cpp
        from llama_cpp import llama_chat_format

        self._log_cb = llama_cpp.llama_log_callback(self._on_log)
        llama_cpp.llama_log_set(self._log_cb, ctypes.c_void_p(0))

        bufts = buffer_types(llama_cpp)
        ov = self.compiled.overrides
        missing = sorted({buffer_name(d) for _, d in ov} - set(bufts))
        if missing:
            raise RuntimeError(f"this llama-cpp-python build has no buffer type {', '.join(missing)} "
                               f"(it has {', '.join(bufts)}); install a build for that device")
        arr = None
        if ov:
            arr = (BuftOverride * (len(ov) + 1))()
            self._patterns = [rx.encode() for rx, _ in ov]  # the C side keeps pointers into these
            for i, ((_, dev), pat) in enumerate(zip(ov, self._patterns)):
                arr[i].pattern = pat
                arr[i].buft = bufts[buffer_name(dev)]
            arr[len(ov)].pattern = None  # NULL-terminated
            self._overrides = arr

        # Llama() builds its model params from llama_model_default_params() and never touches the override
        # field: hand it defaults that already carry the overrides.
        import llama_cpp.llama_cpp as lib  # the module llama.py calls through (not the package namespace)

        original = lib.llama_model_default_params

        def with_overrides():
            p = original()
            if arr is not None:
                p.tensor_buft_overrides = ctypes.cast(arr, ctypes.c_void_p)
            return p

        devs = {d.device for d in self.plan.devices if d.weights}
        cpu_experts = "cpu" in devs and len(devs) > 1
        kv = {"f16": None, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}[self.plan.kv_type]
        lib.llama_model_default_params = with_overrides
        try:
            self.llm = llama_cpp.Llama(
                model_path=self.plan.model_path, n_ctx=self.plan.ctx, n_batch=min(2048, self.plan.ctx),
                n_gpu_layers=self.compiled.ngl, n_threads=self.plan.threads, n_threads_batch=self.plan.threads,
                use_mmap=maps_weights(self.plan.load_mode, self.plan.streaming, cpu_experts), numa=bool(self.plan.numa),
                flash_attn=True, type_k=kv, type_v=kv, verbose=True)
        finally:
            lib.llama_model_default_params = original
        meta = self.llm.metadata
        vocab = self.llm._model.vocab
        self.eos = llama_cpp.llama_vocab_eos(vocab)
        piece = lambda t: self.llm._model.token_get_text(t) if t >= 0 else ""  # noqa: E731
        template = meta.get("tokenizer.chat_template")
        self.formatter = llama_chat_format.Jinja2ChatFormatter(
            template, eos_token=piece(self.eos), bos_token=piece(llama_cpp.llama_vocab_bos(vocab))) if template else None
        self._is_eog = lambda t: llama_cpp.llama_vocab_is_eog(vocab, t)

    async def stop(self, timeout: float = 10.0) -> None:
        self.state = "stopped"
        for ev in list(self._active):
            ev.set()
        if self._loader is not None and not self._loader.done():
            await asyncio.wait([self._loader], timeout=timeout)
        await asyncio.get_running_loop().run_in_executor(None, lambda: self._pool.shutdown(wait=True, cancel_futures=True))
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    async def metrics_text(self) -> str:
        return ""

    async def tokenize(self, text: str) -> list[int]:
        if self.llm is None:
            raise EngineFailed("model not loaded")
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: self.llm.tokenize(text.encode(), add_bos=False, special=False))

    # --- requests --------------------------------------------------------------------------------------
    def _prompt(self, path: str, body: dict) -> list[int]:
        if path.endswith("chat/completions"):
            if self.formatter is None:
                raise EngineRejected(400, "this model has no chat template; use /v1/completions")
            try:
                r = self.formatter(messages=body["messages"])
            except Exception as e:  # noqa: BLE001 — a template error is the request's problem
                raise EngineRejected(400, f"the chat template could not format these messages: {e}") from None
            return self.llm.tokenize(r.prompt.encode(), add_bos=not r.added_special, special=True)
        prompt = body.get("prompt", "")
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise EngineRejected(400, "prompt: this engine takes one prompt string per request")
            prompt = prompt[0]
        return self.llm.tokenize(prompt.encode(), add_bos=True, special=True)

    def _run(self, path: str, body: dict, emit, cancelled: threading.Event) -> None:
        """Worker thread: generate and call emit(kind, value) with ("text", str) and finally ("done", info)."""
        llm = self.llm
        tokens = self._prompt(path, body)
        n_ctx = llm.n_ctx()
        if len(tokens) >= n_ctx:
            raise EngineRejected(400, f"the prompt has {len(tokens)} tokens; the context is {n_ctx}")
        max_tokens = body.get("max_tokens") or (n_ctx - len(tokens))
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        ignore_eos = bool(body.get("ignore_eos"))
        if body.get("seed") is not None:
            llm.set_seed(int(body["seed"]))
        temp = float(body.get("temperature", 0.8))
        t0 = time.perf_counter()
        t_first = None
        out: list[int] = []
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds a split character, replaces bad bytes
        text_all = ""
        emitted = 0      # chars of text_all already sent (a possible stop string is held back)
        finish = "length"
        hold = max((len(s) for s in stops), default=0)
        for tok in llm.generate(tokens, top_k=int(body.get("top_k", 40)), top_p=float(body.get("top_p", 0.95)),
                                min_p=float(body.get("min_p", 0.05)), temp=temp,
                                repeat_penalty=float(body.get("repeat_penalty", 1.0)),
                                frequency_penalty=float(body.get("frequency_penalty", 0.0)),
                                presence_penalty=float(body.get("presence_penalty", 0.0))):
            if t_first is None:
                t_first = time.perf_counter()
            if cancelled.is_set():
                finish = "cancelled"
                break
            if self._is_eog(tok) and not ignore_eos:
                finish = "stop"
                break
            out.append(tok)
            text_all += utf8.decode(llm.detokenize([tok], prev_tokens=tokens + out[:-1]))
            hit = next((i for i in (text_all.find(s, max(0, emitted - len(s))) for s in stops) if i >= 0), -1)
            if hit >= 0:
                text_all = text_all[:hit]
                finish = "stop"
            safe = len(text_all) if hit >= 0 else len(text_all) - hold
            if safe > emitted:
                emit("text", text_all[emitted:safe])
                emitted = safe
            if hit >= 0 or len(out) >= max_tokens or len(tokens) + len(out) >= n_ctx:
                break
        # A character cut off by the token limit stays unsent (its bytes are held by the decoder), as llama-server
        # does: no U+FFFD at the end of a cut answer.
        if finish != "stop" and emitted < len(text_all):
            emit("text", text_all[emitted:])
        t1 = time.perf_counter()
        emit("done", {"finish_reason": "length" if finish == "cancelled" else finish,
                      "usage": {"prompt_tokens": len(tokens), "completion_tokens": len(out),
                                "total_tokens": len(tokens) + len(out)},
                      "timings": {"prompt_ms": ((t_first or t1) - t0) * 1000,
                                  "predicted_per_second": (len(out) - 1) / (t1 - t_first)
                                  if t_first and len(out) > 1 and t1 > t_first else None}})

    def _chunk(self, path: str, cid: str, created: int, text: str | None, finish=None, role: bool = False) -> dict:
        if path.endswith("chat/completions"):
            delta = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": "",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return {"id": cid, "object": "text_completion", "created": created, "model": "",
                "choices": [{"index": 0, "text": text or "", "finish_reason": finish}]}

    async def stream(self, path: str, body: dict):
        if self.llm is None:
            raise EngineFailed("model not loaded")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        self._active.add(cancelled)

        def emit(kind, value):
            loop.call_soon_threadsafe(q.put_nowait, (kind, value))

        def work():
            try:
                self._run(path, body, emit, cancelled)
            except EngineRejected as e:
                emit("rejected", e)
            except Exception as e:  # noqa: BLE001 — surfaced to the client as an engine failure
                log.exception("generation failed")
                emit("failed", e)

        fut = loop.run_in_executor(self._pool, work)
        chat = path.endswith("chat/completions")
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        try:
            first = True
            while True:
                kind, value = await q.get()
                if first and chat and kind in ("text", "done"):
                    # The role chunk goes out with the first result, so a refusal (prompt too long) comes before
                    # any chunk, as llama-server does: the server then answers with an HTTP error.
                    yield self._chunk(path, cid, created, None, role=True)
                first = False
                if kind == "text":
                    yield self._chunk(path, cid, created, value)
                elif kind == "done":
                    yield self._chunk(path, cid, created, None if chat else "", finish=value["finish_reason"])
                    yield {"id": cid, "object": "chat.completion.chunk" if chat else "text_completion",
                           "created": created, "model": "", "choices": [], "usage": value["usage"],
                           "timings": value["timings"]}
                    return
                elif kind == "rejected":
                    raise value
                else:
                    raise EngineFailed(f"{value.__class__.__name__}: {value}")
        finally:
            cancelled.set()  # a client that went away stops generation at the next token
            self._active.discard(cancelled)
            await asyncio.shield(fut)

    async def complete(self, path: str, body: dict) -> dict:
        chat = path.endswith("chat/completions")
        parts, final, usage, timings, cid, created = [], None, {}, {}, "", 0
        async for ch in self.stream(path, body):
            cid, created = ch["id"], ch["created"]
            if ch.get("usage"):
                usage, timings = ch["usage"], ch.get("timings") or {}
                continue
            c = ch["choices"][0]
            parts.append(((c.get("delta") or {}).get("content") if chat else c.get("text")) or "")
            final = c.get("finish_reason") or final
        text = "".join(parts)
        choice = {"index": 0, "finish_reason": final}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": cid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": "", "choices": [choice], "usage": usage, "timings": timings}


ENGINE = LlamaCppPython()
