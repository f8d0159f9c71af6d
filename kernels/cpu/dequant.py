"""Numba CPU dequantizers, one per block format, parallel over blocks.

Each kernel `name(raw, out)` reads whole blocks from `raw` (uint8, flat) and writes their weights
to `out` (float32, flat, `n_blocks * block_size`). Byte offsets come from kernels.formats; the
arithmetic follows llama.cpp's `dequantize_row_*` operation for operation, so the results are
bit-identical to the NumPy reference (no fastmath: reassociating or fusing would change bits).
"""
import numba
import numpy as np
from gguf import GGMLQuantizationType as QType
from numba import prange, types
from numba.extending import intrinsic

from . import lanes
from .fp16 import fp16_at, half_to_float
from ..formats import QK, QK_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K

F32 = np.float32


@numba.njit(inline="always", cache=True)
def k_scale_min(raw, at, g):
    """Six-bit scale and min of group `g` (0-7) from Q4_K/Q5_K's 12 packed bytes at `raw[at]`."""
    # Both branches return int32: mixed integer types would make Numba unify them as float64.
    if g < 4:
        return np.int32(raw[at + g] & 63), np.int32(raw[at + g + 4] & 63)
    scale = (raw[at + g + 4] & 0x0F) | ((raw[at + g - 4] >> 6) << 4)
    minimum = (raw[at + g + 4] >> 4) | ((raw[at + g] >> 6) << 4)
    return np.int32(scale), np.int32(minimum)


@numba.njit(parallel=True, nogil=True, cache=True)
def _widen_f16(bits, out):
    for i in prange(out.size):
        out[i] = half_to_float(bits[i])


@numba.njit(nogil=True, cache=True)
def f16(raw, out):
    _widen_f16(raw.view(np.uint16), out)


@numba.njit(parallel=True, nogil=True, cache=True)
def _widen_bf16(bits, wide):
    for i in prange(wide.size):
        wide[i] = np.uint32(bits[i]) << 16


@numba.njit(nogil=True, cache=True)
def bf16(raw, out):
    # The views are made outside the parallel loop: Numba 0.68 drops stores made inside a prange
    # body through a view created in the same function.
    _widen_bf16(raw.view(np.uint16), out.view(np.uint32))


# The quantized formats write each run of weights that shares a scale (a legacy block, a k-quant
# group) with one intrinsic that unpacks it in byte lanes (kernels.cpu.lanes) and stores float32
# vectors: Numba's own loop vectorizer left the 16-weight loops scalar, and even the 32-weight
# ones ran at half the speed (measured with the output in cache, 2 threads: Q4_K 48 -> 81 GB/s
# of float32 written). Integer offsets (q - 8, q - 32) are applied in the integer lanes, which is
# exact, so the float operations and their bits are llama.cpp's.

@intrinsic
def dequantize_nibble_pairs(typingctx, raw, at, high, offset, d, m, out, o):
    """out[o + j] = d * (q_j - offset) + m, j < 32, for the legacy block whose 16 packed bytes
    are raw[at:at + 16] and whose fifth bits are `high` (0 for Q4_0/Q4_1; see
    lanes.nibble_pairs). offset: a literal; m: float32, or None for no addition."""
    if not isinstance(offset, types.IntegerLiteral):
        return None

    def codegen(context, builder, signature, args):
        raw_, at_, high_, _, d_, m_, out_, o_ = args
        packed = lanes.bytes_at(context, builder, signature.args[0], raw_, at_, QK // 2)
        weights = builder.sub(lanes.nibble_pairs(builder, packed, high_),
                              lanes.constant(QK, offset.literal_value))
        lanes.store_scaled(context, builder, signature.args[6], out_, o_, weights, d_,
                           None if isinstance(m, types.NoneType) else m_)
        return context.get_dummy_value()
    return types.none(raw, at, types.uint32, offset, types.float32,
                      m if isinstance(m, types.NoneType) else types.float32, out, o), codegen


@intrinsic
def dequantize_fields(typingctx, raw, at, shift, low_mask, h_at, h_shift, h_mask, h_pos, offset,
                      scale, bias, out, o, n):
    """out[o + j] = scale * (q_j - offset) + bias, j < n, for the k-quant group whose weight j is
    ((raw[at + j] >> shift) & low_mask) | (((raw[h_at + j] >> h_shift) & h_mask) << h_pos)
    (lanes.fields). h_pos, offset, n: literals; scale: float32; bias: float32 or None."""
    if not all(isinstance(a, types.IntegerLiteral) for a in (h_pos, offset, n)):
        return None
    width = n.literal_value

    def codegen(context, builder, signature, args):
        raw_, at_, shift_, low_mask_, h_at_, h_shift_, h_mask_ = args[:7]
        scale_, bias_, out_, o_ = args[9:13]
        raw_type = signature.args[0]
        weights = lanes.fields(builder, lanes.bytes_at(context, builder, raw_type, raw_, at_, width),
                               shift_, low_mask_,
                               lanes.bytes_at(context, builder, raw_type, raw_, h_at_, width),
                               h_shift_, h_mask_, h_pos.literal_value)
        weights = builder.sub(weights, lanes.constant(width, offset.literal_value))
        lanes.store_scaled(context, builder, signature.args[11], out_, o_, weights, scale_,
                           None if isinstance(bias, types.NoneType) else bias_)
        return context.get_dummy_value()
    integer = types.intp
    return types.none(raw, integer, integer, integer, integer, integer, integer, h_pos, offset,
                      types.float32, bias if isinstance(bias, types.NoneType) else types.float32,
                      out, integer, n), codegen


@numba.njit(parallel=True, nogil=True, cache=True)
def q4_0(raw, out):
    for i in prange(raw.size // Q4_0.size):
        b = i * Q4_0.size
        dequantize_nibble_pairs(raw, b + Q4_0.qs, 0, 8, fp16_at(raw, b + Q4_0.d), None, out, i * QK)


@numba.njit(parallel=True, nogil=True, cache=True)
def q4_1(raw, out):
    for i in prange(raw.size // Q4_1.size):
        b = i * Q4_1.size
        dequantize_nibble_pairs(raw, b + Q4_1.qs, 0, 0, fp16_at(raw, b + Q4_1.d),
                                fp16_at(raw, b + Q4_1.m), out, i * QK)


@numba.njit(inline="always", cache=True)
def q5_high_bits(raw, at):
    """Q5_0/Q5_1's 32 fifth bits: the little-endian u32 at `raw[at]`, bit j for weight j."""
    return (np.uint32(raw[at]) | (np.uint32(raw[at + 1]) << 8) | (np.uint32(raw[at + 2]) << 16)
            | (np.uint32(raw[at + 3]) << 24))


@numba.njit(parallel=True, nogil=True, cache=True)
def q5_0(raw, out):
    for i in prange(raw.size // Q5_0.size):
        b = i * Q5_0.size
        dequantize_nibble_pairs(raw, b + Q5_0.qs, q5_high_bits(raw, b + Q5_0.qh), 16,
                                fp16_at(raw, b + Q5_0.d), None, out, i * QK)


@numba.njit(parallel=True, nogil=True, cache=True)
def q5_1(raw, out):
    for i in prange(raw.size // Q5_1.size):
        b = i * Q5_1.size
        dequantize_nibble_pairs(raw, b + Q5_1.qs, q5_high_bits(raw, b + Q5_1.qh), 0,
                                fp16_at(raw, b + Q5_1.d), fp16_at(raw, b + Q5_1.m), out, i * QK)


@numba.njit(parallel=True, nogil=True, cache=True)
def q8_0(raw, out):
    # A plain loop vectorizes here (int8 -> float32 needs no unpacking) once its length is a
    # run-time value: a constant 32 is fully unrolled and left scalar.
    signed, block = raw.view(np.int8), out.size // max(raw.size // Q8_0.size, 1)
    for i in prange(raw.size // Q8_0.size):
        b, y = i * Q8_0.size, i * QK
        d, qs = fp16_at(raw, b + Q8_0.d), signed[b + Q8_0.qs:b + Q8_0.qs + block]
        o = out[y:y + block]
        for j in range(block):
            o[j] = F32(qs[j]) * d


@numba.njit(inline="always", cache=True)
def q2_k_pair(raw, b, y, g, shift, d, dmin, out):
    """Groups g and g + 1 of the Q2_K block at raw[b:] (weights out[y:]): 16 weights each, 2 bits
    at `shift` of 32 bytes of qs."""
    q_at = b + Q2_K.qs + (g // 8) * 32
    for h in range(2):
        sc = raw[b + Q2_K.scales + g + h]
        dequantize_fields(raw, q_at + 16 * h, shift, 3, q_at, 0, 0, 0, 0, d * F32(sc & 0x0F),
                          -(dmin * F32(sc >> 4)), out, y + 16 * (g + h), 16)


@numba.njit(parallel=True, nogil=True, cache=True)
def q2_k(raw, out):
    for i in prange(raw.size // Q2_K.size):
        b, y = i * Q2_K.size, i * QK_K
        d, dmin = fp16_at(raw, b + Q2_K.d), fp16_at(raw, b + Q2_K.dmin)
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
    """Groups g and g + 1: 2 low bits at `shift`, and 4 more where hmask bit g // 2 is set; the
    weight is that minus 4."""
    q_at = b + Q3_K.qs + (g // 8) * 32
    for h in range(2):
        dequantize_fields(raw, q_at + 16 * h, shift, 3, b + Q3_K.hmask + 16 * h, g // 2, 1, 2, 4,
                          d * F32(q3_k_scale(raw, b + Q3_K.scales, g + h)), None, out,
                          y + 16 * (g + h), 16)


@numba.njit(parallel=True, nogil=True, cache=True)
def q3_k(raw, out):
    for i in prange(raw.size // Q3_K.size):
        b, y = i * Q3_K.size, i * QK_K
        d = fp16_at(raw, b + Q3_K.d)
        for half in range(2):
            g = 8 * half
            q3_k_pair(raw, b, y, g, 0, d, out)
            q3_k_pair(raw, b, y, g + 2, 2, d, out)
            q3_k_pair(raw, b, y, g + 4, 4, d, out)
            q3_k_pair(raw, b, y, g + 6, 6, d, out)


@numba.njit(inline="always", cache=True)
def k_group(raw, b, y, g, shift, d, dmin, scales_at, qs_at, qh_at, out):
    """Group g (32 weights) of the Q4_K (qh_at < 0) or Q5_K block at raw[b:]: nibbles at `shift`
    of 32 bytes of qs, and for Q5_K 16 more where bit g of the qh byte is set."""
    sc, m = k_scale_min(raw, b + scales_at, g)
    at = b + qs_at + 32 * (g // 2)
    if qh_at < 0:
        dequantize_fields(raw, at, shift, 15, at, 0, 0, 0, 0, d * F32(sc), -(dmin * F32(m)), out,
                          y + 32 * g, 32)
    else:
        dequantize_fields(raw, at, shift, 15, b + qh_at, g, 1, 4, 0, d * F32(sc), -(dmin * F32(m)),
                          out, y + 32 * g, 32)


@numba.njit(parallel=True, nogil=True, cache=True)
def q4_k(raw, out):
    for i in prange(raw.size // Q4_K.size):
        b, y = i * Q4_K.size, i * QK_K
        d, dmin = fp16_at(raw, b + Q4_K.d), fp16_at(raw, b + Q4_K.dmin)
        for c in range(4):  # 32 bytes: group 2c in the low nibbles, group 2c + 1 in the high
            k_group(raw, b, y, 2 * c, 0, d, dmin, Q4_K.scales, Q4_K.qs, -1, out)
            k_group(raw, b, y, 2 * c + 1, 4, d, dmin, Q4_K.scales, Q4_K.qs, -1, out)


@numba.njit(parallel=True, nogil=True, cache=True)
def q5_k(raw, out):
    for i in prange(raw.size // Q5_K.size):
        b, y = i * Q5_K.size, i * QK_K
        d, dmin = fp16_at(raw, b + Q5_K.d), fp16_at(raw, b + Q5_K.dmin)
        for c in range(4):
            k_group(raw, b, y, 2 * c, 0, d, dmin, Q5_K.scales, Q5_K.qs, Q5_K.qh, out)
            k_group(raw, b, y, 2 * c + 1, 4, d, dmin, Q5_K.scales, Q5_K.qs, Q5_K.qh, out)


@numba.njit(inline="always", cache=True)
def q6_k_quarter(raw, b, y, half, quarter, low_shift, high_shift, d, out):
    """32 weights of a half: low nibbles at `low_shift` of 32 ql bytes, 2 bits at `high_shift` of
    32 qh bytes, minus 32; a scale per 16."""
    ql_at = b + Q6_K.ql + 64 * half + 32 * (quarter % 2)
    qh_at = b + Q6_K.qh + 32 * half
    for h in range(2):
        g = 8 * half + 2 * quarter + h
        scale = d * F32(np.int8(raw[b + Q6_K.scales + g]))
        dequantize_fields(raw, ql_at + 16 * h, low_shift, 15, qh_at + 16 * h, high_shift, 3, 4, 32,
                          scale, None, out, y + 16 * g, 16)


@numba.njit(parallel=True, nogil=True, cache=True)
def q6_k(raw, out):
    for i in prange(raw.size // Q6_K.size):
        b, y = i * Q6_K.size, i * QK_K
        d = fp16_at(raw, b + Q6_K.d)
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
