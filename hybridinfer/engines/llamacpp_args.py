"""Compile a placement into llama.cpp's own flags: `-ngl` (which layers are offloaded), `-dev`/`-sm layer`/`-ts`
(which device each offloaded layer gets), `-ot REGEX=BUFFER` (first match wins, searched in the tensor name, as
llama.cpp does with std::regex_search) or `--cpu-moe` where that is exactly equivalent.

llama.cpp keeps a layer's KV cache on the device its layer is assigned (llama-kv-cache.cpp: `model.dev_layer(il)`),
whatever `-ot` does to the layer's weights, so the layer devices come from where the plan put each block's
attention (`layers.layer_devices`), and `-ot` only moves the other tensors. How a layer gets its device, in the
llama.cpp tree vendored by llama-cpp-python 0.3.36 (src/llama-model.cpp, `load_tensors`):

    i_gpu_start = max(n_layer + 1 - ngl, 0);  act = min(ngl, n_layer + 1)     # the output layer counts as one
    layer il >= i_gpu_start -> devices[upper_bound(splits, float(il - i_gpu_start) / act)]
    splits = cumulative -ts proportions (normalised, float), devices = the -dev list (default: RPC servers, then GPUs)

Older trees (and ik_llama.cpp) counted only blocks: i_gpu_start = max(n_layer - ngl, 0), the output layer
offloaded once ngl > n_layer; `ngl_counts_output=False` compiles for those.

The result is checked by re-applying it to the model's tensor list with llama.cpp's rules; a compiled form that
would place any tensor, or any layer's KV cache, differently is never emitted.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..layers import layer_devices


BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
CPU_MOE_RE = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"  # what llama.cpp's --cpu-moe adds, verbatim


def buffer_name(device: str, buffers: dict[str, str] | None = None) -> str:
    """llama.cpp's buffer-type name for a plan device: CPU, CUDA<n>, or RPC<k>[host:port] from the profile."""
    if device == "cpu":
        return "CPU"
    if buffers and device in buffers:
        return buffers[device]
    return "CUDA" + device.split(":")[1]


@dataclass(frozen=True)
class Layout:
    """What `-ngl` (+ `-dev`/`-ts`) gives every layer before any `-ot`: index n_layer is the output layer."""
    ngl: int
    devices: tuple[str, ...] = ()  # plan devices ("gpu:N") in llama.cpp's device order
    split: tuple[int, ...] = ()  # layers per device (the -ts proportions)
    layer: tuple[str, ...] = ()  # device of layer 0..n_layer
    counts_output: bool = True

    def default_device(self, name: str) -> str:
        m = BLK.match(name)
        if m:
            return self.layer[int(m.group(1))]
        if name.startswith("token_embd"):
            return "cpu"  # the input layer always stays on the CPU
        return self.layer[-1]


def simulate(ngl: int, devices: list[str], split: list[float], n_layer: int, counts_output: bool = True) -> list[str]:
    """llama.cpp's layer -> device assignment, with its float32 arithmetic (so ties fall where they fall there)."""
    if not devices:
        return ["cpu"] * (n_layer + 1)
    if counts_output:
        i_gpu_start = max(n_layer + 1 - ngl, 0)
    else:
        i_gpu_start = max(n_layer - ngl, 0)
    act = min(ngl, n_layer + 1)
    if len(devices) == 1:  # no split to compute
        return ["cpu" if il < i_gpu_start or il - i_gpu_start >= act else devices[0] for il in range(n_layer + 1)]
    import numpy as np  # here: only a split over several devices needs float32, and numpy's import costs
    s = np.float32(0)
    cum = []
    for x in (split or [1.0] * len(devices)):
        s = np.float32(s + np.float32(x))
        cum.append(s)
    cum = [np.float32(c / s) for c in cum]
    out = []
    for il in range(n_layer + 1):
        if il < i_gpu_start or (il - i_gpu_start) >= act:
            out.append("cpu")
            continue
        f = np.float32(np.float32(il - i_gpu_start) / np.float32(act))
        k = next((i for i, c in enumerate(cum) if c > f), len(cum))  # std::upper_bound
        out.append(devices[min(k, len(devices) - 1)])
    return out


def apply(names: list[str], overrides: list[tuple[str, str]], layout: Layout | int, n_layer: int | None = None) -> dict[str, str]:
    """llama.cpp's semantics: first matching override wins, else the layer's device. `layout` may be a plain
    -ngl for one GPU."""
    if isinstance(layout, int):
        layout = single_gpu_layout(layout, n_layer)
    compiled = [(re.compile(p), d) for p, d in overrides]
    return {n: next((d for rx, d in compiled if rx.search(n)), None) or layout.default_device(n) for n in names}


def single_gpu_layout(ngl: int, n_layer: int, counts_output: bool = True) -> Layout:
    return Layout(ngl=ngl, devices=("gpu:0",), split=(1,), layer=tuple(simulate(ngl, ["gpu:0"], [1.0], n_layer, counts_output)),
                  counts_output=counts_output)


@dataclass(frozen=True)
class Compiled:
    ngl: int
    overrides: list[tuple[str, str]]  # (regex, device)
    cpu_moe: bool  # the overrides are exactly --cpu-moe
    devices: list[str] = field(default_factory=list)  # llama.cpp device names for -dev ([] = llama.cpp's default)
    split: list[int] = field(default_factory=list)  # -ts, layers per device ([] = not needed)
    buffers: dict[str, str] = field(default_factory=dict)  # plan device -> buffer-type name
    layer: list[str] = field(default_factory=list)  # plan device of each layer (so of its KV cache), output last

    def placement(self, names: list[str]) -> dict[str, str]:
        """Where llama.cpp puts each tensor with these flags."""
        return apply(names, self.overrides, Layout(ngl=self.ngl, layer=tuple(self.layer)))

    def layout_args(self, sep: str = ",") -> list[str]:
        """-dev/-sm/-ts; llama-bench takes '/' between devices (',' there separates values to test)."""
        a = []
        if self.devices:
            a += ["-dev", sep.join(self.devices)]
        if len(self.split) > 1:
            a += ["-sm", "layer", "-ts", sep.join(str(x) for x in self.split)]
        return a

    def args(self) -> list[str]:
        a = ["-ngl", str(self.ngl)] + self.layout_args()
        if self.cpu_moe:
            return a + ["--cpu-moe"]
        for rx, dev in self.overrides:
            a += ["-ot", f"{rx}={buffer_name(dev, self.buffers)}"]
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


def _overrides_for(device_of: dict[str, str], layout: Layout) -> list[tuple[str, str]]:
    """Overrides for one layout: per suffix (e.g. ffn_up_exps.weight) either name each block that differs from
    its layer's device, or make the majority device a catch-all preceded by the exceptions, whichever is
    shorter; suffixes with identical placements are merged."""
    by_suffix: dict[str, dict[int, str]] = {}
    loose = []
    for name, dev in device_of.items():
        m = BLK.match(name)
        if m:
            by_suffix.setdefault(m.group(2), {})[int(m.group(1))] = dev
        elif dev != layout.default_device(name):
            loose.append((name, dev))
    # signature -> suffixes; signature = (catch-all device or None, ((device, blocks), ...) exceptions)
    groups: dict[tuple, list[str]] = {}
    for suffix, blocks in by_suffix.items():
        a: dict[str, set[int]] = {}
        for b, d in blocks.items():
            if d != layout.layer[b]:
                a.setdefault(d, set()).add(b)
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


def layout_for(device_of: dict[str, str], n_layer: int, counts_output: bool = True) -> Layout:
    """-ngl and the device runs that put every layer (and so its KV cache) where the plan put its attention."""
    want = layer_devices(device_of, n_layer)
    lo = next((i for i, d in enumerate(want) if d != "cpu"), n_layer + 1)
    if lo > n_layer:
        return Layout(ngl=0, layer=tuple(["cpu"] * (n_layer + 1)), counts_output=counts_output)
    if counts_output:
        ngl = n_layer + 1 - lo
        gpu_layers = want[lo:]
    elif lo == 0 and want[n_layer] != "cpu":
        ngl, gpu_layers = n_layer + 1, want
    else:  # older trees: blocks lo..n_layer-1; the output layer stays on the CPU (an -ot moves it if planned)
        ngl, gpu_layers = n_layer - lo, want[lo:n_layer]
    devices, split = [], []
    for d in gpu_layers:
        if not devices or devices[-1] != d:
            devices.append(d)
            split.append(0)
        split[-1] += 1
    layer = simulate(ngl, devices, split, n_layer, counts_output)
    return Layout(ngl=ngl, devices=tuple(devices), split=tuple(split), layer=tuple(layer), counts_output=counts_output)


def compile_placement(device_of: dict[str, str], n_layer: int, device_names: dict[str, str] | None = None,
                      buffers: dict[str, str] | None = None, counts_output: bool = True) -> Compiled:
    """`device_names`: every GPU of the box -> its llama.cpp device ("gpu:0" -> "CUDA0" | "RPC0"); `buffers`:
    -> its buffer-type name ("RPC0[127.0.0.1:50052]"). Without them: CUDA<n>, and one GPU means no -dev."""
    names = list(device_of)
    device_names = dict(device_names or {})
    buffers = dict(buffers or {})
    layout = layout_for(device_of, n_layer, counts_output)
    ov = _overrides_for(device_of, layout)
    if apply(names, ov, layout) != device_of:  # never expected; fall back to one exact regex per tensor
        ov = [(rf"^{re.escape(n)}$", d) for n, d in device_of.items() if d != layout.default_device(n)]
    # Devices holding only -ot'd tensors (no layer) still need a backend in the context: listed last with a 0 share.
    extra = sorted({d for d in device_of.values() if d != "cpu"} - set(layout.devices))
    used = list(layout.devices) + extra
    split = list(layout.split) + [0] * len(extra)
    gpu_names = {d: device_names.get(d, "CUDA" + d.split(":")[1]) for d in set(used) | set(device_names)}
    # -dev pins the device order; it is needed unless the box has one GPU, CUDA0, and it is the one used.
    needs_dev = bool(used) and (len(gpu_names) > 1 or any(n != "CUDA0" for n in gpu_names.values()))
    best = Compiled(ngl=layout.ngl, overrides=ov, cpu_moe=False,
                    devices=[gpu_names[d] for d in used] if needs_dev else [],
                    split=split if len(used) > 1 else [], buffers=buffers, layer=list(layout.layer))
    cpu_moe = [(CPU_MOE_RE, "cpu")]
    if ov and apply(names, cpu_moe, layout) == device_of:
        best = Compiled(ngl=best.ngl, overrides=cpu_moe, cpu_moe=True, devices=best.devices, split=best.split,
                        buffers=buffers, layer=best.layer)
    if best.ngl > n_layer:
        best = Compiled(ngl=999, overrides=best.overrides, cpu_moe=best.cpu_moe, devices=best.devices,
                        split=best.split, buffers=buffers, layer=best.layer)  # "all", readable
    return best
