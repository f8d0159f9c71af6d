"""Fused dequantize-and-multiply for decode: out = W @ x with W still in its block format.

One kernel for every format, parallel over output rows. Each row is a sum of per-block dot
products (`*_block_dot`, the counterparts of llama.cpp's `ggml_vec_dot_*`), computed in float32
from the unpacked integers and the activations, so results match the float64 reference to ~1e-6
relative. Terms that do not depend on the weights (`d * q + m` needs sum(x) per block) use block
sums of x computed once per call. See docs/kernels.md for the measured throughput.

Two Numba habits make the inner loops vectorize (measured; see docs/kernels.md):
- the half-block length arrives as a run-time argument (`half`, always 16): with a constant trip
  count LLVM fully unrolls the 16-iteration loops before its loop vectorizer runs, and the code
  stays scalar (4x slower);
- the fp16 scales decode through a table (kernels.cpu.fp16), not math.ldexp (5x).
"""
import numba
import numpy as np
from gguf import GGMLQuantizationType as QType
from numba import prange

from kernels.cpu.dequant import (Q4_0_D, Q4_0_QS, Q4_0_SIZE, Q4_1_D, Q4_1_M, Q4_1_QS, Q4_1_SIZE,
                                 Q4_K_D, Q4_K_DMIN, Q4_K_QS, Q4_K_SCALES, Q4_K_SIZE, Q5_0_D,
                                 Q5_0_QH, Q5_0_QS, Q5_0_SIZE, Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS,
                                 Q5_1_SIZE, Q5_K_D, Q5_K_DMIN, Q5_K_QH, Q5_K_QS, Q5_K_SCALES,
                                 Q5_K_SIZE, Q6_K_D, Q6_K_QH, Q6_K_QL, Q6_K_SCALES, Q6_K_SIZE,
                                 Q8_0_D, Q8_0_QS, Q8_0_SIZE, fp16_at, k_scale_min, q5_high_bits)
from kernels.formats import QK, QK_K

F32 = np.float32
FAST = {"reassoc", "contract", "nsz", "arcp", "afn"}  # reassociate sums; keep NaN/inf semantics
F32_ID, F16_ID, Q4_0_ID, Q4_1_ID, Q5_0_ID, Q5_1_ID, Q8_0_ID, Q4_K_ID, Q5_K_ID, Q6_K_ID = (
    int(t) for t in (QType.F32, QType.F16, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1,
                     QType.Q8_0, QType.Q4_K, QType.Q5_K, QType.Q6_K))
SUPPORTED = (QType.F32, QType.F16, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0,
             QType.Q4_K, QType.Q5_K, QType.Q6_K)


@numba.njit(inline="always", fastmath=FAST, cache=True)
def nibble_dot(row, at, x, xo, half):
    """sum of (low nibble of row[at + j]) * x[xo + j] + (high nibble) * x[xo + half + j], j < half."""
    s = F32(0)
    for j in range(half):
        q = row[at + j]
        s += F32(q & 0x0F) * x[xo + j] + F32(q >> 4) * x[xo + half + j]
    return s


@numba.njit(inline="always", fastmath=FAST, cache=True)
def q5_dot(row, at, high, x, xo, half):
    """As nibble_dot with a fifth bit per weight: bit j of `high` for weight j (32 weights)."""
    s = F32(0)
    for j in range(half):
        q = row[at + j]
        lo = F32((q & 0x0F) | (((high >> j) & 1) << 4))
        hi = F32((q >> 4) | (((high >> (j + half)) & 1) << 4))
        s += lo * x[xo + j] + hi * x[xo + half + j]
    return s


@numba.njit(inline="always", fastmath=FAST, cache=True)
def q4_0_block_dot(row, blk, x, xsum, half):
    b = blk * Q4_0_SIZE
    return fp16_at(row, b + Q4_0_D) * (nibble_dot(row, b + Q4_0_QS, x, blk * QK, half)
                                       - F32(8) * xsum[blk])


@numba.njit(inline="always", fastmath=FAST, cache=True)
def q4_1_block_dot(row, blk, x, xsum, half):
    b = blk * Q4_1_SIZE
    return (fp16_at(row, b + Q4_1_D) * nibble_dot(row, b + Q4_1_QS, x, blk * QK, half)
            + fp16_at(row, b + Q4_1_M) * xsum[blk])


@numba.njit(inline="always", fastmath=FAST, cache=True)
def q5_0_block_dot(row, blk, x, xsum, half):
    b = blk * Q5_0_SIZE
    high = q5_high_bits(row, b + Q5_0_QH)
    return fp16_at(row, b + Q5_0_D) * (q5_dot(row, b + Q5_0_QS, high, x, blk * QK, half)
                                       - F32(16) * xsum[blk])


@numba.njit(inline="always", fastmath=FAST, cache=True)
def q5_1_block_dot(row, blk, x, xsum, half):
    b = blk * Q5_1_SIZE
    high = q5_high_bits(row, b + Q5_1_QH)
    return (fp16_at(row, b + Q5_1_D) * q5_dot(row, b + Q5_1_QS, high, x, blk * QK, half)
            + fp16_at(row, b + Q5_1_M) * xsum[blk])


@numba.njit(inline="always", fastmath=FAST, cache=True)
def q8_0_block_dot(row, blk, x, half):
    b = blk * Q8_0_SIZE
    signed = row[b + Q8_0_QS:b + Q8_0_QS + 2 * half].view(np.int8)
    s = F32(0)
    for j in range(2 * half):
        s += F32(signed[j]) * x[blk * QK + j]
    return fp16_at(row, b + Q8_0_D) * s


@numba.njit(inline="always", fastmath=FAST, cache=True)
def k_nibble_dot(row, at, shift, x, xo, half):
    """sum of (row[at + j] >> shift & 15) * x[xo + j] over the 2 * half bytes of a Q4_K group."""
    s = F32(0)
    for j in range(2 * half):
        s += F32((row[at + j] >> shift) & 0x0F) * x[xo + j]
    return s


@numba.njit(inline="always", fastmath=FAST, cache=True)
def q4_k_block_dot(row, blk, x, xsum, half):
    """8 groups of 32: (d * scale) * sum(q * x) - (dmin * min) * sum(x)."""
    b, xo = blk * Q4_K_SIZE, blk * QK_K
    d, dmin = fp16_at(row, b + Q4_K_D), fp16_at(row, b + Q4_K_DMIN)
    s = F32(0)
    for c in range(4):  # 32 bytes: group 2c in the low nibbles, 2c + 1 in the high
        at = b + Q4_K_QS + 32 * c
        for h in range(2):
            sc, m = k_scale_min(row, b + Q4_K_SCALES, 2 * c + h)
            g = 8 * blk + 2 * c + h
            dot = k_nibble_dot(row, at, 4 * h, x, xo + 64 * c + 32 * h, half)
            s += d * F32(sc) * dot - dmin * F32(m) * xsum[g]
    return s


@numba.njit(inline="always", fastmath=FAST, cache=True)
def q5_k_block_dot(row, blk, x, xsum, half):
    """As Q4_K with the fifth bit of weight j of group g in bit g of qh[j]."""
    b, xo = blk * Q5_K_SIZE, blk * QK_K
    d, dmin = fp16_at(row, b + Q5_K_D), fp16_at(row, b + Q5_K_DMIN)
    s = F32(0)
    for g in range(8):
        sc, m = k_scale_min(row, b + Q5_K_SCALES, g)
        at, shift = b + Q5_K_QS + 32 * (g // 2), 4 * (g % 2)
        dot = F32(0)
        for j in range(2 * half):
            q = ((row[at + j] >> shift) & 0x0F) | (((row[b + Q5_K_QH + j] >> g) & 1) << 4)
            dot += F32(q) * x[xo + 32 * g + j]
        s += d * F32(sc) * dot - dmin * F32(m) * xsum[8 * blk + g]
    return s


@numba.njit(inline="always", fastmath=FAST, cache=True)
def q6_k_block_dot(row, blk, x, half):
    """16 groups of 16: (d * scale) * sum((q - 32) * x); see kernels.reference.dequant.q6_k."""
    b, xo = blk * Q6_K_SIZE, blk * QK_K
    d = fp16_at(row, b + Q6_K_D)
    scales = row[b + Q6_K_SCALES:b + Q6_K_SCALES + 16].view(np.int8)
    s = F32(0)
    for g in range(16):
        hf, c, r = g // 8, (g // 2) % 4, 16 * (g % 2)
        ql_at = b + Q6_K_QL + 64 * hf + 32 * (c % 2) + r
        qh_at = b + Q6_K_QH + 32 * hf + r
        lo_shift, hi_shift = 4 * (c // 2), 2 * c
        dot = F32(0)
        for j in range(half):
            q = ((row[ql_at + j] >> lo_shift) & 0x0F) | (((row[qh_at + j] >> hi_shift) & 3) << 4)
            dot += (F32(q) - F32(32)) * x[xo + 16 * g + j]
        s += d * F32(scales[g]) * dot
    return s


@numba.njit(inline="always", fastmath=FAST, cache=True)
def f16_row_dot(row, x):
    s = F32(0)
    for j in range(x.size):
        s += fp16_at(row, 2 * j) * x[j]
    return s


@numba.njit(inline="always", fastmath=FAST, cache=True)
def f32_row_dot(row, x):
    values = row.view(np.float32)
    s = F32(0)
    for j in range(x.size):
        s += values[j] * x[j]
    return s


@numba.njit(parallel=True, fastmath=FAST, cache=True)
def matvec(rows, qtype, x, out, half):
    """out[r] = dot(dequantized row r, x).

    rows: uint8 (n_rows, row_bytes), read-only; qtype: GGML type id; x: float32 (n,); out: float32
    (n_rows,); half: 16 (QK // 2), passed at run time so LLVM vectorizes rather than unrolls.
    """
    xsum = np.empty(x.size // QK, F32)  # sum of x over each block of 32
    for blk in range(xsum.size):
        xsum[blk] = x[blk * QK:(blk + 1) * QK].sum()
    for r in prange(rows.shape[0]):
        row = rows[r]
        s = F32(0)
        if qtype == Q4_K_ID:
            for blk in range(x.size // QK_K):
                s += q4_k_block_dot(row, blk, x, xsum, half)
        elif qtype == Q6_K_ID:
            for blk in range(x.size // QK_K):
                s += q6_k_block_dot(row, blk, x, half)
        elif qtype == Q5_K_ID:
            for blk in range(x.size // QK_K):
                s += q5_k_block_dot(row, blk, x, xsum, half)
        elif qtype == Q8_0_ID:
            for blk in range(x.size // QK):
                s += q8_0_block_dot(row, blk, x, half)
        elif qtype == Q4_0_ID:
            for blk in range(x.size // QK):
                s += q4_0_block_dot(row, blk, x, xsum, half)
        elif qtype == Q4_1_ID:
            for blk in range(x.size // QK):
                s += q4_1_block_dot(row, blk, x, xsum, half)
        elif qtype == Q5_0_ID:
            for blk in range(x.size // QK):
                s += q5_0_block_dot(row, blk, x, xsum, half)
        elif qtype == Q5_1_ID:
            for blk in range(x.size // QK):
                s += q5_1_block_dot(row, blk, x, xsum, half)
        elif qtype == F16_ID:
            s = f16_row_dot(row, x)
        else:
            s = f32_row_dot(row, x)
        out[r] = s
