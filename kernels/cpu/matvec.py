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
- the fp16 scales decode with one `fpext half` (kernels.cpu.fp16), not math.ldexp (5x).
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
                                 Q8_0_D, Q8_0_QS, Q8_0_SIZE, k_scale_min, q5_high_bits)
from kernels.cpu import lanes
from kernels.cpu.fp16 import fp16_at
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
def k_group_dot(row, at, shift, qh_at, bit, x, xo, half):
    """One Q4_K/Q5_K group of 32: sum of q * x with q the nibble at `shift` of row[at + j], plus 16
    where row[qh_at + j] has `bit` set (Q5_K; bit 0 for Q4_K)."""
    s = F32(0)
    for j in range(2 * half):
        q = F32((row[at + j] >> shift) & 0x0F)
        if row[qh_at + j] & bit:
            q += F32(16)
        s += q * x[xo + j]
    return s


@numba.njit(inline="always", fastmath=FAST, cache=True)
def k_block_dot(row, b, d_at, dmin_at, scales_at, qs_at, qh_at, x, xo, xsum, g0, half):
    """Q4_K (qh_at = -1) or Q5_K block at row[b]: 8 groups of 32,
    (d * scale) * sum(q * x) - (dmin * min) * sum(x)."""
    d, dmin = fp16_at(row, b + d_at), fp16_at(row, b + dmin_at)
    s = F32(0)
    for c in range(4):  # 32 bytes of qs: group 2c in the low nibbles, 2c + 1 in the high
        at = b + qs_at + 32 * c
        qh = b + qh_at if qh_at >= 0 else at  # Q4_K: any bytes, tested against bit 0
        lo_bit = np.uint8(1 << (2 * c)) if qh_at >= 0 else np.uint8(0)
        hi_bit = np.uint8(2 << (2 * c)) if qh_at >= 0 else np.uint8(0)
        sc, m = k_scale_min(row, b + scales_at, 2 * c)
        s += (d * F32(sc) * k_group_dot(row, at, 0, qh, lo_bit, x, xo + 64 * c, half)
              - dmin * F32(m) * xsum[g0 + 2 * c])
        sc, m = k_scale_min(row, b + scales_at, 2 * c + 1)
        s += (d * F32(sc) * k_group_dot(row, at, 4, qh, hi_bit, x, xo + 64 * c + 32, half)
              - dmin * F32(m) * xsum[g0 + 2 * c + 1])
    return s


@numba.njit(inline="always", fastmath=FAST, cache=True)
def q6_k_quarter_dot(row, ql_at, qh_at, lo_shift, hi_shift, scales, g, d, x, xo, half):
    """Two Q6_K groups of 16 (32 weights): q = nibble at `lo_shift` of ql | 2 bits at `hi_shift`
    of qh, w = (d * scale) * (q - 32)."""
    s = F32(0)
    for h in range(2):
        dot = F32(0)
        for j in range(half):
            q = ((row[ql_at + 16 * h + j] >> lo_shift) & 0x0F) | (((row[qh_at + 16 * h + j] >> hi_shift) & 3) << 4)
            dot += (F32(q) - F32(32)) * x[xo + 16 * h + j]
        s += d * F32(scales[g + h]) * dot
    return s


@numba.njit(inline="always", fastmath=FAST, cache=True)
def q6_k_block_dot(row, blk, x, half):
    """16 groups of 16; each half of 128 weights in four quarters (see reference.dequant.q6_k)."""
    b = blk * Q6_K_SIZE
    d = fp16_at(row, b + Q6_K_D)
    scales = row[b + Q6_K_SCALES:b + Q6_K_SCALES + 16].view(np.int8)
    s = F32(0)
    for hf in range(2):
        ql, qh, xo, g = b + Q6_K_QL + 64 * hf, b + Q6_K_QH + 32 * hf, blk * QK_K + 128 * hf, 8 * hf
        s += q6_k_quarter_dot(row, ql, qh, 0, 0, scales, g, d, x, xo, half)
        s += q6_k_quarter_dot(row, ql + 32, qh, 0, 2, scales, g + 2, d, x, xo + 32, half)
        s += q6_k_quarter_dot(row, ql, qh, 4, 4, scales, g + 4, d, x, xo + 64, half)
        s += q6_k_quarter_dot(row, ql + 32, qh, 4, 6, scales, g + 6, d, x, xo + 96, half)
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
        lanes.prefetch_row(rows, r + 1)
        row = rows[r]
        s = F32(0)
        if qtype == Q4_K_ID:
            for blk in range(x.size // QK_K):
                s += k_block_dot(row, blk * Q4_K_SIZE, Q4_K_D, Q4_K_DMIN, Q4_K_SCALES, Q4_K_QS, -1,
                                 x, blk * QK_K, xsum, 8 * blk, half)
        elif qtype == Q6_K_ID:
            for blk in range(x.size // QK_K):
                s += q6_k_block_dot(row, blk, x, half)
        elif qtype == Q5_K_ID:
            for blk in range(x.size // QK_K):
                s += k_block_dot(row, blk * Q5_K_SIZE, Q5_K_D, Q5_K_DMIN, Q5_K_SCALES, Q5_K_QS,
                                 Q5_K_QH, x, blk * QK_K, xsum, 8 * blk, half)
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
