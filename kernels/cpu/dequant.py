"""Numba CPU dequantizers, one per block format, parallel over blocks.

Each kernel `name(raw, out)` reads whole blocks from `raw` (uint8, flat) and writes their weights
to `out` (float32, flat, `n_blocks * block_size`). Byte offsets come from kernels.formats; the
arithmetic follows llama.cpp's `dequantize_row_*` operation for operation, so the results are
bit-identical to the NumPy reference (no fastmath: reassociating or fusing would change bits).
"""
import numba
import numpy as np
from gguf import GGMLQuantizationType as QType
from numba import prange

from kernels.cpu.fp16 import fp16_to_f32
from kernels.formats import FORMATS, QK, QK_K

F32 = np.float32
_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0 = (FORMATS[t] for t in (QType.Q4_0, QType.Q4_1, QType.Q5_0,
                                                          QType.Q5_1, QType.Q8_0))
_Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K = (FORMATS[t] for t in (QType.Q2_K, QType.Q3_K, QType.Q4_K,
                                                          QType.Q5_K, QType.Q6_K))

# Numba freezes module globals into the compiled code: plain ints make the offsets constants.
Q4_0_SIZE, Q4_0_D, Q4_0_QS = _Q4_0.type_size, _Q4_0.offset("d"), _Q4_0.offset("qs")
Q4_1_SIZE, Q4_1_D, Q4_1_M, Q4_1_QS = (_Q4_1.type_size, _Q4_1.offset("d"), _Q4_1.offset("m"),
                                      _Q4_1.offset("qs"))
Q5_0_SIZE, Q5_0_D, Q5_0_QH, Q5_0_QS = (_Q5_0.type_size, _Q5_0.offset("d"), _Q5_0.offset("qh"),
                                       _Q5_0.offset("qs"))
Q5_1_SIZE, Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS = (_Q5_1.type_size, _Q5_1.offset("d"),
                                               _Q5_1.offset("m"), _Q5_1.offset("qh"),
                                               _Q5_1.offset("qs"))
Q8_0_SIZE, Q8_0_D, Q8_0_QS = _Q8_0.type_size, _Q8_0.offset("d"), _Q8_0.offset("qs")
Q2_K_SIZE, Q2_K_SCALES, Q2_K_QS, Q2_K_D, Q2_K_DMIN = (
    _Q2_K.type_size, _Q2_K.offset("scales"), _Q2_K.offset("qs"), _Q2_K.offset("d"),
    _Q2_K.offset("dmin"))
Q3_K_SIZE, Q3_K_HMASK, Q3_K_QS, Q3_K_SCALES, Q3_K_D = (
    _Q3_K.type_size, _Q3_K.offset("hmask"), _Q3_K.offset("qs"), _Q3_K.offset("scales"),
    _Q3_K.offset("d"))
Q4_K_SIZE, Q4_K_D, Q4_K_DMIN, Q4_K_SCALES, Q4_K_QS = (
    _Q4_K.type_size, _Q4_K.offset("d"), _Q4_K.offset("dmin"), _Q4_K.offset("scales"),
    _Q4_K.offset("qs"))
Q5_K_SIZE, Q5_K_D, Q5_K_DMIN, Q5_K_SCALES, Q5_K_QH, Q5_K_QS = (
    _Q5_K.type_size, _Q5_K.offset("d"), _Q5_K.offset("dmin"), _Q5_K.offset("scales"),
    _Q5_K.offset("qh"), _Q5_K.offset("qs"))
Q6_K_SIZE, Q6_K_QL, Q6_K_QH, Q6_K_SCALES, Q6_K_D = (
    _Q6_K.type_size, _Q6_K.offset("ql"), _Q6_K.offset("qh"), _Q6_K.offset("scales"),
    _Q6_K.offset("d"))


@numba.njit(inline="always", cache=True)
def fp16_at(raw, i):
    """The fp16 stored at byte `i` of `raw`, as float32."""
    return fp16_to_f32(raw[i], raw[i + 1])


@numba.njit(inline="always", cache=True)
def k_scale_min(raw, at, g):
    """Six-bit scale and min of group `g` (0-7) from Q4_K/Q5_K's 12 packed bytes at `raw[at]`."""
    # Both branches return int32: mixed integer types would make Numba unify them as float64.
    if g < 4:
        return np.int32(raw[at + g] & 63), np.int32(raw[at + g + 4] & 63)
    scale = (raw[at + g + 4] & 0x0F) | ((raw[at + g - 4] >> 6) << 4)
    minimum = (raw[at + g + 4] >> 4) | ((raw[at + g] >> 6) << 4)
    return np.int32(scale), np.int32(minimum)


@numba.njit(parallel=True, cache=True)
def f16(raw, out):
    for i in prange(out.size):
        out[i] = fp16_at(raw, 2 * i)


@numba.njit(parallel=True, cache=True)
def _widen_bf16(bits, wide):
    for i in prange(wide.size):
        wide[i] = np.uint32(bits[i]) << 16


@numba.njit(cache=True)
def bf16(raw, out):
    # The views are made outside the parallel loop: Numba 0.68 drops stores made inside a prange
    # body through a view created in the same function.
    _widen_bf16(raw.view(np.uint16), out.view(np.uint32))


# Loop length: the 16-weight loops of the 32-weight formats take their length from the buffers at
# run time ("half_block_length"): with a constant trip count of 16, LLVM unrolls them completely
# before its loop vectorizer runs and the SLP vectorizer leaves them scalar (measured: 4x slower).
#
# Vector width: Numba types integer arithmetic as int64, and int64 -> float32 conversion runs 8
# lanes at a time at best. So shifts are literals (arguments of inline functions called with
# constants), and offsets such as "q - 8" are applied after the conversion to float32, which is
# exact for these small integers and so gives the same bits as llama.cpp's integer subtraction.

@numba.njit(inline="always", cache=True)
def nibbles_centered(raw, at, shift, d, out, o, n, offset):
    """out[o + l] = d * ((raw[at + l] >> shift & 15) - offset), l < n (Q4_0)."""
    for l in range(n):
        out[o + l] = d * (F32((raw[at + l] >> shift) & 0x0F) - offset)


@numba.njit(inline="always", cache=True)
def nibbles_affine(raw, at, shift, d, m, out, o, n):
    """out[o + l] = d * (raw[at + l] >> shift & 15) + m, l < n (Q4_1)."""
    for l in range(n):
        out[o + l] = d * F32((raw[at + l] >> shift) & 0x0F) + m


@numba.njit(inline="always", cache=True)
def nibbles_minus_min(raw, at, shift, width, d, m, out, o, n):
    """out[o + l] = d * (raw[at + l] >> shift & (2^width - 1)) - m, l < n (Q2_K, Q4_K)."""
    mask = (1 << width) - 1
    for l in range(n):
        out[o + l] = d * F32((raw[at + l] >> shift) & mask) - m


@numba.njit(parallel=True, cache=True)
def q4_0(raw, out):
    n_blocks = raw.size // Q4_0_SIZE
    half = out.size // n_blocks // 2  # QK // 2, known only at run time (see above)
    for i in prange(n_blocks):
        b, y = i * Q4_0_SIZE, i * QK
        d = fp16_at(raw, b + Q4_0_D)
        nibbles_centered(raw, b + Q4_0_QS, 0, d, out, y, half, F32(8))
        nibbles_centered(raw, b + Q4_0_QS, 4, d, out, y + half, half, F32(8))


@numba.njit(parallel=True, cache=True)
def q4_1(raw, out):
    n_blocks = raw.size // Q4_1_SIZE
    half = out.size // n_blocks // 2
    for i in prange(n_blocks):
        b, y = i * Q4_1_SIZE, i * QK
        d, m = fp16_at(raw, b + Q4_1_D), fp16_at(raw, b + Q4_1_M)
        nibbles_affine(raw, b + Q4_1_QS, 0, d, m, out, y, half)
        nibbles_affine(raw, b + Q4_1_QS, 4, d, m, out, y + half, half)


@numba.njit(inline="always", cache=True)
def q5_high_bits(raw, at):
    """Q5_0/Q5_1's 32 fifth bits: the little-endian u32 at `raw[at]`, bit j for weight j."""
    return (np.uint32(raw[at]) | (np.uint32(raw[at + 1]) << 8) | (np.uint32(raw[at + 2]) << 16)
            | (np.uint32(raw[at + 3]) << 24))


@numba.njit(inline="always", cache=True)
def q5_value(raw, at, shift, high, j):
    """Five-bit value: nibble at `shift` of raw[at], fifth bit j of `high`."""
    return np.int32((raw[at] >> shift) & 0x0F) | np.int32(((high >> j) & 1) << 4)


@numba.njit(parallel=True, cache=True)
def q5_0(raw, out):
    n_blocks = raw.size // Q5_0_SIZE
    half = out.size // n_blocks // 2
    for i in prange(n_blocks):
        b, y = i * Q5_0_SIZE, i * QK
        d, high = fp16_at(raw, b + Q5_0_D), q5_high_bits(raw, b + Q5_0_QH)
        for j in range(half):
            out[y + j] = d * (F32(q5_value(raw, b + Q5_0_QS + j, 0, high, j)) - F32(16))
        for j in range(half):
            out[y + j + half] = d * (F32(q5_value(raw, b + Q5_0_QS + j, 4, high, j + half)) - F32(16))


@numba.njit(parallel=True, cache=True)
def q5_1(raw, out):
    n_blocks = raw.size // Q5_1_SIZE
    half = out.size // n_blocks // 2
    for i in prange(n_blocks):
        b, y = i * Q5_1_SIZE, i * QK
        d, m = fp16_at(raw, b + Q5_1_D), fp16_at(raw, b + Q5_1_M)
        high = q5_high_bits(raw, b + Q5_1_QH)
        for j in range(half):
            out[y + j] = d * F32(q5_value(raw, b + Q5_1_QS + j, 0, high, j)) + m
        for j in range(half):
            out[y + j + half] = d * F32(q5_value(raw, b + Q5_1_QS + j, 4, high, j + half)) + m


@numba.njit(parallel=True, cache=True)
def q8_0(raw, out):
    signed = raw.view(np.int8)
    for i in prange(raw.size // Q8_0_SIZE):
        b, y = i * Q8_0_SIZE, i * QK
        d = fp16_at(raw, b + Q8_0_D)
        for j in range(QK):
            out[y + j] = F32(signed[b + Q8_0_QS + j]) * d


@numba.njit(inline="always", cache=True)
def q2_k_pair(raw, b, y, g, shift, d, dmin, out):
    """Groups g and g + 1 of a Q2_K block: 16 weights each from 32 bytes at one shift."""
    q_at = b + Q2_K_QS + (g // 8) * 32
    for h in range(2):
        sc = raw[b + Q2_K_SCALES + g + h]
        nibbles_minus_min(raw, q_at + 16 * h, shift, 2, d * F32(sc & 0x0F), dmin * F32(sc >> 4),
                          out, y + 16 * (g + h), 16)


@numba.njit(parallel=True, cache=True)
def q2_k(raw, out):
    for i in prange(raw.size // Q2_K_SIZE):
        b, y = i * Q2_K_SIZE, i * QK_K
        d, dmin = fp16_at(raw, b + Q2_K_D), fp16_at(raw, b + Q2_K_DMIN)
        for half in range(2):  # 128 weights from 32 bytes: 4 shifts x 2 groups of 16
            g = 8 * half
            q2_k_pair(raw, b, y, g, 0, d, dmin, out)
            q2_k_pair(raw, b, y, g + 2, 2, d, dmin, out)
            q2_k_pair(raw, b, y, g + 4, 4, d, dmin, out)
            q2_k_pair(raw, b, y, g + 6, 6, d, dmin, out)


@numba.njit(inline="always", cache=True)
def q3_k_scale(raw, at, g):
    """Six-bit scale of Q3_K group `g` (0-15), offset by 32, from the 12 bytes at `raw[at]`."""
    low = (raw[at + g % 8] >> (4 * (g // 8))) & 0x0F
    high = (raw[at + 8 + g % 4] >> (2 * (g // 4))) & 3
    return np.int32(low | (high << 4)) - 32


@numba.njit(inline="always", cache=True)
def q3_k_pair(raw, b, y, g, shift, d, out):
    """Groups g and g + 1: 2 low bits at `shift`, minus 4 where hmask bit g // 2 is clear."""
    q_at, bit = b + Q3_K_QS + (g // 8) * 32, np.uint8(1 << (g // 2))
    for h in range(2):
        dl = d * F32(q3_k_scale(raw, b + Q3_K_SCALES, g + h))
        for l in range(16):
            q = F32((raw[q_at + 16 * h + l] >> shift) & 3)
            if not raw[b + Q3_K_HMASK + 16 * h + l] & bit:
                q -= F32(4)
            out[y + 16 * (g + h) + l] = dl * q


@numba.njit(parallel=True, cache=True)
def q3_k(raw, out):
    for i in prange(raw.size // Q3_K_SIZE):
        b, y = i * Q3_K_SIZE, i * QK_K
        d = fp16_at(raw, b + Q3_K_D)
        for half in range(2):
            g = 8 * half
            q3_k_pair(raw, b, y, g, 0, d, out)
            q3_k_pair(raw, b, y, g + 2, 2, d, out)
            q3_k_pair(raw, b, y, g + 4, 4, d, out)
            q3_k_pair(raw, b, y, g + 6, 6, d, out)


@numba.njit(parallel=True, cache=True)
def q4_k(raw, out):
    for i in prange(raw.size // Q4_K_SIZE):
        b, y = i * Q4_K_SIZE, i * QK_K
        d, dmin = fp16_at(raw, b + Q4_K_D), fp16_at(raw, b + Q4_K_DMIN)
        for c in range(4):  # 32 bytes: group 2c in the low nibbles, group 2c + 1 in the high
            q_at = b + Q4_K_QS + 32 * c
            sc, m = k_scale_min(raw, b + Q4_K_SCALES, 2 * c)
            nibbles_minus_min(raw, q_at, 0, 4, d * F32(sc), dmin * F32(m), out, y + 64 * c, 32)
            sc, m = k_scale_min(raw, b + Q4_K_SCALES, 2 * c + 1)
            nibbles_minus_min(raw, q_at, 4, 4, d * F32(sc), dmin * F32(m), out, y + 64 * c + 32, 32)


@numba.njit(inline="always", cache=True)
def q5_k_group(raw, b, y, g, shift, d, dmin, out):
    """Group g: nibbles at `shift` of 32 bytes of qs, fifth bit g of each qh byte."""
    sc, m = k_scale_min(raw, b + Q5_K_SCALES, g)
    d1, m1 = d * F32(sc), dmin * F32(m)
    q_at, bit = b + Q5_K_QS + 32 * (g // 2), np.uint8(1 << g)
    for l in range(32):
        q = F32((raw[q_at + l] >> shift) & 0x0F)
        if raw[b + Q5_K_QH + l] & bit:
            q += F32(16)
        out[y + 32 * g + l] = d1 * q - m1


@numba.njit(parallel=True, cache=True)
def q5_k(raw, out):
    for i in prange(raw.size // Q5_K_SIZE):
        b, y = i * Q5_K_SIZE, i * QK_K
        d, dmin = fp16_at(raw, b + Q5_K_D), fp16_at(raw, b + Q5_K_DMIN)
        for c in range(4):
            q5_k_group(raw, b, y, 2 * c, 0, d, dmin, out)
            q5_k_group(raw, b, y, 2 * c + 1, 4, d, dmin, out)


@numba.njit(inline="always", cache=True)
def q6_k_quarter(raw, b, y, half, quarter, low_shift, high_shift, d, out):
    """32 weights of a half: low nibbles at `low_shift` of 32 ql bytes, 2 bits at `high_shift`."""
    ql_at = b + Q6_K_QL + 64 * half + 32 * (quarter % 2)
    qh_at = b + Q6_K_QH + 32 * half
    scales = raw.view(np.int8)
    for h in range(2):
        g = 8 * half + 2 * quarter + h
        dl = d * F32(scales[b + Q6_K_SCALES + g])
        for l in range(16):
            low = (raw[ql_at + 16 * h + l] >> low_shift) & 0x0F
            high = (raw[qh_at + 16 * h + l] >> high_shift) & 3
            out[y + 16 * g + l] = dl * (F32(low | (high << 4)) - F32(32))


@numba.njit(parallel=True, cache=True)
def q6_k(raw, out):
    for i in prange(raw.size // Q6_K_SIZE):
        b, y = i * Q6_K_SIZE, i * QK_K
        d = fp16_at(raw, b + Q6_K_D)
        for half in range(2):
            q6_k_quarter(raw, b, y, half, 0, 0, 0, d, out)
            q6_k_quarter(raw, b, y, half, 1, 0, 2, d, out)
            q6_k_quarter(raw, b, y, half, 2, 4, 4, d, out)
            q6_k_quarter(raw, b, y, half, 3, 4, 6, d, out)


DEQUANTIZE = {
    QType.F16: f16, QType.BF16: bf16,
    QType.Q4_0: q4_0, QType.Q4_1: q4_1, QType.Q5_0: q5_0, QType.Q5_1: q5_1, QType.Q8_0: q8_0,
    QType.Q2_K: q2_k, QType.Q3_K: q3_k, QType.Q4_K: q4_k, QType.Q5_K: q5_k, QType.Q6_K: q6_k,
}
