"""`hybridinfer worker`: lend this machine's device to a llama.cpp engine on another (or the same) box, by running
llama.cpp's own `rpc-server` on it. The serving box then plans and serves with `--rpc HOST:PORT,...`."""

from __future__ import annotations

import os
import sys

from .errors import HybridError
from .util import check_bind, is_loopback


def cmd_worker(args) -> int:
    """Serve this machine's device to llama.cpp over the network (llama.cpp's rpc-server).

    Loopback (127.0.0.1) by default. Binding any other address needs --allow-network: llama.cpp RPC has no
    authentication and no encryption, so the port must only be reachable from a trusted network. On the serving
    box: `hybridinfer serve --rpc HOST:PORT[,HOST:PORT...]` (plan over this box's devices plus the workers').
    """
    from .engines import rpc

    if not is_loopback(args.host) and not args.allow_network:
        raise HybridError(f"binding {args.host} lets any machine that reaches port {args.port} use this device "
                          "(RPC has no authentication)",
                          "pass --allow-network on a trusted network only, or bind 127.0.0.1")
    check_bind(args.host, args.port)
    cmd = rpc.worker_command(args.host, args.port, args.threads, cache=args.cache)
    where = f"{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    print(f"hybridinfer worker — {os.path.basename(cmd[0])} on {where}", flush=True)
    if not is_loopback(args.host):
        print(f"  WARNING: {rpc.NO_AUTH}", flush=True)
    print(f"  use it: hybridinfer serve --rpc {where}   (one engine at a time; Ctrl-C stops the worker)", flush=True)
    sys.stdout.flush()
    # On loopback the worker shares cores with the engine: its threads must not spin while the engine computes.
    env = rpc.passive_env() if is_loopback(args.host) else dict(os.environ)
    os.execve(cmd[0], cmd, env)  # the worker is rpc-server itself: signals and exit status are its own


def register(sub, add, plan_args) -> None:
    from .engines.rpc import DEFAULT_PORT

    p = add("worker", cmd_worker)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1; others need --allow-network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads when the device is this CPU (default: rpc-server's)")
    p.add_argument("--cache", action="store_true",
                   help="keep received weights in the worker's local file cache (rpc-server -c), so the next load skips the network")
    p.add_argument("--allow-network", action="store_true",
                   help="allow a non-loopback --host (RPC has no authentication: trusted networks only)")
