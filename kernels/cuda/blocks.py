"""How the CUDA kernels read each block format: one *unit* of weights at a time.

A unit is the run of weights that shares one scale: a 32-weight block of the legacy formats, a
32-weight group of Q4_K/Q5_K, a 16-weight group of Q6_K, 32 consecutive F16/F32 values. Each
format gives two device functions, and every kernel (decode matvec, prefill matmul, embedding
lookup) is built from them:

    scale, bias, aux = header(row, u)   # unit u of a row: its scale, its offset, and packed bits
    q = quant(row, u, aux, j)           # weight j of the unit is scale * q + bias

so the matvec computes scale * sum(q * x) + bias * sum(x) per unit, and the dequantizers write
scale * q + bias. `row` is one row of the weight matrix: uint8 bytes (a float32 view for F32).
Byte offsets are kernels.formats' layouts (`Q4_K.qs`, ...), and the helpers that
unpack Q4_K/Q5_K scales and Q5_0 high bits are the CPU module's own Python source compiled as
device functions; fp16 decodes through a table here (the CPU's LLVM `fpext` intrinsic cannot run
on the simulator). The arithmetic is llama.cpp's: on the simulator (no FMA) dequantized weights
are bit-identical to the reference.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
from gguf import GGMLQuantizationType as QType
from numba import cuda

from ..cpu import dequant as cpu
from ..formats import QK, QK_K, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K

F32, U32 = np.float32, np.uint32
device = cuda.jit(device=True, inline="always")

# Value of one mantissa unit for each biased fp16 exponent: 2^(e - 25) for normal numbers, whose
# significand is 1024 + mantissa units, and 2^-24 for e = 0 (zero and subnormals).
HALF_UNIT = np.array([2.0 ** -24] + [2.0 ** (e - 25) for e in range(1, 32)], dtype=np.float32)


@device
def fp16_bytes_to_f32(lo, hi):
    """Exact float32 value of the little-endian fp16 whose bytes are `lo`, `hi`."""
    bits = np.int32(lo) | (np.int32(hi) << 8)
    exponent = (bits >> 10) & 0x1F
    mantissa = bits & 0x3FF
    if exponent == 31:
        value = F32(np.inf) if mantissa == 0 else F32(np.nan)
    else:  # exact: an integer below 2^11 times a power of two
        value = F32(mantissa + (1024 if exponent else 0)) * HALF_UNIT[exponent]
    return -value if bits & 0x8000 else value


k_scale_min = device(cpu.k_scale_min.py_func)
q5_high_bits = device(cpu.q5_high_bits.py_func)


@device
def q5_value(row, at, shift, high, j):
    """Five-bit value: nibble at `shift` of row[at], fifth bit j of `high`."""
    return np.int32((row[at] >> shift) & 0x0F) | np.int32(((high >> j) & 1) << 4)


@device
def fp16_at(row, i):
    return fp16_bytes_to_f32(row[i], row[i + 1])


@device
def signed_byte(b):
    return np.int32(b) - ((np.int32(b) & 128) << 1)


@device
def nibble(row, at, j):
    """Weight j (0-31) of a legacy block: low nibble of qs[j], or high nibble of qs[j - 16]."""
    return (row[at + (j & 15)] >> (4 * (j >> 4))) & 15


# Float formats: 32 values per unit, no scale.
@device
def float_header(row, u):
    return F32(1), F32(0), U32(0)


@device
def f32_quant(row, u, aux, j):
    return row[32 * u + j]


@device
def f16_quant(row, u, aux, j):
    return fp16_at(row, 2 * (32 * u + j))


# Legacy formats: one unit per block of QK = 32 weights.
@device
def q4_0_header(row, u):
    return fp16_at(row, u * Q4_0.size + Q4_0.d), F32(0), U32(0)


@device
def q4_0_quant(row, u, aux, j):
    return F32(nibble(row, u * Q4_0.size + Q4_0.qs, j)) - F32(8)


@device
def q4_1_header(row, u):
    b = u * Q4_1.size
    return fp16_at(row, b + Q4_1.d), fp16_at(row, b + Q4_1.m), U32(0)


@device
def q4_1_quant(row, u, aux, j):
    return F32(nibble(row, u * Q4_1.size + Q4_1.qs, j))


@device
def q5_0_header(row, u):
    b = u * Q5_0.size
    return fp16_at(row, b + Q5_0.d), F32(0), U32(q5_high_bits(row, b + Q5_0.qh))


@device
def q5_0_quant(row, u, aux, j):
    at = u * Q5_0.size + Q5_0.qs + (j & 15)
    return F32(q5_value(row, at, 4 * (j >> 4), aux, j)) - F32(16)


@device
def q8_0_header(row, u):
    return fp16_at(row, u * Q8_0.size + Q8_0.d), F32(0), U32(0)


@device
def q8_0_quant(row, u, aux, j):
    return F32(signed_byte(row[u * Q8_0.size + Q8_0.qs + j]))


# K-quants: unit g of super-block s is u = 8 s + g (Q4_K, Q5_K) or 16 s + g (Q6_K).
@device
def q4_k_header(row, u):
    b = (u // 8) * Q4_K.size
    sc, m = k_scale_min(row, b + Q4_K.scales, u % 8)
    return (fp16_at(row, b + Q4_K.d) * F32(np.int32(sc)),
            -(fp16_at(row, b + Q4_K.dmin) * F32(np.int32(m))),
            U32(0))


@device
def q4_k_quant(row, u, aux, j):
    """Group g: 32 bytes of qs shared with its neighbour, low nibbles for even g, high for odd."""
    g = u % 8
    at = (u // 8) * Q4_K.size + Q4_K.qs + 32 * (g // 2) + j
    return F32((row[at] >> (4 * (g % 2))) & 15)


@device
def q5_k_header(row, u):
    b = (u // 8) * Q5_K.size
    sc, m = k_scale_min(row, b + Q5_K.scales, u % 8)
    return (fp16_at(row, b + Q5_K.d) * F32(np.int32(sc)),
            -(fp16_at(row, b + Q5_K.dmin) * F32(np.int32(m))),
            U32(0))


@device
def q5_k_quant(row, u, aux, j):
    """As Q4_K, plus bit g of qh[j] as the fifth bit."""
    g, b = u % 8, (u // 8) * Q5_K.size
    q = (row[b + Q5_K.qs + 32 * (g // 2) + j] >> (4 * (g % 2))) & 15
    high = (row[b + Q5_K.qh + j] >> g) & 1
    return F32(q | (high << 4))


@device
def q6_k_header(row, u):
    b = (u // 16) * Q6_K.size
    return (fp16_at(row, b + Q6_K.d) * F32(signed_byte(row[b + Q6_K.scales + u % 16])),
            F32(0), U32(0))


@device
def q6_k_quant(row, u, aux, j):
    """Group g = 8 half + 2 quarter + h: 4 low bits from ql (32 bytes per quarter pair, low
    nibbles for quarters 0-1, high for 2-3), 2 high bits from qh at shift 2 quarter."""
    g, b = u % 16, (u // 16) * Q6_K.size
    half, quarter, h = g // 8, (g % 8) // 2, g % 2
    low = (row[b + Q6_K.ql + 64 * half + 32 * (quarter % 2) + 16 * h + j]
           >> (4 * (quarter // 2))) & 15
    high = (row[b + Q6_K.qh + 32 * half + 16 * h + j] >> (2 * quarter)) & 3
    return F32(low | (high << 4)) - F32(32)


class Unit(NamedTuple):
    """A format as the kernels see it: `size` weights per unit, and in the decode matvec
    `lanes` lanes of a warp share one unit (each takes every lanes-th weight), so that a warp's
    loads cover consecutive bytes: 32 lanes on the 32 values of a float unit, one lane per
    quantized unit (a warp then reads 32 consecutive blocks or groups)."""

    size: int
    lanes: int
    header: Callable
    quant: Callable


UNITS: dict[QType, Unit] = {
    QType.F32: Unit(32, 32, float_header, f32_quant),
    QType.F16: Unit(32, 32, float_header, f16_quant),
    QType.Q4_0: Unit(QK, 1, q4_0_header, q4_0_quant),
    QType.Q4_1: Unit(QK, 1, q4_1_header, q4_1_quant),
    QType.Q5_0: Unit(QK, 1, q5_0_header, q5_0_quant),
    QType.Q8_0: Unit(QK, 1, q8_0_header, q8_0_quant),
    QType.Q4_K: Unit(QK_K // 8, 1, q4_k_header, q4_k_quant),
    QType.Q5_K: Unit(QK_K // 8, 1, q5_k_header, q5_k_quant),
    QType.Q6_K: Unit(QK_K // 16, 1, q6_k_header, q6_k_quant),
}
