"""What this box does with the GB-scale mid model vs what the planner predicts for it, both variants.

    .venv/bin/python benchmarks/measured_vs_predicted.py [--variant iq1_s,q4_k_m] [--requests 4] [--max-tokens 64]

Per variant: writes the model if the cache lacks it (`hybridinfer demo --size mid`); plans it for this box with the
bandwidth `probe --measure-bandwidth` measures; runs llama-bench pp512/tg128 with the plan's threads and
placement; serves it through `hybridinfer serve` and streams requests alternately through serve and straight to
the llama-server serve started (its Unix socket, its argv), so box drift cancels (decode tok/s = 1 / median time per
output token, TTFT), then measures serve with `hybridinfer bench`; reads the engine's RSS once loaded (compared with the plan's CPU
memory without the prompt cache, which fills with use up to its cap) and after the requests. Prints and writes
benchmarks/results/measured_vs_predicted.json: predicted / measured
for decode, prefill and CPU memory (targets 0.8-1.25 and +-5 %), served / raw, and decode's fraction of the
bandwidth roofline (bytes read per token x tok/s / measured bandwidth).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx
import psutil

from hybridinfer.demo.mid import ensure_mid, mid_path
from hybridinfer.engines.llamacpp import ENGINE as LLAMA_CPP
from hybridinfer.engines.llamacpp import parse_bench
from hybridinfer.inspect_gguf import inspect
from hybridinfer.plan import PlanOptions, make_plan
from hybridinfer.predict import CONTEXT_FOR_DECODE
from hybridinfer.engines.binaries import find_llama_binary
from hybridinfer.probe import probe

EXE = str(Path(sys.executable).parent / "hybridinfer")
RESULTS = Path(__file__).parent / "results"


QUIET_WAIT = 0.0  # --quiet-wait


def idle_fraction(seconds: float = 2.0) -> float:
    """Share of all CPUs idle over a short window (/proc/stat), i.e. how much of the box other work leaves."""
    def snap():
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return v[3] + v[4], sum(v)
    i0, t0 = snap()
    time.sleep(seconds)
    i1, t1 = snap()
    return (i1 - i0) / max(1, t1 - t0)


def wait_quiet() -> float:
    """Wait (up to --quiet-wait seconds) until other work leaves >= 80 % of the CPUs idle; -> the idle share."""
    deadline = time.time() + QUIET_WAIT
    while True:
        idle = idle_fraction()
        if idle >= 0.8 or time.time() >= deadline:
            return round(idle, 2)
        time.sleep(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(url: str, proc: subprocess.Popen, timeout: float = 600) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.time() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} did not become ready in {timeout:.0f} s")


def llama_bench(plan, reps: int, pp: int = 512, tg: int = 128) -> dict:
    cmd = LLAMA_CPP.bench_command(plan, n_prompt=pp, n_gen=tg, repetitions=reps)
    print("  llama-bench:", " ".join(cmd), flush=True)
    idle0 = wait_quiet()
    ru0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    ru1, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"llama-bench failed: {r.stderr[-800:]}")
    rows = {x["test"]: x for x in parse_bench(r.stdout)}
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    # The CPU the run actually got: near 1.0 on a quiet box; other processes on the cores push it down.
    share = cpu / (wall * plan.threads)
    return {"command": cmd, "pp": rows[f"pp{pp}"]["tokens_per_s"], "tg": rows[f"tg{tg}"]["tokens_per_s"],
            "pp_stddev": rows[f"pp{pp}"]["stddev"], "tg_stddev": rows[f"tg{tg}"]["stddev"], "tests": [f"pp{pp}", f"tg{tg}"],
            "cpu_share": round(share, 3), "idle_before": idle0, "wall_s": round(wall, 1)}


def _cpu_run(cmd: list[str]) -> tuple[float, float]:
    """-> (CPU seconds the run used, its tokens/s)."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, capture_output=True, text=True)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode:
        raise SystemExit(f"llama-bench failed: {r.stderr[-800:]}")
    return (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime), parse_bench(r.stdout)[0]["tokens_per_s"]


def single_thread_rates(plan1) -> dict:
    """One thread's decode and prefill rates from CPU time, which other work on the box does not inflate:
    two runs differing only in token count; the difference in CPU seconds is what those extra tokens cost
    (model load and warm-up cancel out). A single thread has no barrier to wait at, so CPU time = its time."""
    b = lambda p, n: LLAMA_CPP.bench_command(plan1, n_prompt=p, n_gen=n, repetitions=1)  # noqa: E731
    _cpu_run(b(0, 1))  # once first, so both measured runs find the file equally cached
    (c0, _), (c1, _) = _cpu_run(b(0, 8)), _cpu_run(b(0, 40))
    (d0, _), (d1, _) = _cpu_run(b(32, 0)), _cpu_run(b(160, 0))
    return {"decode_tps": 32 / (c1 - c0), "prefill_tps": 128 / (d1 - d0),
            "method": "1 thread; CPU seconds of tg40 - tg8 and pp160 - pp32 runs"}


def _bench(url: str, requests: int, max_tokens: int, prompt_tokens: int) -> dict:
    """`hybridinfer bench` on one server (fixed seed: both servers get the same prompts) -> its level summary."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "bench.json"
        r = subprocess.run([EXE, "bench", "--url", url + "/v1", "--model", "m", "--requests", str(requests),
                            "--max-tokens", str(max_tokens), "--prompt-tokens", str(prompt_tokens), "--json", str(out)],
                           capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"hybridinfer bench failed: {r.stderr[-800:]}")
        v = json.loads(out.read_text())["runs"][0]["levels"][0]
    return {"decode_tps": 1000 / v["median_tpot_ms"], "ttft_ms": v["median_ttft_ms"], "completed": v["completed"],
            "output_throughput": v["output_throughput"]}


def _stop(p: subprocess.Popen | None) -> None:
    if p and p.poll() is None:
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def engine_rss(cmd: list[str]) -> int:
    """RSS of the engine started with cmd, after load and one short request."""
    cmd, port = list(cmd), free_port()
    cmd[cmd.index("--host") + 1] = "127.0.0.1"  # serve's argv binds a Unix socket; this copy a TCP port of its own
    if "--port" in cmd:
        cmd[cmd.index("--port") + 1] = str(port)
    else:
        cmd += ["--port", str(port)]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_health(url, p)
        httpx.post(url + "/completion", json={"prompt": "hello", "n_predict": 2}, timeout=600)
        return psutil.Process(p.pid).memory_info().rss
    finally:
        _stop(p)


WORDS = ("the of and to in is that for it as with was on be by at this are from or an have not which but one all "
         "were when there can more if no out so said what up its about than into them only other time some could new "
         "these two may then first any like now my such make over our even most after also did many before must "
         "through back years where much your way well down should because each just those people how too little").split()


def _prompts(n: int, tokens: int, seed: int) -> list[str]:
    """Distinct prompts of `tokens` random words each, so no request reuses another's cached prefix."""
    import random
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(tokens)) for _ in range(n)]


def _stream(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> dict:
    """One streamed chat request -> TTFT and time per output token as the client sees them."""
    # Sampling as serve sets it for a reasoning model (R1's advice), so both ways run the same sampler chain.
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True, "temperature": 0.6, "top_p": 0.95, "min_p": 0.05, "seed": 1}
    t0, stamps = time.perf_counter(), []
    with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for ch in json.loads(line[6:]).get("choices") or []:
                d = ch.get("delta") or {}
                if d.get("content") or d.get("reasoning_content"):
                    stamps.append(time.perf_counter())
    if len(stamps) < 2:
        raise SystemExit(f"{url}: fewer than two streamed tokens")
    return {"ttft_ms": (stamps[0] - t0) * 1000, "tpot_ms": (stamps[-1] - stamps[0]) * 1000 / (len(stamps) - 1)}


def served_vs_raw(path: str, requests: int, max_tokens: int, prompt_tokens: int) -> dict:
    """The same engine process reached two ways, request by request: through `hybridinfer serve`, and directly on
    the Unix socket serve started it on (its argv, untouched). Alternating served/raw/raw/served... cancels the
    drift of a shared box that two sequential runs (or two engine loads) cannot: over ~15 minutes this VM's decode
    drifted by +-6 % between identical runs. -> medians of TTFT and decode (1 / time per output token) for each;
    `assess` turns the per-request pairs into the ratio."""
    hp = free_port()
    hi = subprocess.Popen([EXE, "serve", "--gguf", path, "--engine", LLAMA_CPP.name, "--port", str(hp), "--alias", "m"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = ""
        while "engine:" not in banner:
            banner = hi.stdout.readline()
            if not banner and hi.poll() is not None:
                raise SystemExit("hybridinfer serve exited before printing its engine command")
        cmd = banner.split("engine:", 1)[1].split()
        sock = cmd[cmd.index("--host") + 1]
        hurl = f"http://127.0.0.1:{hp}"
        load = wait_health(hurl, hi)
        engine = next(c for c in psutil.Process(hi.pid).children(recursive=True) if "--host" in c.cmdline())
        rss_loaded = engine.memory_info().rss
        served_c = httpx.Client()
        raw_url = "http://engine"

        def raw_call(prompt):  # a fresh connection per request, as the proxy opens
            with httpx.Client(transport=httpx.HTTPTransport(uds=sock)) as c:
                return _stream(c, raw_url, prompt, max_tokens)
        prompts = _prompts(2 * requests + 2, prompt_tokens, seed=7)
        _stream(served_c, hurl, prompts[-1], 8), raw_call(prompts[-2])  # warm-up, not counted
        wait_quiet()
        served, raw = [], []
        proxy = psutil.Process(hi.pid)
        cpu0 = sum(proxy.cpu_times()[:2])
        for i in range(requests):
            pair = [("served", lambda p: _stream(served_c, hurl, p, max_tokens)), ("raw", raw_call)]
            for kind, call in (pair if i % 2 == 0 else pair[::-1]):
                (served if kind == "served" else raw).append(call(prompts[2 * i + (kind == "raw")]))
        proxy_cpu_s = sum(proxy.cpu_times()[:2]) - cpu0  # what relaying cost the cores the engine computes on
        rss_after = engine.memory_info().rss
        bench = _bench(hurl, requests, max_tokens, prompt_tokens)  # what `hybridinfer bench` reports for serve
    finally:
        _stop(hi)

    def summary(rows):
        tpot = statistics.median(r["tpot_ms"] for r in rows)
        return {"decode_tps": 1000 / tpot, "ttft_ms": statistics.median(r["ttft_ms"] for r in rows), "completed": len(rows)}
    s, r = summary(served), summary(raw)
    print(f"    served {s['decode_tps']:.2f} tok/s (TTFT {s['ttft_ms']:.0f} ms), raw {r['decode_tps']:.2f} "
          f"({r['ttft_ms']:.0f} ms), {requests} requests each, interleaved; serve used "
          f"{proxy_cpu_s * 1000 / (requests * max_tokens):.2f} ms CPU per token", flush=True)
    return {"engine_command": cmd, "method": "one engine, requests alternating through serve and on its socket",
            "served": s, "raw": r, "hybridinfer_bench": bench, "served_requests": served, "raw_requests": raw,
            "served_over_raw_decode": s["decode_tps"] / r["decode_tps"], "added_ttft_ms": s["ttft_ms"] - r["ttft_ms"],
            "proxy_cpu_ms_per_token": round(proxy_cpu_s * 1000 / (requests * max_tokens), 3),
            "load_s": round(load, 1), "engine_rss_loaded": rss_loaded, "engine_rss_after_bench": rss_after}


def run_variant(variant: str, hw, args) -> dict:
    """Measure one variant; -> its measurements (predictions are added by `assess`)."""
    t0 = time.perf_counter()
    path = ensure_mid(variant)
    print(f"{variant}: {path} ({time.perf_counter() - t0:.1f} s to ensure)", flush=True)
    model = inspect(path)
    plan = make_plan(hw, model, PlanOptions(engine=LLAMA_CPP.name))
    bench = llama_bench(plan, args.reps, args.pp, args.tg)
    print(f"  llama-bench pp{args.pp} {bench['pp']:.1f} tok/s, tg{args.tg} {bench['tg']:.2f} tok/s "
          f"(CPU share {bench['cpu_share']:.2f})", flush=True)
    st = single_thread_rates(make_plan(hw, model, PlanOptions(engine=LLAMA_CPP.name, threads=1)))
    print(f"  one thread, from CPU time: decode {st['decode_tps']:.2f} tok/s, prefill {st['prefill_tps']:.1f} tok/s",
          flush=True)
    served = served_vs_raw(path, args.requests, args.max_tokens, args.prompt_tokens)
    print(f"  served {served['served']['decode_tps']:.2f} tok/s vs raw {served['raw']['decode_tps']:.2f} "
          f"(x{served['served_over_raw_decode']:.3f}), TTFT {served['served']['ttft_ms']:.0f} vs {served['raw']['ttft_ms']:.0f} ms",
          flush=True)
    return {"variant": variant, "path": path, "model_bytes": model.bytes, "llama_bench": bench, "serve": served,
            "single_thread": st}


def assess(r: dict, hw) -> dict:
    """Add the plan's predictions for this box and the predicted / measured ratios to one variant's measurements
    (also re-run by --recompute, so the prediction model can be revised without measuring again)."""
    model = inspect(r.get("path") or str(mid_path(r["variant"])))
    plan = make_plan(hw, model, PlanOptions(engine=LLAMA_CPP.name))
    plan1 = make_plan(hw, model, PlanOptions(engine=LLAMA_CPP.name, threads=1))
    pr, pr1 = plan.prediction, plan1.prediction
    cpu = next(d for d in plan.devices if d.device == "cpu")
    bench, served, st = r["llama_bench"], r["serve"], r["single_thread"]
    if served.get("served_requests"):
        # Paired: each served request against the raw one next to it, so slow drift cancels; geometric mean and a
        # 95 % interval of the per-pair decode ratios.
        logs = [math.log(rw["tpot_ms"] / sv["tpot_ms"]) for sv, rw in zip(served["served_requests"], served["raw_requests"])]
        mu = statistics.mean(logs)
        half = 2.0 * statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else 0.0
        served["served_over_raw_decode"] = math.exp(mu)
        served["served_over_raw_decode_ci95"] = [round(math.exp(mu - half), 3), round(math.exp(mu + half), 3)]
    # Bytes read per decoded token: the plan's weights touched per token plus the KV cache at the quoted context.
    bytes_per_token = pr.cpu_bytes_per_token + pr.gpu_bytes_per_token + model.kv.bytes_per_token[plan.kv_type] * CONTEXT_FOR_DECODE
    r["plan"] = {"threads": plan.threads, "ctx": plan.ctx, "kv_type": plan.kv_type, "rules": plan.rules,
                 "predicted_decode_tps": pr.decode_tps, "predicted_prefill_tps": pr.prefill_tps,
                 "predicted_cpu_bytes": cpu.total - (plan.devices[0].prompt_cache), "predicted_prompt_cache_bytes": plan.devices[0].prompt_cache,
                 "bound": pr.bound, "breakdown_ms": pr.breakdown_ms,
                 "predicted_decode_tps_1_thread": pr1.decode_tps, "predicted_prefill_tps_1_thread": pr1.prefill_tps}
    r["bytes_per_token"] = bytes_per_token
    r["ratios"] = {
        "decode_predicted_over_measured": pr.decode_tps / bench["tg"],
        "prefill_predicted_over_measured": pr.prefill_tps / bench["pp"],
        # RSS once loaded: the prompt cache then grows with distinct prompts up to its planned cap (not counted)
        "memory_predicted_over_measured": (cpu.total - (plan.devices[0].prompt_cache)) / served["engine_rss_loaded"],
        "served_over_raw_decode": served["served_over_raw_decode"],
        "decode_fraction_of_roofline": bytes_per_token * bench["tg"] / (hw.memory_bandwidth_gbs * 1e9),
        "decode_1_thread_predicted_over_measured": pr1.decode_tps / st["decode_tps"],
        "decode_1_thread_fraction_of_roofline": bytes_per_token * st["decode_tps"] / (hw.memory_bandwidth_gbs * 1e9),
        "prefill_1_thread_predicted_over_measured": pr1.prefill_tps / st["prefill_tps"]}
    return r


def ci(serve: dict) -> str:
    lo_hi = serve.get("served_over_raw_decode_ci95")
    return f" ({lo_hi[0]:.2f}-{lo_hi[1]:.2f})" if lo_hi else ""


def table(out: dict) -> str:
    lines = ["| variant | decode pred / meas | prefill pred / meas | CPU memory pred / RSS | served / raw | roofline "
             "| CPU share | 1 thread decode pred / meas | 1 thread prefill pred / meas |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in out["variants"]:
        p, b, s, q, st = r["plan"], r["llama_bench"], r["serve"], r["ratios"], r["single_thread"]
        lines.append(
            f"| {r['variant']} | {p['predicted_decode_tps']:.2f} / {b['tg']:.2f} = {q['decode_predicted_over_measured']:.2f} "
            f"| {p['predicted_prefill_tps']:.1f} / {b['pp']:.1f} = {q['prefill_predicted_over_measured']:.2f} "
            f"| {p['predicted_cpu_bytes'] / 2**30:.2f} / {s['engine_rss_loaded'] / 2**30:.2f} GiB = "
            f"{q['memory_predicted_over_measured']:.3f} | {q['served_over_raw_decode']:.3f}{ci(s)} "
            f"| {q['decode_fraction_of_roofline']:.0%} | {b['cpu_share']:.2f} "
            f"| {p['predicted_decode_tps_1_thread']:.2f} / {st['decode_tps']:.2f} = {q['decode_1_thread_predicted_over_measured']:.2f} "
            f"| {p['predicted_prefill_tps_1_thread']:.1f} / {st['prefill_tps']:.1f} = {q['prefill_1_thread_predicted_over_measured']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="iq1_s,q4_k_m")
    ap.add_argument("--requests", type=int, default=8, help="streamed requests each way, interleaved (default: 8)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128, help="served requests' prompt length (default: 128)")
    ap.add_argument("--reps", type=int, default=2, help="llama-bench repetitions (default: 2)")
    ap.add_argument("--pp", type=int, default=512, help="llama-bench prompt length (default: 512)")
    ap.add_argument("--tg", type=int, default=128, help="llama-bench generated tokens (default: 128)")
    ap.add_argument("--nice", type=int, default=0,
                    help="niceness for every process started (e.g. -10 on a shared box, as root; default: 0)")
    ap.add_argument("--quiet-wait", type=float, default=0, metavar="S",
                    help="wait up to S seconds before each measurement for the CPUs to be >= 80%% idle (default: 0)")
    ap.add_argument("--bandwidth", type=float, metavar="GBS", help="use this bandwidth instead of measuring it now")
    ap.add_argument("--recompute", action="store_true",
                    help="measure nothing: recompute predictions and ratios for the measurements in the results file")
    ap.add_argument("--remeasure-single-thread", action="store_true",
                    help="measure only the one-thread CPU-time rates again, into the results file")
    ap.add_argument("--remeasure-served", action="store_true",
                    help="measure only served vs raw again (and the engine's RSS with it), into the results file")
    ap.add_argument("--remeasure-memory", action="store_true",
                    help="measure only the engine's RSS again (the stored command, one engine at a time)")
    args = ap.parse_args()
    global QUIET_WAIT
    QUIET_WAIT = args.quiet_wait
    path = RESULTS / "measured_vs_predicted.json"
    if args.recompute or args.remeasure_single_thread or args.remeasure_memory or args.remeasure_served:
        out = json.loads(path.read_text())
        now = probe(engines=False)  # the box as it was measured: its bandwidth figure and free RAM
        hw = replace(now, memory_bandwidth_gbs=out["bandwidth_gbs"], bandwidth_method=out["bandwidth_method"],
                     ram_available=out.get("ram_available", int(now.ram_total * 0.9)))
        for r in out["variants"]:
            if args.remeasure_single_thread:
                model = inspect(r.get("path") or str(mid_path(r["variant"])))
                r["single_thread"] = single_thread_rates(make_plan(hw, model, PlanOptions(engine=LLAMA_CPP.name, threads=1)))
                print(f"{r['variant']}: one thread, from CPU time: decode {r['single_thread']['decode_tps']:.2f} tok/s, "
                      f"prefill {r['single_thread']['prefill_tps']:.1f} tok/s", flush=True)
            if args.remeasure_served:
                rss = r["serve"]["engine_rss_after_bench"]
                print(f"{r['variant']}: served vs raw", flush=True)
                r["serve"] = served_vs_raw(r["path"], args.requests, args.max_tokens, args.prompt_tokens)
                r["serve"]["engine_rss_after_bench"] = r["serve"]["engine_rss_after_bench"] or rss
            if args.remeasure_memory:
                r["serve"]["engine_rss_after_bench"] = engine_rss(r["serve"]["engine_command"])
                print(f"{r['variant']}: engine RSS {r['serve']['engine_rss_after_bench'] / 2**30:.2f} GiB", flush=True)
        out["variants"] = [assess(r, hw) for r in out["variants"]]
    else:
        if not find_llama_binary("llama-bench") or not find_llama_binary("llama-server"):
            raise SystemExit("needs llama-bench and llama-server (./install.sh)")
        if args.nice:
            os.nice(args.nice)  # inherited by every process started below, the served and the raw engine alike
        hw = probe(measure=True, engines=False)
        if args.bandwidth:  # a figure measured when the box was quiet (probe --measure-bandwidth), if this run's is not
            hw = replace(hw, memory_bandwidth_gbs=args.bandwidth, bandwidth_method=f"given: {args.bandwidth} GB/s "
                         f"(this run measured {hw.memory_bandwidth_gbs} GB/s)")
        print(f"bandwidth: {hw.memory_bandwidth_gbs} GB/s ({hw.bandwidth_method})", flush=True)
        out = {"machine": platform.node(), "cpu": hw.cpu.model, "physical_cores": hw.cpu.physical_cores,
               "ram_available": hw.ram_available,
               "bandwidth_gbs": hw.memory_bandwidth_gbs, "bandwidth_method": hw.bandwidth_method, "nice": args.nice,
               "targets": {"decode": [0.8, 1.25], "prefill": [0.8, 1.25], "memory": [0.95, 1.05], "served_over_raw": 0.99},
               "variants": []}
        for v in args.variant.split(","):
            out["variants"].append(assess(run_variant(v.strip(), hw, args), hw))
            RESULTS.mkdir(exist_ok=True)  # after each variant, so a long run leaves what it has measured
            path.write_text(json.dumps(out, indent=2) + "\n")
    print()
    print(table(out))
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
