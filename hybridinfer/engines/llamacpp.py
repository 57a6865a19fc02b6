"""llama.cpp's `llama-server` as an engine: the plan as its exact command line (flags checked against the installed
build's --help), `llama-bench` with the same placement; `runner.py` runs it (one supervisor, one HTTP client, the
llama-server dialect of `dialect.py`).

A sibling engine built from a llama.cpp fork (ik_llama.cpp) subclasses `LlamaCpp` and differs only in its binary
names, flags and capabilities.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
from typing import TYPE_CHECKING

from ..ggufio import IK_TYPES
from ..predict import PredictionParams
from ..probe import EngineInfo
from .binaries import binary_has_cuda, buffer_type, find_llama_binary, llama_device, rpc_of, rpc_servers
from .base import GIB, Engine, NumaPolicy, Running, RunSettings, maps_weights, strip_flags
from .llamacpp_args import Compiled, buffer_name, compile_placement

if TYPE_CHECKING:
    from ..inspect_gguf import ModelInfo
    from ..plan import Plan
    from ..probe import HardwareProfile

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8080  # in the printed command; `serve` injects its own
# Quant types only the ik_llama.cpp fork defines (IQ*_K, _KS, _KT, _R4/_R8 repacked rows; ids 31-33 mainline
# dropped from GGUF files): mainline refuses to load a file holding any of them.
FORK_TYPES = frozenset(n for n, *_ in IK_TYPES.values())
# Every architecture its tree loads: LLM_ARCH_NAMES in src/llama-arch.cpp of the llama.cpp tree vendored in
# llama-cpp-python 0.3.36, which install.sh builds (and llama-cpp-python runs in-process).
ARCHS = frozenset("""afmoe apertus arcee arctic arwkv7 baichuan bailingmoe bailingmoe2 bailingmoe3 bert bitnet bloom
    chameleon chatglm clip codeshell cogvlm cohere2 cohere2moe command-r dbrx deci deepseek deepseek2 deepseek2-ocr
    deepseek32 deepseek4 dflash dots1 dots3note dream eagle3 ernie4_5 ernie4_5-moe eurobert exaone exaone-moe
    exaone4 falcon falcon-h1 gemma gemma-embedding gemma2 gemma3 gemma3n gemma4 gemma4-assistant glm-dsa glm4
    glm4moe glm5-next gpt-oss gpt2 gptj gptneox granite granite_swa granitehybrid granitemoe graniteswitch grok
    grovemoe hrm_text hunyuan-dense hunyuan-moe hunyuan_vl hy_v3 hy_v4 internlm2 jais jais2 jamba jina-bert-v2
    jina-bert-v3 kimi-k3 kimi-linear laguna lfm2 lfm2moe llada llada-moe llama llama-embed llama4 maincoder mamba
    mamba2 maple mellum mimo2 minicpm minicpm3 minimax-01 minimax-m2 minimax-m3 mistral3 mistral4 modern-bert mpt
    muse-glimmer nanbeige nemotron nemotron_h nemotron_h_moe neo-bert nomic-bert nomic-bert-moe olmo olmo2 olmoe
    openelm orion paddleocr pangu-embedded phi2 phi3 phimoe plamo plamo2 plamo3 plm pockettts qwen qwen2 qwen2moe
    qwen2vl qwen3 qwen35 qwen35moe qwen3moe qwen3next qwen3tts qwen3vl qwen3vlmoe qwen4exp refact rnd1 rwkv6
    rwkv6qwen2 rwkv7 seed_oss smallthinker smollm3 spark2_5 stablelm starcoder starcoder2 step35 t5 t5encoder
    talkie wavtokenizer-dec xverse""".split())


@functools.lru_cache(maxsize=8)
def help_text(binary: str) -> str:
    """The installed build's `--help`: flags differ between llama.cpp versions, so never assume one."""
    try:
        out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30)
        return out.stdout + out.stderr
    except (OSError, subprocess.SubprocessError):
        return ""


@functools.lru_cache(maxsize=8)
def help_flags(binary: str) -> frozenset[str]:
    """Every flag the build's --help names (`-fa, --flash-attn [on|off]` -> {-fa, --flash-attn})."""
    return frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", help_text(binary)))


def compiled_of(plan: "Plan") -> Compiled:
    """The plan's placement in llama.cpp's form (computed once at plan time, stored in plan.compiled)."""
    c = plan.compiled
    if c and "ngl" in c:
        return Compiled(ngl=c["ngl"], overrides=[tuple(x) for x in c["overrides"]], cpu_moe=c["cpu_moe"],
                        devices=c.get("devices", []), split=c.get("split", []), buffers=c.get("buffers", {}),
                        layer=c.get("layer", []))
    return compile_placement(plan.device_of, plan.n_layer, (c or {}).get("gpu_devices"), (c or {}).get("gpu_buffers"))


def placement_args(plan: "Plan") -> list[str]:
    # --rpc first: llama.cpp registers the RPC devices while parsing it, and -dev/-ot look their names up.
    rpc = ["--rpc", ",".join(rpc_of(plan))] if rpc_of(plan) else []
    return rpc + compiled_of(plan).args()


class LlamaCpp(Engine):
    name = "llama.cpp"
    archs = ARCHS
    summary = "llama.cpp's llama-server: every GGUF type on CPU and CUDA, -ot tensor placement, concurrent slots"
    kind = "server"
    drives_rpc_devices = True  # --rpc: a remote ggml device is one more GPU to -ngl/-dev/-ts/-ot
    # Whether -ngl counts the output layer as one of its layers (mainline: src/llama-model.cpp; forks differ)
    ngl_counts_output = True
    server_binary = "llama-server"  # looked up by probe.find_llama_binary (HYBRIDINFER_LLAMA_SERVER, the venv, PATH)
    bench_binary = "llama-bench"
    install_hint = "run ./install.sh (it builds llama.cpp), or set HYBRIDINFER_LLAMA_SERVER to a llama-server binary"
    # ggml's CPU kernels are about 15 % slower than KTransformers' on CPU-resident experts; with a GPU it uploads
    # CPU-resident weights per 512-token ubatch for prefill when that beats computing them on the CPU.
    # Its CPU decode cost per FLOP by weight type, and its memory reads overlapping its compute, measured on this
    # project's Zen 3 VM, one thread, from CPU time, on the mid benchmark model
    # (benchmarks/results/measured_vs_predicted.json): the Q4_K_M variant decodes at 9.4 tok/s and the UD-IQ1_S one
    # at 4.9 although it reads 36 % fewer bytes — Q4_K runs on ggml's repacked GEMV kernels (q4_K_8x8), IQ1_S
    # unpacks grid lookups. Q4_K_M's 1.7 GB per token in 106 ms is ~60 % of one core's read bandwidth, so its reads
    # hide behind compute: the token costs the larger of the two, not their sum. Unmeasured IQ types are assumed to
    # cost what IQ1_S does. Applied to CPU-only plans, the case measured; hybrid plans keep the additive model the
    # published figures were fitted with.
    # NUMA: one copy of the weights: `--numa distribute` spreads threads, but the pages sit where they were first
    # faulted, so the other socket's threads read across the link. ggml declares a MIRROR strategy it never
    # implemented (ggml/include/ggml-cpu.h `GGML_NUMA_STRATEGY_MIRROR`; llama.cpp PR #5377 added it as
    # "plumbing"); issue #1437 ("LLaMA NUMA could be better") measures the missing gain. So no gain from a node.
    prediction_params = PredictionParams(
        cpu_eff=0.85, prefill_uploads_weights=True, numa_extra_node_gain=0.0, overlap_cpu_reads=True,
        cpu_type_cost=(("Q4_0", 0.4), ("Q4_K", 0.4), ("IQ4_NL", 0.4), ("IQ1_S", 1.4), ("IQ1_M", 1.4), ("IQ2_XXS", 1.4),
                       ("IQ2_XS", 1.4), ("IQ2_S", 1.4), ("IQ3_XXS", 1.4), ("IQ3_S", 1.4)))
    # llama-server's RSS on the mid benchmark model is its buffers plus <0.1 GiB
    # (benchmarks/results/measured_vs_predicted.json).
    cpu_runtime_bytes = int(0.1 * GIB)
    # Its CPU compute buffer holds activations, not logits for a whole ubatch: 108 MiB measured for the mid model
    # at ubatch 512, vocab 102k, where the planner's `compute` is 370 MiB.
    full_cpu_compute_buffer = False
    # ggml's CPU backend repacks weights of these types (matrices and expert stacks alike; not the embedding, which
    # it only gathers rows from) into its CPU_REPACK buffer for its AVX2/AVX-512 kernels (ggml-cpu/repack.cpp; load
    # log: "repack tensor blk.0.attn_q.weight with q4_K_8x8"). With the file mapped, the originals stay mapped too:
    # RSS counts those bytes twice (measured: the mid model's Q4_K_M variant). The originals are never read again,
    # so under memory pressure they are the first pages dropped: the fit check does not count them.
    repacked_types = frozenset({"Q4_0", "Q4_K", "IQ4_NL"})
    # What `serve` adds to or replaces in plan.command, and nothing else (value-taking flags map to True).
    runtime_flags = {"--host": True, "--port": True, "--alias": True, "-v": False}
    missing_metrics: tuple[str, ...] = ()  # llamacpp:* metrics mainline reports and this build's server does not
    unlisted_flags: frozenset[str] = frozenset()  # flags its parser takes that its --help does not name

    # --- capabilities -----------------------------------------------------------------------------------
    def runs(self, cls: str, type_: str, device: str) -> bool:
        return type_ not in FORK_TYPES and not type_.startswith("type")  # ggml computes every type it knows

    def blockers(self, model: "ModelInfo", placement, hw: "HardwareProfile") -> list[str]:
        out = super().blockers(model, placement, hw)
        fork = sorted({t for g in model.groups.values() for t in g.types if t in FORK_TYPES and not self.runs("", t, "cpu")})
        if fork:
            out.insert(0, f"{'/'.join(fork)}: ik_llama.cpp's own quant type{'s' if len(fork) > 1 else ''}, which "
                          f"{self.name} cannot load (run the file with --engine ik_llama.cpp)")
        return out

    # --- this box ---------------------------------------------------------------------------------------
    def binary(self) -> str | None:
        return find_llama_binary(self.server_binary)

    def probe(self) -> EngineInfo:
        path = self.binary()
        if not path:
            return EngineInfo(name=self.name, installed=False, detail=f"{self.server_binary} not found: {self.install_hint}")
        version = ""
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
            text = out.stdout + out.stderr
            m = re.search(r"version: (\S+(?: \([^)]*\))?)", text)
            version = m.group(1) if m else text.strip().splitlines()[0] if text.strip() else ""
        except (OSError, subprocess.SubprocessError) as e:
            return EngineInfo(name=self.name, installed=False, path=path, detail=f"{self.server_binary} does not run: {e}")
        return EngineInfo(name=self.name, installed=True, version=version, path=path, gpu=binary_has_cuda(path))

    def flags(self, binary: str | None) -> set[str]:
        return set(help_flags(binary)) | self.unlisted_flags if binary else set()

    def unix_socket(self, binary: str) -> bool:
        """Whether this build listens on a Unix socket given `--host PATH.sock`."""
        return "UNIX socket" in help_text(binary)

    @property
    def prompt_cache_max(self) -> int | None:
        # llama-server's own --cache-ram default, the most the plan gives it unasked; a build without the flag
        # (older, or a fork) has no such cache to plan.
        return 8 * 2**30 if self.has_flag(self.binary(), "--cache-ram") else None

    @property
    def saves_slots(self) -> bool:
        # POST /slots/{id}?action=save|restore with --slot-save-path (tools/server/server-context.cpp,
        # SERVER_TASK_TYPE_SLOT_SAVE/RESTORE; ik_llama.cpp examples/server/server-context.cpp alike).
        return self.has_flag(self.binary(), "--slot-save-path")

    def build_fingerprint(self) -> str:
        """The server binary and the libraries beside it (libllama, libggml*): path, size, modification time."""
        from ..diskcache import file_fingerprint

        binary = self.binary()
        if not binary:
            return "none"
        real = os.path.realpath(binary)
        files = [real]
        for d in {os.path.dirname(real), os.path.join(os.path.dirname(real), "..", "lib")}:
            try:
                files += [os.path.join(d, f) for f in os.listdir(d) if f.startswith("lib") and ".so" in f]
            except OSError:
                pass
        return f"{self.name}:{file_fingerprint(files)}"

    def has_flag(self, binary: str | None, flag: str) -> bool:
        # No binary to ask (planning where none is installed): write the current flag set.
        return not binary or flag in self.flags(binary)

    def numa_policy(self, nodes: int) -> NumaPolicy:
        return NumaPolicy("distribute", f"NUMA: {nodes} nodes; {self.name} --numa distribute spreads threads and pages")

    def chosen_because(self, model: "ModelInfo", hw: "HardwareProfile") -> str:
        return "runs every GGUF quant type on CPU and CUDA"

    # --- the command ------------------------------------------------------------------------------------
    def compile(self, plan: "Plan", hw: "HardwareProfile | None" = None) -> dict:
        # Every GPU of the box -> its llama.cpp device name and buffer type (CUDA0, RPC0[host:port], ...), the RPC
        # servers to pass, and the prompt cache the plan counted in RAM (--cache-ram; the engine's default is 8 GiB).
        gpus = hw.gpus if hw else []
        names = {f"gpu:{g.index}": llama_device(g) for g in gpus}
        buffers = {f"gpu:{g.index}": buffer_type(g) for g in gpus}
        c = compile_placement(plan.device_of, plan.n_layer, names, buffers, counts_output=self.ngl_counts_output)
        return {"ngl": c.ngl, "overrides": [list(o) for o in c.overrides], "cpu_moe": c.cpu_moe,
                "devices": c.devices, "split": c.split, "buffers": c.buffers, "layer": c.layer,
                "gpu_devices": names, "gpu_buffers": buffers, "rpc_servers": rpc_servers(gpus),
                "cache_ram_mib": None if self.prompt_cache_max is None else plan.devices[0].prompt_cache // 2**20}

    def command(self, plan: "Plan") -> list[str]:
        binary = self.binary()
        return [binary or self.server_binary, "-m", plan.model_path] + self.model_args(plan, binary) + \
            self.endpoint_args(DEFAULT_HOST, DEFAULT_PORT)

    def model_args(self, plan: "Plan", binary: str | None) -> list[str]:
        cmd = ["-c", str(plan.ctx), "-np", str(plan.parallel), "-t", str(plan.threads), "-tb", str(plan.threads)]
        cmd += placement_args(plan)
        if plan.numa:
            cmd += ["--numa", plan.numa]
        cmd += self.kv_args(plan, binary)
        cmd += self.batch_args(plan)
        cmd += self.load_args(plan, binary)
        if self.has_flag(binary, "--metrics"):
            cmd += ["--metrics"]
        if self.has_flag(binary, "--jinja"):
            cmd += ["--jinja"]
        if self.has_flag(binary, "--reasoning-format"):
            cmd += ["--reasoning-format", "none"]  # hybridinfer's server splits <think> itself, for any engine
        cache_mib = (plan.compiled or {}).get("cache_ram_mib")
        if cache_mib is not None and self.has_flag(binary, "--cache-ram"):
            cmd += ["--cache-ram", str(cache_mib)]
        if plan.prompt_cache_dir and self.has_flag(binary, "--slot-save-path"):
            cmd += ["--slot-save-path", plan.prompt_cache_dir + os.sep]  # serve creates it before the engine starts
        return cmd

    def kv_args(self, plan: "Plan", binary: str | None) -> list[str]:
        if plan.kv_type == "f16":
            return []
        return ["-ctk", plan.kv_type, "-ctv", plan.kv_type, "-fa", "on"]

    def batch_args(self, plan: "Plan") -> list[str]:
        return (["-b", str(plan.batch)] if plan.batch else []) + (["-ub", str(plan.ubatch)] if plan.ubatch else [])

    def into_ram(self, plan: "Plan") -> bool:
        """Weights read into RAM rather than mapped (base.maps_weights decides, for the planner's memory figure too)."""
        devs = set(plan.device_of.values()) if plan.device_of else {d.device for d in plan.devices}
        return not maps_weights(plan.load_mode, plan.streaming, "cpu" in devs and len(devs) > 1)

    def load_args(self, plan: "Plan", binary: str | None) -> list[str]:
        # Weights read into RAM run faster than mmap'd ones when experts stay on the CPU; streaming needs mmap.
        ram = self.into_ram(plan)
        mmap = plan.streaming or plan.load_mode == "mmap"
        if self.has_flag(binary, "--load-mode"):
            return ["--load-mode", "mmap"] if mmap else ["--load-mode", "none"] if ram else []
        return ["--no-mmap"] if ram and self.has_flag(binary, "--no-mmap") else []

    def endpoint_args(self, host: str, port: int | str) -> list[str]:
        return ["--host", host, "--port", str(port)]

    def strip_runtime(self, argv: list[str]) -> list[str]:
        """argv without the flags `serve` injects (runtime_flags): what must equal plan.command stripped alike."""
        return strip_flags(argv, self.runtime_flags)

    def launch_argv(self, command: list[str], host: str, port: int, settings: RunSettings) -> list[str]:
        """plan.command with the server's endpoint, model id and verbosity: the only differences allowed."""
        argv = self.strip_runtime(command) + self.endpoint_args(host, port) + ["--alias", settings.model_id]
        return argv + (["-v"] if settings.verbose else [])

    def runner(self, plan: "Plan", settings: RunSettings) -> "Running":
        from .dialect import Dialect  # httpx & co. load only when something runs
        from .runner import ServerRunner

        if rpc_of(plan):  # one line naming an unreachable worker, before anything loads
            from .rpc import check_reachable

            check_reachable(rpc_of(plan))
        return ServerRunner(Dialect(self), plan, settings)

    # --- llama-bench ------------------------------------------------------------------------------------
    def bench_binary_path(self) -> str | None:
        return find_llama_binary(self.bench_binary)

    def parse_bench(self, stdout: str) -> list[dict]:
        return parse_bench(stdout)

    def bench_command(self, plan: "Plan", n_prompt: int = 512, n_gen: int = 128, repetitions: int = 3) -> list[str]:
        """`llama-bench` with the plan's placement (pp{n_prompt} / tg{n_gen}); JSON on stdout. A fork's llama-bench
        differs in the parts (bench_*_args below), not in this order."""
        exe = find_llama_binary(self.bench_binary) or self.bench_binary
        c = compiled_of(plan)
        cmd = [exe, *self.bench_rpc_args(plan), "-m", plan.model_path, "-p", str(n_prompt), "-n", str(n_gen),
               "-r", str(repetitions), "-t", str(plan.threads), "-ngl", str(c.ngl), "-o", "json"]
        cmd += self.bench_placement_args(plan, c)
        if plan.numa:
            cmd += ["--numa", plan.numa]
        return cmd + self.bench_kv_args(plan) + self.bench_load_args(plan, exe)

    def bench_rpc_args(self, plan: "Plan") -> list[str]:
        return ["-rpc", ",".join(rpc_of(plan))] if rpc_of(plan) else []

    def bench_placement_args(self, plan: "Plan", c: Compiled) -> list[str]:
        out = c.layout_args(sep="/")  # llama-bench: ',' separates values to test, '/' the devices of one run
        if c.overrides:  # llama-bench has no --cpu-moe: the same regexes, ';'-joined
            out += ["-ot", ";".join(f"{rx}={buffer_name(d, c.buffers)}" for rx, d in c.overrides)]
        return out

    def bench_kv_args(self, plan: "Plan") -> list[str]:
        return [] if plan.kv_type == "f16" else ["-ctk", plan.kv_type, "-ctv", plan.kv_type, "-fa", "on"]

    def bench_load_args(self, plan: "Plan", exe: str) -> list[str]:
        """Batch sizes and weight loading as the server runs them."""
        cmd = self.batch_args(plan)
        if plan.streaming or plan.load_mode == "mmap":
            cmd += ["-lm", "mmap"] if self.has_flag(exe, "--load-mode") else []
        elif self.into_ram(plan):
            cmd += ["-lm", "none"] if self.has_flag(exe, "--load-mode") else ["-mmp", "0"]
        return cmd

ENGINE = LlamaCpp()


# --- llama-bench output ---------------------------------------------------------------------------

def parse_bench(stdout: str) -> list[dict]:
    """llama-bench -o json -> [{"test": "pp512"|"tg128", "tokens_per_s": mean, "stddev": s}, ...]."""
    # Keep JSON lines only: forks print load messages to stdout amid the array (ik_llama.cpp's MLA set-up).
    text = "\n".join(ln for ln in stdout.splitlines() if re.match(r'\s*[\[\]{}"]', ln))
    rows = json.loads(text[text.index("["):])
    out = []
    for r in rows:
        test = f"pp{r['n_prompt']}" if r.get("n_gen", 0) == 0 else f"tg{r['n_gen']}"
        out.append({"test": test, "tokens_per_s": r["avg_ts"], "stddev": r.get("stddev_ts", 0.0),
                    "best_tokens_per_s": max(r.get("samples_ts") or [r["avg_ts"]]),
                    "n_threads": r.get("n_threads"), "backends": r.get("backends")})
    return out
