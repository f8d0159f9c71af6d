"""IEEE half-precision conversion inside Numba code (Numba's CPU target has no float16 type).

Plain scalar functions, so the CUDA module can compile the same source as device functions.
"""
import math

import numba
import numpy as np


@numba.njit(inline="always", cache=True)
def fp16_to_f32(lo: np.uint8, hi: np.uint8) -> np.float32:
    """Exact float32 value of the little-endian fp16 whose bytes are `lo`, `hi`."""
    bits = np.int32(lo) | (np.int32(hi) << 8)
    sign = np.float32(-1.0) if bits & 0x8000 else np.float32(1.0)
    exponent = (bits >> 10) & 0x1F
    mantissa = bits & 0x3FF
    if exponent == 0:  # zero or subnormal: mantissa * 2^-24, exact in float32
        return sign * np.float32(mantissa) * np.float32(2.0 ** -24)
    if exponent == 31:
        return sign * np.float32(np.inf) if mantissa == 0 else np.float32(np.nan)
    return sign * np.float32(math.ldexp(np.float32(1024 + mantissa), exponent - 25))
