
# >>> hybridinfer ktransformers patch v1 >>>
# KExpertsCPU hands raw expert bytes and their ggml type to the CPU kernel, which silently skips types it cannot
# multiply (garbage output, upstream #782). Fail loudly at load time instead, naming the tensor and its type.
# Added by `hybridinfer patch ktransformers --apply`; `--revert` removes this block.
from ktransformers.util import hybridinfer_iq as _hybridinfer_iq
KExpertsCPU.load_weights = _hybridinfer_iq.checked_cpu_expert_loader(KExpertsCPU.load_weights)
# <<< hybridinfer ktransformers patch v1 <<<
