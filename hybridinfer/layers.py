"""Which llama.cpp layer each block is on, from a placement — the one fact the rules, the prediction and the
llama.cpp compiler share, kept free of imports so all three can use it."""

from __future__ import annotations

import re

_BLK = re.compile(r"^blk\.(\d+)\.")


def layer_devices(device_of: dict[str, str], n_layer: int) -> list[str]:
    """The device of each llama.cpp layer (blocks 0..n_layer-1, then the output layer at index n_layer) for a
    placement: a block's layer is where its attention is, since that is where its KV cache must live.

    llama.cpp gives GPU layers as one suffix (`-ngl`) cut into contiguous runs per device (`-ts`), so a CPU
    attention block after the first GPU one, or a device run that restarts, cannot keep its KV where the plan
    put its attention: such a layer takes the device llama.cpp will give it (its run's device), and that is
    where its KV is counted.
    """
    att: dict[int, str] = {}
    out = None
    for name, dev in device_of.items():
        m = _BLK.match(name)
        b = int(m.group(1)) if m else None
        if b is None:
            if name.startswith("output.") or (out is None and name.startswith("output_norm.")):
                out = dev
            continue
        if name.endswith(".attn_norm.weight") or (".attn_" in name and b not in att):
            att[b] = dev
    seq = [att.get(b, "cpu") for b in range(n_layer)]
    seq.append(out if out is not None else (seq[-1] if seq else "cpu"))
    lo = next((i for i, d in enumerate(seq) if d != "cpu"), len(seq))
    order: list[str] = []
    count: dict[str, int] = {}
    cur = None
    for d in seq[lo:]:
        cur = d if d != "cpu" else cur  # a CPU layer inside the GPU range joins the run before it
        if cur not in count:
            order.append(cur)
            count[cur] = 0
        count[cur] += 1
    result = seq[:lo]
    for d in order:
        result += [d] * count[d]
    return result
