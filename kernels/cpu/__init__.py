"""Numba CPU kernels. Settings every kernel module shares, and per-format dispatch inside
compiled code."""
from gguf import GGMLQuantizationType as QType
from numba import types
from numba.core.errors import TypingError

# fastmath for kernels whose float sums may be reassociated (dot products, norms, attention):
# everything but "nnan"/"ninf", since attention starts its running maximum at -inf and NaN or
# infinite inputs must stay visible. Quantizers and dequantizers never use it (their bits are
# llama.cpp's).
FASTMATH = {"reassoc", "contract", "nsz", "arcp", "afn"}


def format_kernel(registry: dict, qtype, what: str):
    """The function `registry` holds for the format `qtype`, a Numba literal integer (the caller
    passes `numba.literally(qtype)`): used by the @overload of a per-format function, so each
    format compiles to its own kernel with no branch. A type the registry lacks is a typing
    error naming the ones it has (the Python dispatch refuses it before that with a ValueError)."""
    if not isinstance(qtype, types.IntegerLiteral):
        return None
    name = QType(qtype.literal_value).name
    if QType(qtype.literal_value) not in registry:
        raise TypingError(f"no {what} kernel for {name} (has "
                          f"{', '.join(t.name for t in registry)})")
    return registry[QType(qtype.literal_value)]
