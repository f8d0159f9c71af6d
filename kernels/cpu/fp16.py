"""IEEE half-precision conversion inside Numba code (Numba's CPU target has no float16 type).

Plain scalar functions, so the CUDA module can compile the same source as device functions.
"""
import math

import numba
import numpy as np


# Value of one mantissa unit for each biased fp16 exponent: 2^(e - 25) for normal numbers, whose
# significand is 1024 + mantissa units, and 2^-24 for e = 0 (zero and subnormals). A table lookup
# instead of math.ldexp: ldexp is a libm call per scale, and it dominated the quantized kernels.
HALF_UNIT = np.array([2.0 ** -24] + [2.0 ** (e - 25) for e in range(1, 32)], dtype=np.float32)


@numba.njit(inline="always", cache=True)
def fp16_to_f32(lo: np.uint8, hi: np.uint8) -> np.float32:
    """Exact float32 value of the little-endian fp16 whose bytes are `lo`, `hi`."""
    bits = np.int32(lo) | (np.int32(hi) << 8)
    exponent = (bits >> 10) & 0x1F
    mantissa = bits & 0x3FF
    if exponent == 31:
        value = np.float32(np.inf) if mantissa == 0 else np.float32(np.nan)
    else:  # exact: an integer below 2^11 times a power of two
        value = np.float32(mantissa + (1024 if exponent else 0)) * HALF_UNIT[exponent]
    return -value if bits & 0x8000 else value


@numba.njit(inline="always", cache=True)
def f32_to_fp16_bits(x: np.float32) -> np.uint16:
    """IEEE fp16 bits of `x`, rounded to nearest even: the same bits as NumPy's astype(float16)
    and GGML_FP32_TO_FP16. Works in float64, where scaling by powers of two is exact."""
    v = np.float64(x)
    if v != v:  # NaN
        return np.uint16(0x7E00)
    sign = 0x8000 if (v < 0.0 or (v == 0.0 and math.copysign(1.0, v) < 0.0)) else 0
    a = abs(v)
    if a >= 65520.0:  # at or past the midpoint between 65504 (largest fp16) and 2^16
        return np.uint16(sign | 0x7C00)
    if a < 2.0 ** -14:  # subnormal: units of 2^-24; a carry into 1024 is the smallest normal
        return np.uint16(sign | int(np.rint(a * 2.0 ** 24)))
    mantissa, exponent = math.frexp(a)  # a = mantissa * 2^exponent, mantissa in [0.5, 1)
    significand = np.rint(mantissa * 2048.0)  # 11 significant bits, round half to even
    if significand == 2048.0:
        significand = 1024.0
        exponent += 1
    return np.uint16(sign | ((exponent + 14) << 10) | (int(significand) - 1024))
