"""`hybridinfer serve`: plan for this box (or take a saved plan), run the plan's engine, expose the OpenAI API."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

from ..errors import HybridError
from ..util import check_bind, is_loopback



def cmd_serve(args) -> int:
    """Serve a model with an OpenAI-compatible API (streaming, reasoning split, /health, /metrics).

    Plans for this box (like `plan`) — or runs a saved plan exactly (`--plan PLAN.json`, from `plan --json`) —
    starts the plan's engine under supervision on a private loopback address, and serves /v1/chat/completions,
    /v1/completions and /v1/models on --host:--port. Without --gguf it serves the built-in tiny demo model
    (random weights: it shows the whole path, its text is meaningless). Stop with Ctrl-C: the engine stops with it.
    """
    from ..engines.base import RunSettings

    api_key = _check_serve_args(args)
    plan, model, engine = _plan_to_serve(args)
    if args.request_timeout is None:
        args.request_timeout = default_request_timeout(plan)
    if plan.prompt_cache_dir:
        try:
            os.makedirs(plan.prompt_cache_dir, exist_ok=True)
        except OSError as e:
            raise HybridError(f"the prompt cache directory {plan.prompt_cache_dir} cannot be made: {e.strerror}",
                              "give --prompt-cache-dir a directory you can write, or drop it") from None
    demo = not args.gguf and not args.plan
    settings = _settings(args, plan, model, engine, demo)
    alias = settings.model_id
    _setup_logging(args.verbose)
    label = engine.name if engine.kind == "in-process" else os.path.basename(plan.command[0])
    running = engine.runner(plan, RunSettings(
        model_id=alias, request_timeout=args.request_timeout, max_connections=settings.parallel + settings.queue + 8,
        log_file=args.engine_log, on_line=_engine_log(label, args.verbose), verbose=args.engine_verbose))
    _banner(args, plan, model, engine, running, alias, api_key, demo)
    _run_server(args, settings, running, api_key)
    return 0


def default_request_timeout(plan) -> float:
    """No timeout of ours cuts a request the plan expects to finish: a full slot's prompt at the predicted prefill
    speed plus a full slot of generated tokens at the predicted decode speed, times 3 (predictions are off by up
    to ~2x on a loaded box), and never under 600 s."""
    ctx = plan.ctx // max(1, plan.parallel)
    p = plan.prediction
    t = ctx / max(p.prefill_tps, 1e-3) + ctx / max(p.decode_tps, 1e-3)
    return float(max(600, round(3 * t)))


def _check_serve_args(args) -> str | None:
    """Refuses what cannot be served as asked (limits, an open bind without a key, a busy port, a named engine that
    is not installed); returns the API key, if any."""
    from ..engines import get

    _check_limits(args)
    api_key = args.api_key or os.environ.get("HYBRIDINFER_API_KEY")
    if not is_loopback(args.host) and not api_key:
        raise HybridError(f"binding {args.host} exposes the server beyond this machine without authentication",
                          "pass --api-key KEY (or set HYBRIDINFER_API_KEY), or bind 127.0.0.1")
    check_bind(args.host, args.port)
    if args.engine != "auto":  # asked for by name: it must be here (auto plans only what is)
        info = get(args.engine).probe()
        if info is not None and not info.installed:
            raise get(args.engine).not_installed_error()
    return api_key


def _plan_to_serve(args):
    """(plan, model, engine): the model downloaded when named on a hub, planned (or the saved plan), and an engine
    hybridinfer runs itself."""
    from ..engines import get
    from ..options import plan_from_args

    # --hardware plans as if on another box (its flags then run here: useful to check a plan's placement).
    if args.gguf:
        from ..download import ensure_gguf
        args.gguf = ensure_gguf(args.gguf, source=args.source)  # owner/name:QUANT: downloaded when missing
    plan, model = plan_from_args(args, serving=True)
    engine = get(plan.engine)
    if not engine.serves:
        raise HybridError(f"hybridinfer does not run {engine.name} itself yet",
                          f"`hybridinfer plan --engine {engine.name}` prints its command; or plan another engine")
    return plan, model, engine


def _settings(args, plan, model, engine, demo: bool):
    """What the API layer needs: the model id served (--alias, else the file name without a split suffix), slots,
    queue, whether answers open inside a thought, timeouts."""
    from .reasoning import reasoning_format
    from .serving import Settings

    alias = args.alias or ("hybridinfer-demo" if demo else Path(plan.model_path).name.removesuffix(".gguf"))
    alias = re.sub(r"-0000\d-of-0000\d$", "", alias)
    think = model.opens_think or engine.starts_in_think(plan)
    return Settings(model_id=alias, ctx_per_slot=plan.ctx // plan.parallel, parallel=plan.parallel, queue=args.queue,
                    starts_in_think=think, reasoning_model=think, reasoning=reasoning_format(model),
                    request_timeout=args.request_timeout,
                    keepalive_s=args.keepalive, prefill_tps=plan.prediction.prefill_tps or None,
                    cache_ram_mib=None if engine.prompt_cache_max is None else plan.devices[0].prompt_cache // 2**20,
                    prompt_cache_dir=plan.prompt_cache_dir, prompt_cache_bytes=plan.prompt_cache_bytes,
                    kv_bytes_per_token=engine.kv_bytes_per_token(model, plan.kv_type),
                    chat_template=model.has_chat_template,
                    chat_note="" if model.has_chat_template else base_model_note(engine))


def base_model_note(engine) -> str:
    """What a chat request does when the GGUF has no chat template (a base model), for the banner and /v1/models."""
    if engine.kind == "in-process":
        return "no chat template in this GGUF (a base model): chat requests are refused (400); use /v1/completions"
    return ("no chat template in this GGUF (a base model): chat requests run on the engine's fallback template "
            "(usually ChatML), which the model was not trained on; use /v1/completions")


def _run_server(args, settings, running, api_key: str | None) -> None:
    """Serves until Ctrl-C; a load failure no restart can fix stops the server and is raised (exit 2)."""
    import uvicorn

    from .app import create_app

    failed: list[str] = []

    def on_fatal(message: str) -> None:
        failed.append(message)
        # uvicorn's own clean shutdown. Not SIGTERM: uvicorn re-raises it after shutting down, and the exit status
        # would be -15 instead of the error's 2.
        server.should_exit = True

    app = create_app(settings, running, api_key=api_key, cors_origins=args.cors_origin,
                     metrics_public=args.metrics_public, max_body=int(args.max_body_mb * 2**20),
                     say=lambda m: print(m, flush=True), on_fatal=on_fatal)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5,
                            access_log=args.verbose)
    server = _DrainingServer(config, app, args.shutdown_grace)
    server.run()
    if failed:
        raise HybridError(failed[0])  # one line, exit 2


class _DrainingServer:
    """uvicorn's Server, whose first SIGTERM / Ctrl-C drains before uvicorn shuts down: new requests get 503 with
    Retry-After, queued ones 503 (or, on a stream already answered, an error event + [DONE]), running ones finish
    within `grace` seconds or end the same way — so uvicorn finds no request to cancel. A second signal exits now."""

    def __new__(cls, config, app, grace: float):
        import asyncio
        import uvicorn

        class Server(uvicorn.Server):
            draining: asyncio.Task | None = None

            def handle_exit(self, sig, frame) -> None:
                serving = getattr(app.state, "serving", None)
                if self.draining is not None or serving is None or self.should_exit:
                    self.force_exit = self.draining is not None  # the second signal: no more waiting
                    return super().handle_exit(sig, frame)
                loop = asyncio.get_event_loop()

                async def drain() -> None:
                    print(f"  shutting down: refusing new requests, finishing {serving.admitted} "
                          f"(up to {grace:g} s)…", flush=True)
                    try:
                        await serving.drain(grace)
                    finally:
                        self.should_exit = True

                self.draining = loop.create_task(drain())

        return Server(config)


def _engine_log(label: str, verbose: bool):
    elog = logging.getLogger("hybridinfer.engine")

    def on_line(line: str):
        # llama.cpp-family log lines carry a level letter: show warnings/errors always, the rest with --verbose.
        if verbose or re.match(r"^\S+ [WE] ", line) or line.startswith(("error", "warning")):
            elog.info("[%s] %s", label, line)
    return on_line


def _banner(args, plan, model, engine, running, alias, api_key, demo) -> None:
    from ..util import shell

    url = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    p = plan.prediction
    print(f"hybridinfer serve — {model.name or plan.model_path}", flush=True)
    if demo:
        print("  demo model: a tiny DeepSeek-R1-architecture MoE with RANDOM weights — its text is meaningless;\n"
              "  it exercises the real path (plan, expert placement, MLA cache, reasoning split). Use --gguf FILE for a real model.")
    devs = ", ".join(f"{d.device} {d.total / 2**30:.2f} GiB" for d in plan.devices)
    kind = " (in-process)" if engine.kind == "in-process" else ""
    print(f"  plan: engine {plan.engine}{kind}, rules {plan.rules}, ctx {plan.ctx} over {plan.parallel} slot(s), "
          f"{plan.threads} threads; {devs}; predicted decode {p.decode_tps:g} tok/s ({p.source})"
          + (f" (saved plan {args.plan})" if args.plan else ""))
    print(f"  engine: {shell(running.command())}")
    for note in running.notes:
        print(f"  note:   {note}")
    if not model.has_chat_template:
        print(f"  note:   {base_model_note(engine)}")
    if plan.prompt_cache_dir:
        print(f"  cache:  conversations' KV states saved in {plan.prompt_cache_dir} (at most "
              f"{plan.prompt_cache_bytes / 2**30:.2f} GiB) and restored when they return")
    print(f"  API:    {url}/v1   (model id '{alias}'; health {url}/health, metrics {url}/metrics)")
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    if model.has_chat_template:
        print(f"  try:    curl -s {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
              f"-d '{{\"model\":\"{alias}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}],\"max_tokens\":32}}'", flush=True)
    else:
        print(f"  try:    curl -s {url}/v1/completions -H 'Content-Type: application/json'{auth} "
              f"-d '{{\"model\":\"{alias}\",\"prompt\":\"Once upon a time\",\"max_tokens\":32}}'", flush=True)


def _check_limits(args) -> None:
    if not 1 <= args.port <= 65535:
        raise HybridError(f"--port {args.port} is not a TCP port", "use a port from 1 to 65535, e.g. --port 8000")
    if args.queue < 0:
        raise HybridError(f"--queue {args.queue} is negative", "use --queue 0 to refuse requests when every slot is busy, "
                                                                "or a positive number of waiting places")
    if not args.max_body_mb > 0:
        raise HybridError(f"--max-body-mb {args.max_body_mb:g} is not a positive size", "use e.g. --max-body-mb 4")
    if not args.keepalive > 0 or not args.shutdown_grace >= 0:
        raise HybridError("--keepalive must be positive and --shutdown-grace not negative", "e.g. --keepalive 2 --shutdown-grace 8")
    if args.request_timeout is not None and not args.request_timeout > 0:
        raise HybridError(f"--request-timeout {args.request_timeout:g} is not a positive time", "use e.g. --request-timeout 600")




def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def register(sub, add, plan_args) -> None:
    p = add("serve", cmd_serve)
    plan_args(p, saved_plan=True)
    p.add_argument("--source", default="modelscope", choices=["modelscope", "huggingface"],
                   help="hub for --gguf owner/name:QUANT (default: modelscope)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1; others need --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1 (env HYBRIDINFER_API_KEY)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN", help="allow browser clients from ORIGIN (repeatable, '*' for any)")
    p.add_argument("--queue", type=int, default=16, metavar="N", help="requests that may wait for a slot before 429 (default: 16)")
    p.add_argument("--max-body-mb", type=float, default=4.0, metavar="MB", help="largest request body accepted, 413 beyond (default: 4)")
    p.add_argument("--metrics-public", action="store_true", help="with --api-key: serve /metrics without the key (default: it needs the key)")
    p.add_argument("--alias", metavar="NAME", help="model id to serve under (default: the file name)")
    p.add_argument("--request-timeout", type=float, default=None, metavar="S",
                   help="longest wait for the engine: a whole non-streamed answer, or the silence between two engine "
                        "events of a stream (default: from the plan — a full slot's prompt at the predicted prefill "
                        "speed plus a full slot of tokens at the predicted decode speed, x3, at least 600)")
    p.add_argument("--keepalive", type=float, default=2.0, metavar="S",
                   help="a streamed answer's longest silence: an SSE comment (keepalive or prefill progress) after it "
                        "(default: 2)")
    p.add_argument("--shutdown-grace", type=float, default=8.0, metavar="S",
                   help="on SIGTERM / Ctrl-C: how long running requests may finish before they are ended (default: 8)")
    p.add_argument("--engine-log", metavar="FILE", help="also write the engine's full log to FILE")
    p.add_argument("--engine-verbose", action="store_true", help="run the engine verbosely (per-tensor placement in its log)")
    p.add_argument("--verbose", action="store_true", help="show every engine log line and access log")
