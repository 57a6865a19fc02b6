"""Compile a placement into llama.cpp's own flags: `-ngl`, `-ot REGEX=BUFFER` (first match wins, searched in the
tensor name, as llama.cpp does with std::regex_search) or `--cpu-moe` where that is exactly equivalent.

The result is checked by re-applying it to the model's tensor list with llama.cpp's rules; a compiled form that
would place any tensor differently is never emitted.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
CPU_MOE_RE = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"  # what llama.cpp's --cpu-moe adds, verbatim


def buffer_name(device: str) -> str:
    return "CPU" if device == "cpu" else "CUDA" + device.split(":")[1]


def default_device(name: str, ngl: int, n_layer: int) -> str:
    """Where llama.cpp puts a tensor with `-ngl ngl` and no override (one GPU): the last `ngl` blocks on the GPU,
    the output head too once ngl > n_layer, the token embedding always on the CPU."""
    m = BLK.match(name)
    if m:
        return "gpu:0" if int(m.group(1)) >= n_layer - ngl else "cpu"
    if name.startswith("token_embd"):
        return "cpu"
    return "gpu:0" if ngl > n_layer else "cpu"


def apply(names: list[str], overrides: list[tuple[str, str]], ngl: int, n_layer: int) -> dict[str, str]:
    """llama.cpp's semantics: first matching override wins, else the -ngl default."""
    compiled = [(re.compile(p), d) for p, d in overrides]
    out = {}
    for n in names:
        out[n] = next((d for rx, d in compiled if rx.search(n)), None) or default_device(n, ngl, n_layer)
    return out


@dataclass(frozen=True)
class Compiled:
    ngl: int
    overrides: list[tuple[str, str]]  # (regex, device)
    cpu_moe: bool  # the overrides are exactly --cpu-moe

    def args(self) -> list[str]:
        a = ["-ngl", str(self.ngl)]
        if self.cpu_moe:
            return a + ["--cpu-moe"]
        for rx, dev in self.overrides:
            a += ["-ot", f"{rx}={buffer_name(dev)}"]
        return a


def _alt(items: list[str]) -> str:
    """Factor a common prefix/suffix: ['ffn_gate_exps', 'ffn_up_exps'] -> 'ffn_(gate|up)_exps'."""
    items = sorted(set(items))
    if len(items) == 1:
        return re.escape(items[0])
    pre = os.path.commonprefix(items)
    suf = os.path.commonprefix([s[len(pre):][::-1] for s in items])[::-1]
    mids = [s[len(pre):len(s) - len(suf)] for s in items]
    return re.escape(pre) + "(" + "|".join(re.escape(m) for m in mids) + ")" + re.escape(suf)


def _block_alt(blocks) -> str:
    return "(" + "|".join(str(b) for b in sorted(blocks)) + ")" if len(blocks) > 1 else str(next(iter(blocks)))


def _overrides_for(device_of: dict[str, str], ngl: int, n_layer: int, explicit_gpu: bool) -> list[tuple[str, str]]:
    """Overrides for one -ngl choice: per suffix (e.g. ffn_up_exps.weight) the majority device becomes a
    catch-all, the minority blocks come first as exceptions; suffixes with identical shapes are merged."""
    by_suffix: dict[str, dict[int, str]] = {}
    loose = []
    for name, dev in device_of.items():
        m = BLK.match(name)
        if m:
            by_suffix.setdefault(m.group(2), {})[int(m.group(1))] = dev
        elif dev != default_device(name, ngl, n_layer) or (explicit_gpu and dev != "cpu"):
            loose.append((name, dev))
    # signature -> suffixes; signature = (catch-all device or None, ((device, blocks), ...) exceptions)
    groups: dict[tuple, list[str]] = {}
    for suffix, blocks in by_suffix.items():
        # Option A: no catch-all, name each block that differs from llama.cpp's default.
        a: dict[str, set[int]] = {}
        for b, d in blocks.items():
            if d != default_device(f"blk.{b}.{suffix}", ngl, n_layer) or (explicit_gpu and d != "cpu"):
                a.setdefault(d, set()).add(b)
        # Option B: a catch-all to the majority device, preceded by the exceptions.
        counts: dict[str, int] = {}
        for d in blocks.values():
            counts[d] = counts.get(d, 0) + 1
        major = max(sorted(counts), key=lambda d: counts[d])
        bx: dict[str, set[int]] = {}
        for b, d in blocks.items():
            if d != major:
                bx.setdefault(d, set()).add(b)
        cost_a = sum(3 + len(bs) for bs in a.values())
        cost_b = 3 + sum(3 + len(bs) for bs in bx.values())
        if cost_a <= cost_b:
            sig = (None, tuple(sorted((d, tuple(sorted(bs))) for d, bs in a.items())))
        else:
            sig = (major, tuple(sorted((d, tuple(sorted(bs))) for d, bs in bx.items())))
        if sig[0] is None and not sig[1]:
            continue
        groups.setdefault(sig, []).append(suffix)
    specific, catch = [], []
    for (major, exc), suffixes in sorted(groups.items(), key=lambda kv: str(kv[0])):
        pat = _alt(suffixes)
        for dev, blocks in exc:
            specific.append((rf"^blk\.{_block_alt(blocks)}\.{pat}$" if len(blocks) < 200 else pat, dev))
        if major is not None:
            catch.append((rf"\.{pat}$", major))
    out = specific + catch
    for name, dev in loose:
        out.insert(0, (rf"^{re.escape(name)}$", dev))
    return out


def compile_placement(device_of: dict[str, str], n_layer: int) -> Compiled:
    names = list(device_of)
    gpus = {d for d in device_of.values() if d != "cpu"}
    explicit_gpu = len(gpus) > 1  # several GPUs: name every GPU tensor's buffer, don't rely on -ts
    if not gpus:
        return Compiled(ngl=0, overrides=[], cpu_moe=False)
    # Candidate -ngl: all, or the count of trailing blocks whose attention sits on a GPU (the layer-split form).
    attn_gpu = {int(BLK.match(n).group(1)) for n, d in device_of.items()
                if d != "cpu" and BLK.match(n) and ".attn_" in n}
    trailing = 0
    while (n_layer - 1 - trailing) in attn_gpu:
        trailing += 1
    candidates = sorted({n_layer + 1, trailing, 0})
    best = None
    for ngl in candidates:
        ov = _overrides_for(device_of, ngl, n_layer, explicit_gpu)
        if apply(names, ov, ngl, n_layer) != device_of:
            continue
        if best is None or len(ov) < len(best.overrides):
            best = Compiled(ngl=ngl, overrides=ov, cpu_moe=False)
    if best is None:  # never expected; fall back to one exact regex per tensor
        ov = [(rf"^{re.escape(n)}$", d) for n, d in device_of.items() if d != default_device(n, n_layer + 1, n_layer)]
        best = Compiled(ngl=n_layer + 1, overrides=ov, cpu_moe=False)
    if not explicit_gpu and best.ngl > n_layer:
        cpu_moe = [(CPU_MOE_RE, "cpu")]
        if apply(names, cpu_moe, best.ngl, n_layer) == device_of:
            best = Compiled(ngl=best.ngl, overrides=cpu_moe, cpu_moe=True)
    if best.ngl > n_layer:
        best = Compiled(ngl=999, overrides=best.overrides, cpu_moe=best.cpu_moe)  # "all", readable
    return best
