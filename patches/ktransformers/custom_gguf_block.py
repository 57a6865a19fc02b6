
# >>> hybridinfer ktransformers patch v1 >>>
# Registers ggml's IQ quant types (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ4_NL) in the six type
# tables above, in place, so GGUFLoader (here, or in custom_loader.py since v0.3.1, which imports these same dicts)
# dequantizes Unsloth's dynamic quants instead of raising "ggml_type 18 not implemented".
# Added by `hybridinfer patch ktransformers --apply`; `--revert` removes this block and hybridinfer_iq.py.
from ktransformers.util import hybridinfer_iq as _hybridinfer_iq
_hybridinfer_iq.register(GGML_TYPES, GGML_NAMES, GGML_BLOCK_SIZES, GGML_ELEMENTS_PER_BLOCK,
                         GGML_DEQUANTIZE, GGML_DEQUANTIZE_GPU)
# <<< hybridinfer ktransformers patch v1 <<<
