"""`hybridinfer bench`: sweep concurrency (or request rate) against one or more OpenAI endpoints, side by side."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ..errors import HybridError
from ..metrics import DECODE_TPS, PREFILL_TPS
from ..util import atomic_write, dump_json
from .load import Target, file_prompts, first_model, random_prompts, run_level, server_info, server_tokenizer

SCHEMA = "hybridinfer.bench/1"


def cmd_bench(args) -> int:
    """Measure tokens/s, TTFT, TPOT, ITL and E2E latency of OpenAI-compatible endpoints, as vLLM's bench serve does.

    Streams requests at each --concurrency level (closed loop), or with Poisson arrivals at --request-rate with at
    most that many in flight. Several --url run one after another on the same prompts, so two setups compare in one
    run. Without --url it starts `hybridinfer serve` (the demo model, or --gguf) on a free port and stops it after.

      hybridinfer bench                                             # the demo model, concurrency 1
      hybridinfer bench --url http://127.0.0.1:8000/v1 --concurrency 1,2,4,8 --json out.json --plot out.png
      hybridinfer bench --url http://a:8000/v1 --url http://b:8080/v1 --request-rate 2 --duration 60
      hybridinfer bench --engine-bench                              # + llama-bench pp512/tg128 with the plan's placement

    Exit status: 0 when some requests completed, 1 when every request failed, 2 on bad arguments.
    """
    from rich.console import Console

    from .report import plot, render

    console = Console(stderr=True, highlight=False)
    levels, rate = _check_args(args)
    served = None
    urls = list(args.url or [])
    plan_file = None
    if not urls or args.engine_bench:
        # Planned once: the served engine and the engine bench run this same plan.
        plan_file = _plan_file(args, max(levels), console)
    if not urls:
        served = _start_serve(args, plan_file, console)
        urls = [served[1]]
    try:
        report = asyncio.run(_run(args, urls, levels, rate, console))
    finally:
        if served:
            served[0].terminate()
            try:
                served[0].wait(15)
            except subprocess.TimeoutExpired:
                served[0].kill()
    if args.engine_bench:
        report["engine_bench"] = _engine_bench(plan_file, args, console)
    if plan_file and not args.plan:
        os.unlink(plan_file)
    render(report)
    if args.json:
        atomic_write(args.json, dump_json(report) + "\n")
        console.print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        console.print(f"wrote {args.plot}")
    total_ok = sum(lv["completed"] for run in report["runs"] for lv in run["levels"])
    if total_ok == 0:
        first = next((lv["first_error"] for run in report["runs"] for lv in run["levels"] if lv["first_error"]), None)
        print(f"hybridinfer: error: every request failed (first: {first})", file=sys.stderr)
        return 1
    return 0


def _check_args(args) -> tuple[list[int], float]:
    """Refuse bad arguments before anything starts. -> (concurrency levels, request rate)."""
    levels = _int_list(args.concurrency, "--concurrency")
    rate = _rate(args.request_rate)
    for path in (args.json, args.plot):
        if path and not Path(path).resolve().parent.is_dir():
            raise HybridError(f"cannot write {path}: its directory does not exist", "create the directory or choose another path")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise HybridError("--plot needs matplotlib, which is not installed",
                              "pip install matplotlib (./install.sh --dev has it), or drop --plot") from None
    if args.dataset != "random" and not Path(args.dataset).is_file():
        raise HybridError(f"dataset '{args.dataset}' does not exist", "pass random, or a JSONL file with \"prompt\" per line")
    return levels, rate


async def _run(args, urls, levels, rate, console) -> dict:
    rng = random.Random(args.seed)
    runs = []
    counted_by = None
    prompts_cache: list[str] | None = None
    n_needed = max(args.requests, 1) if not args.duration else 64
    async with httpx.AsyncClient() as client:
        for url in urls:
            url = url.rstrip("/")
            if not url.endswith("/v1"):
                url += "/v1"
            model = args.model
            if not model:
                try:
                    model = await first_model(client, url, args.api_key)
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    model = "default"
                    console.print(f"[yellow]{url}: could not list models ({e.__class__.__name__}); using model '{model}'[/]")
            if prompts_cache is None:  # the first server's tokenizer sizes the prompts every URL gets
                prompts_cache, counted_by = await _prompts(client, url, args, n_needed + args.warmup)
            target = Target(url=url, model=model, chat=not args.completions, max_tokens=args.max_tokens,
                            ignore_eos=args.ignore_eos if args.ignore_eos is not None else args.dataset == "random",
                            api_key=args.api_key or os.environ.get("OPENAI_API_KEY"), seed=args.seed,
                            timeout=args.timeout)
            warm, prompts = prompts_cache[:args.warmup], prompts_cache[args.warmup:]
            run = {"url": url, "model": model, "server": await server_info(client, url, target.api_key), "levels": []}
            if warm:
                w = await run_level(target, warm, 1)
                run["warmup_failed"] = sum(not s.ok for s in w.samples)
            for c in levels:
                run["levels"].append(await _level(target, prompts, c, rate, args.duration, rng, console))
            runs.append(run)
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": _machine(),
            "config": {"concurrency": levels, "request_rate": "inf" if rate == float("inf") else rate,
                       "requests": None if args.duration else args.requests, "duration": args.duration,
                       "warmup": args.warmup, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                       "dataset": args.dataset, "seed": args.seed, "endpoint": "completions" if args.completions else "chat"},
            "prompt_tokens_counted_by": counted_by, "runs": runs, "engine_bench": None}


async def _prompts(client, url: str, args, n: int) -> tuple[list[str], str]:
    """n prompts (random ones of --prompt-tokens, or from the dataset) and how their tokens are counted."""
    if args.dataset == "random":
        count = await server_tokenizer(client, url)
        counted_by = "server /tokenize" if count else "estimate: one token per common English word"
        return await random_prompts(n, args.prompt_tokens, random.Random(args.seed), count), counted_by
    try:
        prompts = file_prompts(args.dataset, n, random.Random(args.seed))
    except ValueError as e:
        raise HybridError(str(e), "fix the dataset file") from None
    return prompts, "dataset (token counts from the server's usage)"


async def _level(target: Target, prompts: list[str], c: int, rate: float, duration, rng, console) -> dict:
    """One concurrency level against one URL, with a progress bar on a terminal -> its summary and samples."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    url = target.url
    total = None if duration else len(prompts)
    with Progress(TextColumn(f"{url} c={c}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[st]}"),
                  TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal) as prog:
        task = prog.add_task("", total=total, st="")
        fails = [0]

        def done(s):
            fails[0] += not s.ok
            prog.update(task, advance=1, st=f"{fails[0]} failed" if fails[0] else "")

        lv = await run_level(target, prompts, c, rate, duration, rng, on_done=done)
    summ = lv.summary()
    summ["samples"] = [vars(s) for s in lv.samples]
    console.print(f"{url} c={c}: {summ['completed']} ok, {summ['failed']} failed, "
                  f"{summ['output_throughput']:.1f} output tok/s"
                  + (f" — first error: {summ['first_error']}" if summ["first_error"] else ""))
    return summ


def _machine() -> dict:
    import psutil

    from ..probe import probe

    try:
        hw = probe()
        return {"host": platform.node(), "cpu": hw.cpu.model, "physical_cores": hw.cpu.physical_cores,
                "ram_gib": round(hw.ram_total / 2**30, 1), "gpus": [g.name for g in hw.gpus]}
    except Exception:  # noqa: BLE001 — the report still stands without the machine line
        return {"host": platform.node(), "logical_cores": psutil.cpu_count(), "gpus": []}


def _plan_file(args, parallel: int, console) -> str:
    """The plan `serve` and the engine bench share: --plan as given, or planned here for this box and saved."""
    import tempfile

    from ..options import calibrated_box, load_model, load_plan
    from ..plan import PlanOptions, make_plan

    if args.plan:
        if args.gguf:
            raise HybridError("--plan fixes the model; --gguf cannot change it", "drop --gguf, or drop --plan")
        load_plan(args.plan)  # a bad file is one line here, not a failed serve later
        return args.plan
    plan = make_plan(calibrated_box(), load_model(args), PlanOptions(parallel=min(parallel, 8), serving=True))
    fd, path = tempfile.mkstemp(prefix="hybridinfer-plan-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(dump_json(plan))
    console.print(f"plan: engine {plan.engine}, rules {plan.rules}, {plan.parallel} slot(s) (saved to {path})")
    return path


def _start_serve(args, plan_file: str, console):
    exe = Path(sys.executable).parent / "hybridinfer"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "hybridinfer.cli"]),
           "serve", "--port", str(port), "--queue", "64", "--plan", plan_file]
    console.print(f"starting: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 600:
        if proc.poll() is not None:
            err = (proc.stderr.read() or "").strip().splitlines()
            raise HybridError(f"hybridinfer serve exited ({err[-1] if err else proc.returncode})",
                              "run `hybridinfer serve` by hand to see why, or pass --url")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url + "/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise HybridError("hybridinfer serve did not become ready in 600 s", "check it by hand, or pass --url")


def _engine_bench(plan_file: str, args, console) -> dict:
    from ..engines import get
    from ..options import load_plan

    plan = load_plan(plan_file)
    engine = get(plan.engine)
    cmd = engine.bench_command(plan, n_prompt=args.engine_bench_prompt, n_gen=args.max_tokens)
    if not cmd:
        raise HybridError(f"engine {engine.name} has no benchmark tool of its own", "drop --engine-bench")
    if not os.access(cmd[0], os.X_OK):
        raise HybridError(f"--engine-bench needs {cmd[0]}, which is not installed", f"{engine.install_hint}; or drop --engine-bench")
    console.print(f"engine bench: {' '.join(cmd)}")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise HybridError(f"{os.path.basename(cmd[0])} failed: {last}", "run the command above by hand to see why")
    results = engine.parse_bench(r.stdout)  # its own tool's output format
    for row in results:  # the metrics table's names: tg = decode, pp = prefill
        row[DECODE_TPS if row["test"].startswith("tg") else PREFILL_TPS] = row["tokens_per_s"]
    return {"command": cmd, "results": results}


def _int_list(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or any(v < 1 for v in vals):
        raise HybridError(f"{flag} '{text}' is not a list of positive integers", f"pass e.g. {flag} 1,2,4,8")
    return vals


def _rate(text: str) -> float:
    if text in ("inf", "Inf", "INF"):
        return float("inf")
    try:
        v = float(text)
    except ValueError:
        v = -1
    if not v > 0:
        raise HybridError(f"--request-rate '{text}' is not a positive number", "pass requests per second, e.g. 2.5, or inf")
    return v


def register(sub, add, plan_args) -> None:
    p = add("bench", cmd_bench)
    p.add_argument("--url", action="append", metavar="URL", help="OpenAI base URL, e.g. http://127.0.0.1:8000/v1 (repeat to compare; default: start hybridinfer serve)")
    p.add_argument("--gguf", metavar="PATH", help="without --url: the model hybridinfer serve loads (default: the demo model)")
    p.add_argument("--plan", metavar="PLAN.json", help="the saved plan (`hybridinfer plan --json`) that serve and --engine-bench run (default: plan for this box)")
    p.add_argument("--model", metavar="M", help="model id to request (default: the first of /v1/models)")
    p.add_argument("--concurrency", default="1", metavar="1,2,4,8", help="concurrency levels to sweep (default: 1)")
    p.add_argument("--request-rate", default="inf", metavar="R|inf", help="Poisson arrivals per second, at most --concurrency in flight (default: inf = closed loop)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--requests", type=int, default=16, metavar="N", help="requests per level (default: 16)")
    g.add_argument("--duration", type=float, metavar="S", help="run each level for S seconds instead")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="warm-up requests per URL, not counted (default: 1)")
    p.add_argument("--prompt-tokens", type=int, default=128, metavar="N", help="prompt length for the random dataset (default: 128)")
    p.add_argument("--max-tokens", type=int, default=128, metavar="N", help="output tokens per request (default: 128)")
    p.add_argument("--dataset", default="random", metavar="random|FILE.jsonl", help="prompts: random words sized with the server's tokenizer, or JSONL with \"prompt\" (default: random)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None, help="ask for exactly --max-tokens (default: on for random prompts)")
    p.add_argument("--seed", type=int, default=0, help="seed for prompts, arrivals and sampling (default: 0)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--chat", action="store_true", help="use /v1/chat/completions (default)")
    g.add_argument("--completions", action="store_true", help="use /v1/completions")
    p.add_argument("--api-key", metavar="K", help="Bearer key (env OPENAI_API_KEY)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="per-request timeout (default: 600)")
    p.add_argument("--json", metavar="OUT", help="write every figure and raw sample as JSON (schema: docs/benchmarking.md)")
    p.add_argument("--plot", metavar="OUT.png", help="plot throughput and latency percentiles vs concurrency")
    p.add_argument("--engine-bench", action="store_true", help="also run the engine's own benchmark tool (llama-bench) with the plan's placement (pp/tg)")
    p.add_argument("--engine-bench-prompt", type=int, default=512, metavar="N", help="engine benchmark prompt length (default: 512)")
