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
    if g < 4:
        return raw[at + g] & 63, raw[at + g + 4] & 63
    scale = (raw[at + g + 4] & 0x0F) | ((raw[at + g - 4] >> 6) << 4)
    minimum = (raw[at + g + 4] >> 4) | ((raw[at + g] >> 6) << 4)
    return scale, minimum


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


@numba.njit(parallel=True, cache=True)
def q4_0(raw, out):
    for i in prange(raw.size // Q4_0_SIZE):
        b, y = i * Q4_0_SIZE, i * QK
        d = fp16_at(raw, b + Q4_0_D)
        for j in range(QK // 2):
            q = raw[b + Q4_0_QS + j]
            out[y + j] = d * F32(np.int32(q & 0x0F) - 8)
            out[y + j + QK // 2] = d * F32(np.int32(q >> 4) - 8)


@numba.njit(parallel=True, cache=True)
def q4_1(raw, out):
    for i in prange(raw.size // Q4_1_SIZE):
        b, y = i * Q4_1_SIZE, i * QK
        d, m = fp16_at(raw, b + Q4_1_D), fp16_at(raw, b + Q4_1_M)
        for j in range(QK // 2):
            q = raw[b + Q4_1_QS + j]
            out[y + j] = d * F32(q & 0x0F) + m
            out[y + j + QK // 2] = d * F32(q >> 4) + m


@numba.njit(inline="always", cache=True)
def q5_high_bits(raw, at):
    """Q5_0/Q5_1's 32 fifth bits, a little-endian u32 at `raw[at]`."""
    return (np.uint32(raw[at]) | (np.uint32(raw[at + 1]) << 8) | (np.uint32(raw[at + 2]) << 16)
            | (np.uint32(raw[at + 3]) << 24))


@numba.njit(parallel=True, cache=True)
def q5_0(raw, out):
    for i in prange(raw.size // Q5_0_SIZE):
        b, y = i * Q5_0_SIZE, i * QK
        d = fp16_at(raw, b + Q5_0_D)
        qh = q5_high_bits(raw, b + Q5_0_QH)
        for j in range(QK // 2):
            q = raw[b + Q5_0_QS + j]
            lo = np.int32(q & 0x0F) | np.int32(((qh >> j) & 1) << 4)
            hi = np.int32(q >> 4) | np.int32(((qh >> (j + QK // 2)) & 1) << 4)
            out[y + j] = d * F32(lo - 16)
            out[y + j + QK // 2] = d * F32(hi - 16)


@numba.njit(parallel=True, cache=True)
def q5_1(raw, out):
    for i in prange(raw.size // Q5_1_SIZE):
        b, y = i * Q5_1_SIZE, i * QK
        d, m = fp16_at(raw, b + Q5_1_D), fp16_at(raw, b + Q5_1_M)
        qh = q5_high_bits(raw, b + Q5_1_QH)
        for j in range(QK // 2):
            q = raw[b + Q5_1_QS + j]
            lo = np.int32(q & 0x0F) | np.int32(((qh >> j) & 1) << 4)
            hi = np.int32(q >> 4) | np.int32(((qh >> (j + QK // 2)) & 1) << 4)
            out[y + j] = d * F32(lo) + m
            out[y + j + QK // 2] = d * F32(hi) + m


@numba.njit(parallel=True, cache=True)
def q8_0(raw, out):
    signed = raw.view(np.int8)
    for i in prange(raw.size // Q8_0_SIZE):
        b, y = i * Q8_0_SIZE, i * QK
        d = fp16_at(raw, b + Q8_0_D)
        for j in range(QK):
            out[y + j] = F32(signed[b + Q8_0_QS + j]) * d


@numba.njit(parallel=True, cache=True)
def q2_k(raw, out):
    for i in prange(raw.size // Q2_K_SIZE):
        b, y = i * Q2_K_SIZE, i * QK_K
        d, dmin = fp16_at(raw, b + Q2_K_D), fp16_at(raw, b + Q2_K_DMIN)
        for g in range(16):  # group of 16 weights: 32-byte half g // 8, shift 2 * ((g // 2) % 4)
            sc = raw[b + Q2_K_SCALES + g]
            dl, ml = d * F32(sc & 0x0F), dmin * F32(sc >> 4)
            q_at = b + Q2_K_QS + (g // 8) * 32 + (g % 2) * 16
            shift = 2 * ((g // 2) % 4)
            for l in range(16):
                out[y + 16 * g + l] = dl * F32((raw[q_at + l] >> shift) & 3) - ml


@numba.njit(inline="always", cache=True)
def q3_k_scale(raw, at, g):
    """Six-bit scale of Q3_K group `g` (0-15), offset by 32, from the 12 bytes at `raw[at]`."""
    low = (raw[at + g % 8] >> (4 * (g // 8))) & 0x0F
    high = (raw[at + 8 + g % 4] >> (2 * (g // 4))) & 3
    return np.int32(low | (high << 4)) - 32


@numba.njit(parallel=True, cache=True)
def q3_k(raw, out):
    for i in prange(raw.size // Q3_K_SIZE):
        b, y = i * Q3_K_SIZE, i * QK_K
        d = fp16_at(raw, b + Q3_K_D)
        for g in range(16):  # same walk as Q2_K; the high bit of chunk g // 2 is hmask bit g // 2
            dl = d * F32(q3_k_scale(raw, b + Q3_K_SCALES, g))
            q_at = b + Q3_K_QS + (g // 8) * 32 + (g % 2) * 16
            h_at = b + Q3_K_HMASK + (g % 2) * 16
            shift, bit = 2 * ((g // 2) % 4), g // 2
            for l in range(16):
                q = np.int32((raw[q_at + l] >> shift) & 3)
                if not (raw[h_at + l] >> bit) & 1:
                    q -= 4
                out[y + 16 * g + l] = dl * F32(q)


@numba.njit(parallel=True, cache=True)
def q4_k(raw, out):
    for i in prange(raw.size // Q4_K_SIZE):
        b, y = i * Q4_K_SIZE, i * QK_K
        d, dmin = fp16_at(raw, b + Q4_K_D), fp16_at(raw, b + Q4_K_DMIN)
        for g in range(8):  # group of 32: 32-byte chunk g // 2, low nibbles if g even
            sc, m = k_scale_min(raw, b + Q4_K_SCALES, g)
            d1, m1 = d * F32(sc), dmin * F32(m)
            q_at, shift = b + Q4_K_QS + (g // 2) * 32, 4 * (g % 2)
            for l in range(32):
                out[y + 32 * g + l] = d1 * F32((raw[q_at + l] >> shift) & 0x0F) - m1


@numba.njit(parallel=True, cache=True)
def q5_k(raw, out):
    for i in prange(raw.size // Q5_K_SIZE):
        b, y = i * Q5_K_SIZE, i * QK_K
        d, dmin = fp16_at(raw, b + Q5_K_D), fp16_at(raw, b + Q5_K_DMIN)
        for g in range(8):
            sc, m = k_scale_min(raw, b + Q5_K_SCALES, g)
            d1, m1 = d * F32(sc), dmin * F32(m)
            q_at, shift = b + Q5_K_QS + (g // 2) * 32, 4 * (g % 2)
            for l in range(32):
                q = ((raw[q_at + l] >> shift) & 0x0F) | (((raw[b + Q5_K_QH + l] >> g) & 1) << 4)
                out[y + 32 * g + l] = d1 * F32(q) - m1


@numba.njit(parallel=True, cache=True)
def q6_k(raw, out):
    scales = raw.view(np.int8)
    for i in prange(raw.size // Q6_K_SIZE):
        b, y = i * Q6_K_SIZE, i * QK_K
        d = fp16_at(raw, b + Q6_K_D)
        for g in range(16):  # group of 16 in half h: quarter c uses ql nibble c // 2, qh bits 2c
            h, c, r = g // 8, (g // 2) % 4, 16 * (g % 2)
            dl = d * F32(scales[b + Q6_K_SCALES + g])
            ql_at = b + Q6_K_QL + 64 * h + 32 * (c % 2) + r
            qh_at = b + Q6_K_QH + 32 * h + r
            for l in range(16):
                low = (raw[ql_at + l] >> (4 * (c // 2))) & 0x0F
                high = (raw[qh_at + l] >> (2 * c)) & 3
                out[y + 16 * g + l] = dl * F32(np.int32(low | (high << 4)) - 32)


DEQUANTIZE = {
    QType.F16: f16, QType.BF16: bf16,
    QType.Q4_0: q4_0, QType.Q4_1: q4_1, QType.Q5_0: q5_0, QType.Q5_1: q5_1, QType.Q8_0: q8_0,
    QType.Q2_K: q2_k, QType.Q3_K: q3_k, QType.Q4_K: q4_k, QType.Q5_K: q5_k, QType.Q6_K: q6_k,
}
