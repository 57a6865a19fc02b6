"""The engine seam: what every engine module under `engines/` offers the rest of hybridinfer.

An engine is one object (`ENGINE` in its module, listed in `engines.REGISTRY`) whose capability attributes the planner,
`inspect`, `probe`, the CLI and the server read, and whose methods say whether it can run a placement (`blockers`),
how it is launched (`command`, computed once at plan time and stored on the frozen Plan), and how the server drives
it while it runs (`runner` -> a `Running`).

A running engine is the `Running` protocol below (an async context manager). Engines run as a supervised HTTP
server share one implementation of it (engines/runner.py, with a per-engine `Dialect`); an in-process engine
writes its own on `RunningBase`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Callable, Mapping, Protocol, runtime_checkable

from ..predict import PredictionParams
from ..probe import EngineInfo, HardwareProfile
from .binaries import llama_device

if TYPE_CHECKING:  # annotations only: the planner imports the engines, never the other way round
    from ..inspect_gguf import ModelInfo, Tensor
    from ..plan import Plan, PlanOptions

GIB = 1024**3


class EngineRejected(Exception):
    """The engine answered the request with an error (bad request, context exceeded, ...)."""

    def __init__(self, status: int, message: str, type_: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")


class EngineFailed(Exception):
    """The engine broke during the request (died, connection lost)."""


class EngineTimeout(EngineFailed):
    """The engine did not answer within the request timeout (it is still running; the request was dropped)."""


@runtime_checkable
class Running(Protocol):
    """A running engine, as the server drives it (what `Engine.runner` returns). Every method is the engine's
    own; `path` is "/v1/chat/completions" or "/v1/completions" and `body` the OpenAI request body."""

    state: str  # starting | loading | ready | down | stopped
    restarts: int  # how many times it was restarted after dying
    started_at: float  # monotonic seconds; load time = ready_at - started_at
    ready_at: float
    fatal: str | None  # a load failure no restart can fix (None otherwise)
    notes: tuple[str, ...]  # what the engine lacks and how hybridinfer adapts (printed in serve's banner)

    def command(self) -> list[str]:
        """What it runs, for the banner."""
        ...

    async def wait_ready(self, timeout: float | None = None) -> bool: ...

    async def complete(self, path: str, body: dict) -> dict:
        """One OpenAI-shaped response."""
        ...

    def stream(self, path: str, body: dict) -> AsyncIterator[dict]:
        """OpenAI-shaped chunks, the last one carrying `usage`."""
        ...

    async def tokenize(self, text: str) -> list[int]:
        """The model's tokenizer (no BOS)."""
        ...

    async def metrics_text(self) -> str:
        """The engine's own Prometheus text ("" if none)."""
        ...

    async def __aenter__(self) -> "Running": ...

    async def __aexit__(self, *exc) -> None: ...


class RunningBase:
    """What every running engine shares: async-context-manager lifecycle and waiting for readiness.
    Subclasses define start(), stop() and set `self._ready` (an asyncio.Event) when loaded."""

    fatal: str | None = None
    notes: tuple[str, ...] = ()  # what this engine lacks that hybridinfer works around, said once at start
    _ready: asyncio.Event

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc):
        await self.stop()

    async def wait_ready(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


@dataclass(frozen=True)
class RunSettings:
    """What the server tells an engine's runner beyond the plan (the server's own settings stay in server/)."""
    model_id: str = "default"  # the id the API serves under (engines that name their model get it too)
    request_timeout: float = 600.0
    max_connections: int = 64  # concurrent requests the runner may open to the engine
    log_file: str | None = None  # also write the engine's full log here
    on_line: Callable[[str], None] | None = None  # each engine log line
    verbose: bool = False  # the engine's own verbose logging (per-tensor placement)


def strip_flags(argv: list[str], flags: dict[str, bool]) -> list[str]:
    """argv without `flags` (flag -> whether it takes a value): the runtime flags a runner injects."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in flags:
            i += 2 if flags[argv[i]] else 1
            continue
        out.append(argv[i])
        i += 1
    return out


def maps_weights(load_mode: str, streaming: bool, mixed: bool) -> bool:
    """Whether the engine maps the weights file (mmap) rather than reading it into RAM: asked for, needed for
    streaming, or (auto) unless experts stay on the CPU beside a GPU (`mixed`), where read-in weights run faster.
    The one place this is decided: the planner's memory figure and the engines' load flags both ask it."""
    return streaming or load_mode == "mmap" or (load_mode == "auto" and not mixed)


@dataclass(frozen=True)
class NumaPolicy:
    flag: str  # the engine's NUMA setting for the command ("" = none)
    reason: str  # one line for the plan's "Why"


@dataclass(frozen=True)
class EngineOption:
    """An option an engine brings to plan/serve/bench/tune: `flag VALUE` on the command line, and `key` (argparse's
    dest for the flag) in `PlanOptions.engine_options`, the one field every engine's options travel in."""
    flag: str  # e.g. "--kt-model-dir"
    help: str
    metavar: str = "VALUE"

    @property
    def key(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def argparse_kwargs(self) -> dict:
        return {"metavar": self.metavar, "help": self.help}


# Every option any engine class declares, by key (filled as engine classes are defined): an unknown key in
# PlanOptions.engine_options is a typo, refused rather than ignored.
_DECLARED: dict[str, EngineOption] = {}


class Engine:
    """Base class: capability attributes with the values most engines share, and the methods each engine defines.

    Subclasses override attributes as class attributes; the rest of the program reads them from the instance."""

    name: str = ""
    summary: str = ""
    kind: str = "server"  # "server" (a supervised subprocess) | "in-process"
    needs_nvidia_gpu: bool = False
    drives_rpc_devices: bool = False  # can use llama.cpp RPC servers (a profile's GPU entries with an endpoint)
    max_slots: int | None = None  # None = no limit of its own
    serves: bool = True  # `hybridinfer serve` can run it (False: plan prints its command only)
    gpu_runtime_bytes: int = int(0.45 * GIB)  # CUDA context, cuBLAS workspace, ...
    cpu_runtime_bytes: int = int(0.5 * GIB)  # process memory beyond its buffers (Python and torch for some)
    prompt_cache_max: int | None = None  # bytes: a prompt cache in RAM it fills up to this unless told (--cache-ram)
    saves_slots: bool = False  # can save a slot's KV state to a file and restore it (the prompt cache on disk)
    # Whether its CPU compute buffer holds logits for a whole ubatch (the planner's `compute` figure); False: only
    # activations, ~1/4 of it.
    full_cpu_compute_buffer: bool = True
    # Weight types its CPU backend copies into a repacked buffer for its kernels while the mapped originals stay
    # resident too (counted in the CPU memory figure when the file is mapped).
    repacked_types: frozenset[str] = frozenset()
    prediction_params: PredictionParams = PredictionParams()
    install_hint: str = "see docs/engines.md"
    options: tuple[EngineOption, ...] = ()  # what it adds to plan/serve/bench; values reach PlanOptions.engine_options
    probe_names: tuple[str, ...] = ()  # EngineInfo names in a hardware profile that mean it is installed
    # GGUF architectures (general.architecture) its tree loads; None: any. Read through `runs_arch`.
    archs: frozenset[str] | None = None

    # --- capabilities -------------------------------------------------------------------------------
    def runs(self, cls: str, type_: str, device: str) -> bool:
        """Whether its kernels compute tensors of class `cls` in quant type `type_` on `device` ("cpu" | "gpu")."""
        return True

    def runs_arch(self, arch: str) -> str | None:
        """None if it runs models of this GGUF architecture, else why not (a blocker; `inspect` shows it)."""
        if self.archs is None or arch in self.archs:
            return None
        return f"architecture {arch}: not in {self.name}'s tree"

    def support(self, cls: str, types: set[str]) -> str:
        """For `inspect`: 'ok', 'ok after patch (...)' or 'refused: ...' for a tensor group with these types."""
        bad = sorted(t for t in types if not (self.runs(cls, t, "cpu") or self.runs(cls, t, "gpu")))
        return "ok" if not bad else f"refused: {'/'.join(bad)} not computed by its kernels"

    def kv_bytes_per_token(self, model: "ModelInfo", kv_type: str) -> int:
        return model.kv.bytes_per_token[kv_type]

    def kv_form(self, model: "ModelInfo") -> str:
        return model.kv.form

    def tensor_bytes(self, t: "Tensor", device: str) -> int:
        """Bytes a tensor occupies on `device` ("cpu" | "gpu:N"): engines that repack weights differ from the file."""
        return t.nbytes

    def numa_policy(self, nodes: int) -> NumaPolicy:
        return NumaPolicy("", f"NUMA: {nodes} nodes")

    def extra_ram(self, cpu_expert_bytes: int, nodes: int) -> tuple[int, str]:
        """RAM it needs beyond the CPU-side weights (e.g. per-node copies) and the warning saying why."""
        return 0, ""

    # --- this box -------------------------------------------------------------------------------------
    def probe(self) -> EngineInfo | None:
        """What `probe` reports for it on this box (version, CUDA, path); installed=False with why when absent."""
        return None

    def probe_all(self) -> list[EngineInfo]:
        """Every row it contributes to `probe`'s engine table (an engine may come as several packages)."""
        info = self.probe()
        return [info] if info else []

    def installed(self, hw: HardwareProfile) -> EngineInfo | None:
        """Its entry in the hardware profile's engines list, if installed there."""
        for n in self.probe_names or (self.name,):
            e = hw.engine(n)
            if e:
                return e
        return None

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        _DECLARED.update((o.key, o) for o in cls.options)

    def validate_options(self, options: Mapping[str, str]) -> None:
        """Refuse (one-line HybridError) a key no engine declares and a value of its own options that is not text.
        Engines with stricter options extend this; what depends on the box (a folder's contents) is a blocker."""
        from ..errors import HybridError

        for key, value in options.items():
            if key not in _DECLARED:
                raise HybridError(f"unknown engine option '{key}'", f"use one of {', '.join(sorted(_DECLARED))}")
            if any(o.key == key for o in self.options) and not isinstance(value, str):
                raise HybridError(f"engine option '{key}' must be text, not {value!r}", f"pass {_DECLARED[key].flag} "
                                  f"{_DECLARED[key].metavar}")

    def for_box(self, hw: HardwareProfile, opts: "PlanOptions", model: "ModelInfo") -> "Engine":
        """This engine as installed on `hw` (its version's flags, its build's features) for these plan options and
        model: what the planner asks for costs, blockers and the command. The options are checked first."""
        self.validate_options(opts.engine_options)
        return self.bind(hw, opts, model)

    def bind(self, hw: HardwareProfile, opts: "PlanOptions", model: "ModelInfo") -> "Engine":
        """for_box's per-engine part: a new frozen object holding what this box, options and model decide (never
        this one changed: the registry's instance runs saved plans and reports probes). Default: itself, for an
        engine with nothing per box."""
        return self

    def build_fingerprint(self) -> str:
        """What identifies the installed build (a saved KV state is restored only into the build that wrote it)."""
        return ""

    def flags(self, binary: str | None) -> set[str]:
        """Flags the installed build accepts (from its --help); empty when there is no binary to ask."""
        return set()

    # --- planning ------------------------------------------------------------------------------------
    def blockers(self, model: "ModelInfo", placement: dict[str, str] | None, hw: HardwareProfile) -> list[str]:
        """Why it cannot run this model with this placement (tensor name -> device) on this box; [] = it can.
        With placement None, only what holds for any placement (architecture, quant types, GPU)."""
        why = self.runs_arch(model.arch)
        out = [why] if why else []
        if self.needs_nvidia_gpu and not any(not g.remote for g in hw.gpus):
            out.append(f"no NVIDIA GPU: {self.name} needs CUDA")
        remote = [llama_device(g) for g in hw.gpus if g.remote]
        if remote and not self.drives_rpc_devices:
            out.append(f"{', '.join(remote)} are llama.cpp RPC servers: only llama-server drives them")
        for cls, g in model.groups.items():
            for t in sorted(g.types):
                if placement is None:
                    if not (self.runs(cls, t, "cpu") or self.runs(cls, t, "gpu")):
                        out.append(f"{cls} in {t}: not computed by its kernels")
        if placement is not None:
            bad: dict[tuple[str, str], int] = {}
            for t in model.tensors:
                dev = placement.get(t.name, "cpu")
                kind = "cpu" if dev == "cpu" else "gpu"
                if not self.runs(t.cls, t.type, kind):
                    bad[(t.type, kind)] = bad.get((t.type, kind), 0) + 1
            for (typ, kind), n in sorted(bad.items()):
                out.append(f"{n} tensor(s) in {typ} placed on the {kind.upper()}: its {kind.upper()} kernels do not run {typ}")
        return out

    def chosen_because(self, model: "ModelInfo", hw: HardwareProfile) -> str:
        """A short clause for the plan's "Why" when it is chosen (what makes it eligible here)."""
        return self.summary

    def compile(self, plan: "Plan", hw: HardwareProfile | None = None) -> dict:
        """The placement in the engine's own form (JSON-able), stored on the plan as `plan.compiled`: everything
        engine-specific the command and the runner read, with what they need of the box (`hw`, the planned one)."""
        return {}

    def command(self, plan: "Plan") -> list[str]:
        """The argv that runs this plan (stored on the plan as `plan.command`)."""
        raise NotImplementedError

    def starts_in_think(self, plan: "Plan") -> bool:
        """Whether the engine itself opens the reasoning block before the model's output (KTransformers'
        --force_think), whatever the chat template does."""
        return False

    def endpoint_args(self, host: str, port: int) -> list[str]:
        """The arguments the server injects into `plan.command` to say where the engine listens."""
        return []

    def bench_command(self, plan: "Plan", n_prompt: int = 512, n_gen: int = 128, repetitions: int = 3) -> list[str] | None:
        """Its own benchmark tool with the plan's placement (None: it has none)."""
        return None

    def bench_binary_path(self) -> str | None:
        """Its benchmark tool on this box (None: it has none, or it is not installed)."""
        return None

    # --- calibration (calibrate.py measures, predict.py uses) ----------------------------------------------
    # Another engine whose calibrated figures apply to this one (the same kernels, e.g. an in-process wheel of the
    # same tree); None: its own, if it has a benchmark tool.
    calibrate_as: str | None = None

    def calibration_variants(self) -> dict[str, dict]:
        """The ways of running it that `calibrate` measures: key -> PlanOptions fields that select that way."""
        return {self.name: {}}

    def calibration_key(self, device_of: dict[str, str], streaming: bool, load_mode: str) -> str:
        """The calibrated variant a placement runs as."""
        return self.calibrate_as or self.name

    def parse_bench(self, stdout: str) -> list[dict]:
        """Its benchmark's output -> [{"test": "pp512"|"tg128", "tokens_per_s": ..., "stddev": ...}, ...]."""
        raise NotImplementedError

    def runner(self, plan: "Plan", settings: RunSettings) -> Running:
        from ..errors import HybridError
        raise HybridError(f"hybridinfer does not run {self.name} itself yet", "use `hybridinfer plan` for its command")

    def not_installed_error(self):
        from ..errors import HybridError
        return HybridError(f"engine {self.name} is not installed on this box", self.install_hint)

    def __repr__(self) -> str:
        return f"<engine {self.name}>"
