"""`hybridinfer serve`: plan for this box, run llama-server under supervision, expose the OpenAI API."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import sys
from pathlib import Path

from ..errors import HybridError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cmd_serve(args) -> int:
    """Serve a model with an OpenAI-compatible API (streaming, reasoning split, /health, /metrics).

    Plans for this box (like `plan`), starts llama-server with that plan on a private loopback port,
    and serves /v1/chat/completions, /v1/completions and /v1/models on --host:--port. Without --gguf it
    serves the built-in tiny demo model (random weights: it shows the whole path, its text is meaningless).
    Stop with Ctrl-C: the engine is stopped with it.
    """
    import uvicorn

    from ..cli import _model, _plan_options
    from ..engines.ktransformers import shell
    from ..engines.llamacpp import Supervisor
    from ..plan import make_plan
    from ..probe import load_profile, probe
    from .app import create_app
    from .serving import Settings

    _check_limits(args)
    api_key = args.api_key or os.environ.get("HYBRIDINFER_API_KEY")
    if not _is_loopback(args.host) and not api_key:
        raise HybridError(f"binding {args.host} exposes the server beyond this machine without authentication",
                          "pass --api-key KEY (or set HYBRIDINFER_API_KEY), or bind 127.0.0.1")
    _check_port(args.host, args.port)
    # --hardware plans as if on another box (its flags then run here: useful to check a plan's placement).
    hw = load_profile(args.hardware) if args.hardware else probe(engines=False)
    model = _model(args)
    opts = _plan_options(args)
    if opts.engine == "ktransformers":
        raise HybridError("serve runs llama.cpp; KTransformers is planned but not run by hybridinfer",
                          "use `hybridinfer plan --engine ktransformers` for its command, or drop --engine")
    in_process = opts.engine == "llama-cpp-python"
    if in_process:
        from ..engines import llamacpp_python
        if not llamacpp_python.available():
            raise HybridError("--engine llama-cpp-python needs the llama_cpp module, which is not installed",
                              "run ./install.sh --llama-cpp-python (builds it, ~10 min the first time), or drop --engine")
        if args.parallel != 1:
            raise HybridError("--engine llama-cpp-python serves one request at a time",
                              "drop --parallel, or use the default engine (llama-server) for concurrent slots")
    from dataclasses import replace
    plan = make_plan(hw, model, replace(opts, engine="llama.cpp"))
    demo = not args.gguf
    starts_in_think = model.opens_think
    alias = args.alias or ("hybridinfer-demo" if demo else Path(plan.model_path).name.removesuffix(".gguf"))
    alias = re.sub(r"-0000\d-of-0000\d$", "", alias)
    settings = Settings(model_id=alias, ctx_per_slot=plan.ctx // plan.parallel, parallel=plan.parallel, queue=args.queue,
                        starts_in_think=starts_in_think, reasoning_model=starts_in_think,
                        request_timeout=args.request_timeout,
                        cache_ram_mib=None if in_process or plan.cache_ram is None else plan.cache_ram // 2**20)

    _setup_logging(args.verbose)
    elog = logging.getLogger("hybridinfer.engine")

    def on_line(line: str):
        # llama.cpp log lines carry a level letter: show warnings/errors always, the rest with --verbose.
        if args.verbose or re.match(r"^\S+ [WE] ", line) or line.startswith(("error", "warning")):
            elog.info("[%s] %s", "llama-cpp-python" if in_process else "llama-server", line)

    extra = ["-v"] if args.engine_verbose else []
    extra += ["--alias", alias]
    if in_process:
        sup = llamacpp_python.InProcess(plan, log_file=args.engine_log, on_line=on_line)
    else:
        sup = Supervisor(plan, extra=extra, log_file=args.engine_log, on_line=on_line)
        sup.request_timeout = args.request_timeout
        sup.max_connections = settings.parallel + settings.queue + 8
    url = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    p = plan.prediction
    print(f"hybridinfer serve — {model.name or plan.model_path}", flush=True)
    if demo:
        print("  demo model: a tiny DeepSeek-R1-architecture MoE with RANDOM weights — its text is meaningless;\n"
              "  it exercises the real path (plan, expert placement, MLA cache, reasoning split). Use --gguf FILE for a real model.")
    devs = ", ".join(f"{d.device} {d.total / 2**30:.2f} GiB" for d in plan.devices)
    print(f"  plan: engine {'llama-cpp-python (in-process)' if in_process else plan.engine}, rules {plan.rules}, ctx {plan.ctx} over {plan.parallel} slot(s), "
          f"{plan.threads} threads; {devs}; predicted decode {p.decode_tps:g} tok/s")
    print(f"  engine: {shell(sup.command())}")
    print(f"  API:    {url}/v1   (model id '{alias}'; health {url}/health, metrics {url}/metrics)")
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    print(f"  try:    curl -s {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
          f"-d '{{\"model\":\"{alias}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}],\"max_tokens\":32}}'", flush=True)

    engine = _Progress(sup)
    app = create_app(settings, engine, api_key=api_key, cors_origins=args.cors_origin,
                     metrics_public=args.metrics_public, max_body=int(args.max_body_mb * 2**20))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5,
                            access_log=args.verbose)
    server = uvicorn.Server(config)
    engine.on_fatal = lambda: setattr(server, "should_exit", True)  # uvicorn's own clean shutdown
    server.run()
    if engine.fatal:
        raise HybridError(engine.fatal)
    return 0


class _Progress:
    """Wraps the supervisor to print loading progress and readiness once."""

    def __init__(self, sup):
        self.sup = sup
        self.fatal: str | None = None  # the engine could not start: serve stops with this error
        self.on_fatal = None

    def __getattr__(self, name):
        return getattr(self.sup, name)

    async def __aenter__(self):
        import asyncio

        await self.sup.start()

        async def report():
            t = 0.0
            while not await self.sup.wait_ready(timeout=1.0):
                t += 1
                if getattr(self.sup, "fatal", None):
                    self.fatal = self.sup.fatal
                    if self.on_fatal:
                        self.on_fatal()
                    return
                if self.sup.state == "loading" and t % 5 == 0:
                    print(f"  loading model… {t:.0f} s", flush=True)
            print(f"  ready: engine loaded in {self.sup.ready_at - self.sup.started_at:.1f} s", flush=True)

        self._report = asyncio.create_task(report())
        return self

    async def __aexit__(self, *exc):
        self._report.cancel()
        print("  stopping engine…", flush=True)
        await self.sup.stop()


def _check_limits(args) -> None:
    if not 1 <= args.port <= 65535:
        raise HybridError(f"--port {args.port} is not a TCP port", "use a port from 1 to 65535, e.g. --port 8000")
    if args.queue < 0:
        raise HybridError(f"--queue {args.queue} is negative", "use --queue 0 to refuse requests when every slot is busy, "
                                                                "or a positive number of waiting places")
    if not args.max_body_mb > 0:
        raise HybridError(f"--max-body-mb {args.max_body_mb:g} is not a positive size", "use e.g. --max-body-mb 4")
    if not args.request_timeout > 0:
        raise HybridError(f"--request-timeout {args.request_timeout:g} is not a positive time", "use e.g. --request-timeout 600")


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port(host: str, port: int) -> None:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise HybridError(f"cannot listen on {host}:{port} ({e.strerror})",
                              "choose another --port, or stop what is using it") from None


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def register(sub, add, plan_args) -> None:
    p = add("serve", cmd_serve)
    plan_args(p)
    for a in p._actions:  # serve can also run llama.cpp in-process
        if a.dest == "engine":
            a.choices = [*a.choices, "llama-cpp-python"]
            a.help = "engine (default: auto); llama-cpp-python runs llama.cpp in-process, one request at a time"
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1; others need --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1 (env HYBRIDINFER_API_KEY)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN", help="allow browser clients from ORIGIN (repeatable, '*' for any)")
    p.add_argument("--queue", type=int, default=16, metavar="N", help="requests that may wait for a slot before 429 (default: 16)")
    p.add_argument("--max-body-mb", type=float, default=4.0, metavar="MB", help="largest request body accepted, 413 beyond (default: 4)")
    p.add_argument("--metrics-public", action="store_true", help="with --api-key: serve /metrics without the key (default: it needs the key)")
    p.add_argument("--alias", metavar="NAME", help="model id to serve under (default: the file name)")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="S", help="engine request timeout (default: 600)")
    p.add_argument("--engine-log", metavar="FILE", help="also write the engine's full log to FILE")
    p.add_argument("--engine-verbose", action="store_true", help="run the engine with -v (per-tensor placement in its log)")
    p.add_argument("--verbose", action="store_true", help="show every engine log line and access log")
