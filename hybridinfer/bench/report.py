"""Terminal table and PNG plot of a bench report (the JSON dict `cmd_bench` builds)."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.table import Table


def _f(v, nd=1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def render(report: dict, console: Console | None = None) -> None:
    console = console or Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    for run in report["runs"]:
        t = Table(title=f"{run['url']}  model {run['model']}", title_justify="left")
        for col in ("conc", "rate", "ok", "fail", "req/s", "out tok/s", "total tok/s", "TTFT med/p99 ms",
                    "TPOT med/p99 ms", "ITL med/p99 ms", "E2E med/p99 ms", "reason/answer tok"):
            t.add_column(col, justify="right")
        for lv in run["levels"]:
            t.add_row(str(lv["concurrency"]), str(lv["request_rate"]), str(lv["completed"]),
                      f"[red]{lv['failed']}[/]" if lv["failed"] else "0",
                      _f(lv["request_throughput"], 2), _f(lv["output_throughput"]), _f(lv["total_token_throughput"]),
                      f"{_f(lv['median_ttft_ms'])}/{_f(lv['p99_ttft_ms'])}",
                      f"{_f(lv['median_tpot_ms'], 2)}/{_f(lv['p99_tpot_ms'], 2)}",
                      f"{_f(lv['median_itl_ms'], 2)}/{_f(lv['p99_itl_ms'], 2)}",
                      f"{_f(lv['median_e2el_ms'])}/{_f(lv['p99_e2el_ms'])}",
                      f"{lv['total_reasoning_tokens']}/{lv['total_answer_tokens']}")
        console.print(t)
        for lv in run["levels"]:
            if lv["first_error"]:
                console.print(f"[red]c={lv['concurrency']}: {lv['failed']} failed; first error: {lv['first_error']}[/]")
    eb = report.get("engine_bench")
    if eb:
        console.print("engine (llama-bench, same placement): " +
                      ", ".join(f"{r['test']} {r['tokens_per_s']:.1f} ± {r['stddev']:.1f} tok/s" for r in eb["results"]))
        tg = next((r["tokens_per_s"] for r in eb["results"] if r["test"].startswith("tg")), None)
        c1 = next((lv for run in report["runs"] for lv in run["levels"] if lv["concurrency"] == 1 and lv["completed"]), None)
        if tg and c1 and c1.get("median_tpot_ms"):
            api = 1000.0 / c1["median_tpot_ms"]
            console.print(f"API decode at concurrency 1: {api:.1f} tok/s = {api / tg:.2f}x the engine's own tg figure")
    for run in report["runs"]:
        srv = run.get("server")
        if srv:
            cache = srv.get("cache_ram_mib")
            console.print(f"{run['url']}: {srv.get('slots')} slot(s) of {srv.get('ctx_per_slot')} tokens, queue "
                          f"{srv.get('queue')}, engine prompt cache in RAM "
                          + ("-" if cache is None else f"{cache} MiB"))
    console.print(f"prompt tokens counted by: {report.get('prompt_tokens_counted_by')}")


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for run in report["runs"]:
        lv = [x for x in run["levels"] if x["completed"]]
        if not lv:
            continue
        c = [x["concurrency"] for x in lv]
        label = run["url"]
        axes[0].plot(c, [x["output_throughput"] for x in lv], "o-", label=label)
        for ax, key in ((axes[1], "ttft"), (axes[2], "tpot")):
            ax.plot(c, [x[f"median_{key}_ms"] for x in lv], "o-", label=f"{label} median")
            ax.plot(c, [x[f"p99_{key}_ms"] for x in lv], "x--", label=f"{label} p99")
    for ax, title, unit in ((axes[0], "output throughput", "tokens/s"), (axes[1], "TTFT", "ms"), (axes[2], "TPOT", "ms")):
        ax.set_title(title)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(unit)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"hybridinfer bench — {report['machine'].get('cpu', '')} — {report['created']}", fontsize=9)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"  # never leave a half-written plot behind
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
