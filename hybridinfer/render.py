"""Human-readable terminal output (rich) for probe, inspect and plan; JSON output lives with each command."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from .util import GIB

console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _g(n: float) -> str:
    return f"{n / GIB:.2f}"


def render_probe(hw) -> None:
    c = hw.cpu
    console.print(f"[bold]{hw.id}[/]  ({hw.source})")
    console.print(f"CPU     {c.model}")
    console.print(f"        {c.physical_cores} physical cores, {c.logical_cores} logical, {c.sockets} socket(s), ISA tier [bold]{c.isa}[/]")
    console.print(f"        flags: {' '.join(c.flags) or '-'}")
    for n in hw.numa_nodes:
        console.print(f"NUMA {n.id}  {len(n.cpus)} CPUs, {n.memory_bytes / GIB:.1f} GiB")
    console.print(f"RAM     {hw.ram_total / GIB:.1f} GiB total, {hw.ram_available / GIB:.1f} GiB available")
    console.print(f"Memory bandwidth  {hw.memory_bandwidth_gbs:g} GB/s ({hw.bandwidth_source}"
                  + (", run with --measure-bandwidth to measure" if hw.bandwidth_source == "estimate" else "")
                  + (f": {hw.bandwidth_method}" if hw.bandwidth_method else "") + ")")
    cal = hw.calibration
    if cal:
        age = cal.age_days()
        console.print(f"Calibration  {cal.created} ({age:.1f} days ago), engines: "
                      + (", ".join(r.key for r in cal.engines) or "none") + (f"; [yellow]{cal.busy}[/]" if cal.busy else ""))
    elif hw.source == "probe":
        console.print("Calibration  none yet: `hybridinfer calibrate` (plan/serve/bench run it on first use)")
    if not hw.gpus:
        console.print("GPU     none (CPU-only plans)")
    for g in hw.gpus:
        console.print(f"GPU {g.index}   {g.name}: {g.vram_total / GIB:.1f} GiB ({g.vram_free / GIB:.1f} free), "
                      f"cc {g.compute_capability or '?'}, PCIe {g.pcie_gen}.0 x{g.pcie_width}"
                      + (f", {g.memory_bandwidth_gbs:g} GB/s" if g.memory_bandwidth_gbs else ""))
    t = Table("engine", "status", "version", "detail", box=None, pad_edge=False)
    for e in hw.engines:
        t.add_row(e.name, "[green]installed[/]" if e.installed else "[dim]not installed[/]", e.version or "-",
                  (e.path + (" (CUDA)" if e.gpu else " (CPU build)") if e.path and e.installed else e.detail))
    console.print(t)


def render_calibration(cal) -> None:
    """The per-engine, per-type costs a calibration holds, as tok/s-independent ns per weight."""
    console.print(f"[bold]calibration[/] of {cal.cpu}  {cal.created}  ({cal.seconds:g} s)")
    console.print(f"memory bandwidth {cal.bandwidth_gbs:g} GB/s ({cal.bandwidth_method})")
    if cal.busy:
        console.print(f"[yellow]{cal.busy}[/]")
    types = sorted({t for r in cal.engines for t in r.decode_ns}, key=lambda t: (len(t), t))
    t = Table("engine", "threads", "block µs", *types, box=None, pad_edge=False,
              title="decode / prefill, ns per weight touched per token")
    for r in cal.engines:
        t.add_row(r.key, str(r.threads), f"{r.block_decode_us:g}",
                  *(f"{r.decode_ns[x]:.3g} / {r.prefill_ns.get(x, float('nan')):.2g}" if x in r.decode_ns
                    else ("failed" if x in r.failed else "-") for x in types))
    console.print(t)
    for r in cal.engines:
        for typ, why in r.failed.items():
            console.print(f"  {r.key} {typ}: {why}")


def render_model(m, support: dict[str, dict[str, str]], tensors: bool = False) -> None:
    """`support`: group -> engine -> verdict (engines.support_table)."""
    console.print(f"[bold]{m.name or '(unnamed)'}[/]  arch [bold]{m.arch}[/]  {len(m.paths)} file(s)")
    console.print(f"  {m.params / 1e9:.2f} B params, {m.bytes / GIB:.2f} GiB, {m.bpw:.2f} bits/weight; "
                  f"{m.block_count} blocks, context {m.context_length}, vocab {m.vocab_size}")
    if m.expert_count:
        console.print(f"  MoE: {m.expert_count} routed experts, {m.expert_used_count} used per token, "
                      f"{m.expert_shared_count} shared; {m.leading_dense_block_count} leading dense block(s); "
                      f"expert FFN {m.expert_ffn_length}")
    else:
        console.print("  dense model (no experts): plans use a layer split")
    console.print("  quant types: " + ", ".join(f"{k} x{v}" for k, v in m.quant_types.items()))
    if not m.has_chat_template:
        console.print("  chat template: [yellow]none[/] — a base model: prompt it with /v1/completions (chat requests "
                      "would run on the engine's fallback template)")
    names = list(next(iter(support.values()))) if support else []  # the engine registry's, in order
    t = Table("group", "GiB", "share", "params (M)", "tensors", "types", *names, box=None)
    arch_refusals = {n: v for row in support.values() for n, v in row.items() if v.startswith("refused: architecture")}

    def cell(v: str) -> str:  # an engine that lacks the architecture: said once under the table, not per group
        return "refused: architecture" if v in arch_refusals.values() else v

    for name, g in m.groups.items():
        t.add_row(name, _g(g.bytes), f"{g.bytes / m.bytes:.1%}", f"{g.params / 1e6:,.0f}", str(g.tensors),
                  ", ".join(g.types), *(cell(support[name].get(n, "")) for n in names))
    console.print(t)
    for n, v in arch_refusals.items():
        console.print(f"  {n}: {v}")
    kv = m.kv
    console.print(f"  KV cache: {kv.form} form, {kv.values_per_token_per_layer} values/token/layer x {kv.layers} layers = "
                  + ", ".join(f"{k} {v:,} B/token" for k, v in kv.bytes_per_token.items())
                  + f"  (32k context f16: {kv.bytes_at(32768, 'f16') / 2**20:,.0f} MiB)")
    if kv.swa_layers:
        console.print(f"  + {kv.swa_layers} sliding-window layers caching at most {kv.swa_window} tokens per slot")
    if kv.state_layers:
        console.print(f"  + {kv.state_layers} recurrent layers: {kv.state_bytes_per_slot / 2**20:,.1f} MiB of state per slot")
    if kv.indexer_values_per_token_per_layer:
        console.print(f"  (includes {kv.indexer_values_per_token_per_layer} indexer key values/token/layer)")
    if tensors:
        tt = Table("tensor", "shape", "type", "MiB", "class", box=None)
        for x in m.tensors:
            tt.add_row(x.name, "x".join(map(str, x.shape)), x.type, f"{x.nbytes / 2**20:.2f}", x.cls)
        console.print(tt)


def render_plan(plan, compare=None) -> None:
    from .util import shell

    p = plan.prediction
    console.print(f"[bold]Plan[/]: {plan.model_name or plan.model_path} on [bold]{plan.hardware}[/] — engine "
                  f"[bold]{plan.engine}[/], rules [bold]{plan.rules}[/]")
    t = Table("device", "", "weights", "KV", "compute", "runtime", "total GiB", "usable GiB", "holds", box=None)
    for d in plan.devices:
        holds = ", ".join(f"{k} {v / GIB:.1f}" for k, v in sorted(d.groups.items(), key=lambda kv: -kv[1]) if v >= GIB * 0.01)
        t.add_row(d.device, d.label[:24], _g(d.weights), _g(d.kv_cache), _g(d.compute), _g(d.runtime),
                  f"[bold]{_g(d.total)}[/]", _g(d.capacity), holds or "-")
    console.print(t)
    label = {"calibrated": "Predicted from this box's calibration",
             "calibrated CPU, predicted GPU": "Predicted (CPU side from this box's calibration)"}.get(p.source, "Predicted")
    console.print(f"[bold]{label}[/]: decode [bold green]{p.decode_tps:g} tok/s[/] "
                  f"({p.fraction_of_limit:.0%} of this placement's {p.decode_limit_tps:g} tok/s bandwidth limit; bound by {p.bound}), "
                  f"prefill ~{p.prefill_tps:g} tok/s")
    for n in p.notes:
        console.print(f"  {n}")
    if compare:
        c = compare.prediction
        ratio = p.decode_tps / c.decode_tps if c.decode_tps else float("inf")
        console.print(f"[bold]Compare[/]: rules {compare.rules} ({compare.engine}): decode {c.decode_tps:g} tok/s, "
                      f"prefill ~{c.prefill_tps:g} tok/s → this plan decodes [bold]{ratio:.2f}x[/] "
                      f"{'faster' if ratio >= 1 else 'slower'}")
        console.print(f"  {shell(compare.command)}", soft_wrap=True)
    console.print("[bold]Why[/]:")
    for r in why(plan):
        console.print(f"  {r}")
    for w in plan.warnings:
        console.print(f"[yellow]warning[/]: {w}")
    console.print("[bold]Command[/]:")
    console.print(shell(plan.command), soft_wrap=True)


LEAD = ("tuned", "rules-choice")  # reasons shown before the engine verdicts: they say how the rest was chosen


def why(plan) -> list[str]:
    """The plan's "Why" as prose: how it was chosen, each engine's verdict, then the placement's reasons."""
    return ([r.text for r in plan.reasons if r.topic in LEAD] + [line for v in plan.verdicts for line in v.text(plan.hardware)]
            + [r.text for r in plan.reasons if r.topic not in LEAD])
