# --- KTransformers glue (appended to hybridinfer/quants.py when the patch writes hybridinfer_iq.py) -----------------

# Types KTransformers' CPU expert kernels multiply on x86; anything else in a routed-expert tensor is not computed
# at all. The float types: llamafile's tinyblas (third_party/llamafile/tinyblas_cpu_sgemm.inc) runs F32/F16/BF16,
# and the AMX backends (v0.3+, AMXInt8/AMXBF16) take BF16 experts only.
CPU_EXPERT_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11,
                    "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ2_XXS": 16, "IQ1_S": 19, "IQ4_XS": 23, "BF16": 30}
ALL_NAMES = {**{v: k for k, v in CPU_EXPERT_TYPES.items()}, **BY_ID}


def register(types, names, block_sizes, elements_per_block, dequantize_cpu, dequantize_gpu) -> list[str]:
    """Add every IQ type KTransformers lacks to its six tables, in place (callers hold these dict objects)."""
    import numpy as np
    import torch

    added = []
    for name, (type_id, block, size) in TYPES.items():
        if name in types:  # keep KTransformers' own implementation (IQ4_XS has one)
            continue

        def cpu(data, _name=name):
            return dequantize(np.asarray(data, dtype=np.uint8).reshape(-1), _name).numpy()

        def gpu(data, device="cuda", target_dtype=None, _name=name):
            raw = data if isinstance(data, torch.Tensor) else torch.from_numpy(np.array(data, dtype=np.uint8))
            return dequantize(raw.reshape(-1), _name, device=device, dtype=target_dtype)

        types[name] = type_id
        names[type_id] = name
        block_sizes[name] = size
        elements_per_block[name] = block
        dequantize_cpu[name] = cpu
        dequantize_gpu[name] = gpu
        added.append(name)
    return added


def checked_cpu_expert_loader(load_weights):
    """Wrap KExpertsCPU.load_weights: refuse routed experts whose type the CPU kernel does not compute."""
    import functools

    @functools.wraps(load_weights)
    def wrapper(self, *args, **kwargs):
        res = load_weights(self, *args, **kwargs)
        for key, w in (res or {}).items():
            for proj in ("gate", "up", "down"):
                t = w.get(f"{proj}_type")
                if t is not None and int(t) not in CPU_EXPERT_TYPES.values():
                    name = ALL_NAMES.get(int(t), f"ggml type {int(t)}")
                    raise NotImplementedError(
                        f"routed experts {key}.ffn_{proj}_exps.weight are {name} (ggml type {int(t)}), which "
                        f"KTransformers' CPU expert kernel does not compute (it would silently produce garbage); "
                        f"use a GGUF whose routed experts are {', '.join(CPU_EXPERT_TYPES)}, or run this model with "
                        f"llama.cpp (hybridinfer plan/serve)")
        return res

    wrapper.hybridinfer_checked = True
    return wrapper
