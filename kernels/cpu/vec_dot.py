"""Decode matvec with llama.cpp's numerics: x quantized to 8 bits once per call, integer dot products.

`MATVEC_Q8[qtype](rows, x, out)` computes what kernels.reference.vec_dot.matvec_q8 defines: the
activation blocks are bit-identical to llama.cpp's `quantize_row_q8_{0,1,K}_ref`, every per-block
integer sum is exact, and only the float combination of the sums with the scales is ordered
differently (~1e-6 relative). Types without a q8 path here (F32, F16, BF16, Q2_K, Q3_K) use the
float kernel, kernels.cpu.matvec.

Speed comes from small LLVM intrinsics that do one block's integer dot product as fixed-width
vector code (`dot_nibble_pairs`, `dot_fields`, `dot_bytes`, and `dot_q6_k` for a whole Q6_K
super-block): load the weight bytes, unpack the fields in byte lanes, multiply with the int8
activations and reduce to one int32.
They are written in target-independent LLVM vector IR; on x86 with AVX-512 VNNI LLVM turns the
unsigned-by-signed byte product and its reduction into `vpdpbusd`. Numba's own loop vectorizer
cannot do this: a 16- or 32-iteration block loop is either fully unrolled (and stays scalar) or,
with a run-time trip count, vectorized at 4 x 8 lanes and never entered. See docs/kernels-q8.md.
"""
import numba
import numpy as np
from gguf import GGMLQuantizationType as QType
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

from .dequant import k_scale_min, q5_high_bits
from . import FASTMATH, format_kernel, lanes
from .fp16 import f32_to_fp16_bits, fp16_at, half_to_float
from .quant import inverse, nearest_int, roundf
from ..formats import FORMATS, QK, QK_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K

F32 = np.float32
HALF = QK // 2  # bytes of 4-bit weights in a legacy block

# ------------------------------------------------------------------ LLVM vector intrinsics

def _reduce_products(builder, weights, x, n, weights_signed):
    """sum(weights * x) in int32 over two <n x i8>; x is signed. The zero-extended unsigned form
    is the pattern LLVM maps to vpdpbusd (u8 x s8 -> i32) on AVX-512 VNNI / AVX-VNNI."""
    wide = ir.VectorType(lanes.I32, n)
    extend = builder.sext if weights_signed else builder.zext
    return lanes.reduce_add(builder, builder.mul(extend(weights, wide), builder.sext(x, wide)))


@intrinsic
def dot_nibble_pairs(typingctx, w, at, high, x, x_at, n):
    """Integer dot product of a legacy block with 2n int8 activations x[x_at:x_at + 2n]:
    weight j < n is (w[at + j] & 15) | (bit j of high) << 4, weight n + j is
    (w[at + j] >> 4) | (bit n + j of high) << 4 (high = 0 for Q4_0/Q4_1, qh for Q5_0/Q5_1).
    n: a literal (16). Returns int32."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    width = n.literal_value

    def codegen(context, builder, signature, args):
        w_, at_, high_, x_, x_at_, _ = args
        packed = lanes.bytes_at(context, builder, signature.args[0], w_, at_, width)
        activations = lanes.bytes_at(context, builder, signature.args[3], x_, x_at_, 2 * width)
        return _reduce_products(builder, lanes.nibble_pairs(builder, packed, high_), activations,
                                2 * width, False)
    return types.int32(w, at, high, x, x_at, n), codegen


@intrinsic
def dot_fields(typingctx, w, at, shift, h, h_at, h_shift, h_mask, x, x_at, n):
    """Integer dot product of n k-quant weights with x[x_at:x_at + n] (int8), where weight j is
    ((w[at + j] >> shift) & 15) | ((h[h_at + j] >> h_shift) & h_mask) << 4: Q4_K (h_mask 0),
    Q5_K (its qh bits, h_mask 1). n: a literal. Returns int32."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    width = n.literal_value

    def codegen(context, builder, signature, args):
        w_, at_, shift_, h_, h_at_, h_shift_, h_mask_, x_, x_at_, _ = args
        low = lanes.bytes_at(context, builder, signature.args[0], w_, at_, width)
        high = lanes.bytes_at(context, builder, signature.args[3], h_, h_at_, width)
        weights = lanes.fields(builder, low, shift_, ir.Constant(lanes.I8, 15), high, h_shift_,
                               h_mask_, 4)
        activations = lanes.bytes_at(context, builder, signature.args[7], x_, x_at_, width)
        return _reduce_products(builder, weights, activations, width, False)
    return types.int32(w, at, shift, h, h_at, h_shift, h_mask, x, x_at, n), codegen


@intrinsic
def dot_q6_k(typingctx, w, at, ql_at, qh_at, scales_at, x, x_at):
    """sum over the 16 groups g of scales[g] * ((q - 32) . x) for the Q6_K super-block at w[at:]
    (its fields at at + ql_at / qh_at / scales_at) and the int8 activations x[x_at:x_at + 256].
    Exact in int32. One reduction: each scaled weight (q - 32) * scale fits in int16, so LLVM can
    multiply it with x as pairs of int16 products summed into int32 lanes (vpmaddwd)."""
    def codegen(context, builder, signature, args):
        w_, at_, ql_at_, qh_at_, scales_at_, x_, x_at_ = args
        w_type = signature.args[0]

        def field(offset, extra):
            return builder.add(at_, builder.add(offset, ir.Constant(at_.type, extra)))

        halves = [lanes.q6_k_half(context, builder, w_type, w_, field(ql_at_, 64 * h),
                                  field(qh_at_, 32 * h)) for h in range(2)]
        weights = lanes.concat(builder, *halves)
        i16s = ir.VectorType(ir.IntType(16), 256)
        scale_bytes = lanes.bytes_at(context, builder, w_type, w_, field(scales_at_, 0), 16)
        scales = builder.sext(scale_bytes, ir.VectorType(ir.IntType(16), 16))
        scale_per_weight = lanes.pick(builder, scales, [j // 16 for j in range(256)])
        scaled = builder.mul(builder.sext(weights, i16s), scale_per_weight)
        activations = lanes.bytes_at(context, builder, signature.args[5], x_, x_at_, 256)
        i32s = ir.VectorType(lanes.I32, 256)
        return lanes.reduce_add(builder, builder.mul(builder.sext(scaled, i32s),
                                                     builder.sext(activations, i32s)))
    return types.int32(w, at, ql_at, qh_at, scales_at, x, x_at), codegen


@intrinsic
def dot_bytes(typingctx, w, at, x, x_at, n):
    """sum of int8(w[at + j]) * x[x_at + j], j < n (Q8_0 weights). n: a literal. Returns int32."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    width = n.literal_value

    def codegen(context, builder, signature, args):
        w_, at_, x_, x_at_, _ = args
        weights = lanes.bytes_at(context, builder, signature.args[0], w_, at_, width)
        activations = lanes.bytes_at(context, builder, signature.args[2], x_, x_at_, width)
        return _reduce_products(builder, weights, activations, width, True)
    return types.int32(w, at, x, x_at, n), codegen


# ------------------------------------------------------------------ activation quantizers
# Bit-identical to llama.cpp's quantize_row_q8_*_ref (and kernels.reference.vec_dot): no fastmath.
# Outputs: qs int8 (n,); d float32 per block (Q8_0/Q8_1: the fp16-rounded value the dot product
# uses); s float32 per block (Q8_1's fp16 d * sum(q); unused otherwise); sums int32: per block of
# 32 for Q8_0/Q8_1, per 16 (llama.cpp's bsums) for Q8_K.

@numba.njit(cache=True)
def quantize_q8_0(x, qs, d, s, sums):
    for b in range(x.size // QK):
        amax = F32(0)
        for j in range(b * QK, (b + 1) * QK):
            amax = max(amax, abs(x[j]))
        scale = amax / F32(127)
        inv = inverse(scale)
        total = 0
        for j in range(b * QK, (b + 1) * QK):
            q = int(roundf(x[j] * inv))
            qs[j] = q
            total += q
        d[b] = half_to_float(f32_to_fp16_bits(scale))
        s[b] = half_to_float(f32_to_fp16_bits(F32(total) * scale))
        sums[b] = total


@numba.njit(cache=True)
def quantize_q8_k(x, qs, d, s, sums):
    for b in range(x.size // QK_K):
        amax, peak = F32(0), F32(0)
        for j in range(b * QK_K, (b + 1) * QK_K):
            if abs(x[j]) > amax:
                amax, peak = abs(x[j]), x[j]
        if amax == 0:
            qs[b * QK_K:(b + 1) * QK_K] = 0
            sums[b * 16:(b + 1) * 16] = 0
            d[b] = 0
            continue
        iscale = F32(-127) / peak
        for g in range(b * 16, (b + 1) * 16):
            total = 0
            for j in range(16 * g, 16 * g + 16):
                q = min(127, nearest_int(iscale * x[j]))
                qs[j] = q
                total += q
            sums[g] = total
        d[b] = F32(1) / iscale
        s[b] = 0


# ------------------------------------------------------------------ one row per format

@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def q4_0_row(row, xq, xd, xs, xsum):
    s = F32(0)
    for b in range(xd.size):
        at = b * Q4_0.size
        sumi = dot_nibble_pairs(row, at + Q4_0.qs, 0, xq, b * QK, HALF) - 8 * xsum[b]
        s += fp16_at(row, at + Q4_0.d) * xd[b] * F32(sumi)
    return s


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def q5_0_row(row, xq, xd, xs, xsum):
    s = F32(0)
    for b in range(xd.size):
        at = b * Q5_0.size
        high = q5_high_bits(row, at + Q5_0.qh)
        sumi = dot_nibble_pairs(row, at + Q5_0.qs, high, xq, b * QK, HALF) - 16 * xsum[b]
        s += fp16_at(row, at + Q5_0.d) * xd[b] * F32(sumi)
    return s


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def affine_row(row, size, d_at, m_at, qs_at, qh_at, xq, xd, xs):
    """Q4_1 (qh_at < 0) and Q5_1: sum of (d * d_x) * sumi + m * s_x over the blocks."""
    s, sm = F32(0), F32(0)
    for b in range(xd.size):
        at = b * size
        high = q5_high_bits(row, at + qh_at) if qh_at >= 0 else np.uint32(0)
        sumi = dot_nibble_pairs(row, at + qs_at, high, xq, b * QK, HALF)
        s += fp16_at(row, at + d_at) * xd[b] * F32(sumi)
        sm += fp16_at(row, at + m_at) * xs[b]
    return s + sm


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def q8_0_row(row, xq, xd, xs, xsum):
    s = F32(0)
    for b in range(xd.size):
        at = b * Q8_0.size
        s += fp16_at(row, at + Q8_0.d) * xd[b] * F32(dot_bytes(row, at + Q8_0.qs, xq, b * QK, QK))
    return s


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def k_groups(row, at, scales_at, qs_at, qh_at, high_mask, xq, xo, xsum, first, last):
    """(sum of scale * (q . x), sum of min * bsums) over the groups first..last - 1 of a Q4_K /
    Q5_K super-block. Called for groups 0-3 and 4-7 apart so that k_scale_min's branch folds."""
    sumi, summ = 0, 0
    for g in range(first, last):
        scale, minimum = k_scale_min(row, at + scales_at, g)
        dot = dot_fields(row, at + qs_at + 32 * (g // 2), 4 * (g % 2),
                         row, at + qh_at, g, high_mask, xq, xo + 32 * g, 32)
        sumi += np.int32(scale) * dot
        summ += np.int32(minimum) * (xsum[xo // 16 + 2 * g] + xsum[xo // 16 + 2 * g + 1])
    return sumi, summ


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def q4_k_q5_k_row(row, size, d_at, dmin_at, scales_at, qs_at, qh_at, xq, xd, xsum):
    """8 groups of 32 per super-block: d * sum(scale * q . x) - dmin * sum(min * bsums);
    Q5_K's fifth bit of weight j of group g is bit g of qh[j] (qh_at < 0: Q4_K)."""
    s, sm = F32(0), F32(0)
    high_mask, qh_at = (1, qh_at) if qh_at >= 0 else (0, 0)
    for b in range(xd.size):
        at, xo = b * size, b * QK_K
        sumi0, summ0 = k_groups(row, at, scales_at, qs_at, qh_at, high_mask, xq, xo, xsum, 0, 4)
        sumi1, summ1 = k_groups(row, at, scales_at, qs_at, qh_at, high_mask, xq, xo, xsum, 4, 8)
        s += fp16_at(row, at + d_at) * xd[b] * F32(sumi0 + sumi1)
        sm += fp16_at(row, at + dmin_at) * xd[b] * F32(summ0 + summ1)
    return s - sm


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def q6_k_row(row, xq, xd, xs, xsum):
    """16 groups of 16 per super-block: d * sum(scale * ((q - 32) . x))."""
    s = F32(0)
    for b in range(xd.size):
        at = b * Q6_K.size
        sumi = dot_q6_k(row, at, Q6_K.ql, Q6_K.qh, Q6_K.scales, xq, b * QK_K)
        s += fp16_at(row, at + Q6_K.d) * xd[b] * F32(sumi)
    return s


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def q4_1_row(row, xq, xd, xs, xsum):
    return affine_row(row, Q4_1.size, Q4_1.d, Q4_1.m, Q4_1.qs, -1, xq, xd, xs)


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def q5_1_row(row, xq, xd, xs, xsum):
    return affine_row(row, Q5_1.size, Q5_1.d, Q5_1.m, Q5_1.qs, Q5_1.qh, xq, xd, xs)


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def q4_k_row(row, xq, xd, xs, xsum):
    return q4_k_q5_k_row(row, Q4_K.size, Q4_K.d, Q4_K.dmin, Q4_K.scales, Q4_K.qs, -1, xq, xd, xsum)


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def q5_k_row(row, xq, xd, xs, xsum):
    return q4_k_q5_k_row(row, Q5_K.size, Q5_K.d, Q5_K.dmin, Q5_K.scales, Q5_K.qs, Q5_K.qh,
                         xq, xd, xsum)


# Each format's row kernel, and the activation blocks it dots with: super-blocks of QK_K (Q8_K)
# for the k-quants, blocks of QK (Q8_0, or Q8_1 whose sums xs the affine formats use) otherwise.
Q8_ROW_DOT = {QType.Q4_0: q4_0_row, QType.Q4_1: q4_1_row, QType.Q5_0: q5_0_row,
              QType.Q5_1: q5_1_row, QType.Q8_0: q8_0_row, QType.Q4_K: q4_k_row,
              QType.Q5_K: q5_k_row, QType.Q6_K: q6_k_row}
SUPPORTED = tuple(Q8_ROW_DOT)
SUPER_BLOCK_TYPES = tuple(t for t in Q8_ROW_DOT if FORMATS[t].block_size == QK_K)  # Q8_K partners


def q8_row_dot(qtype, row, xq, xd, xs, xsum):
    """row . x (float32) for a row of format `qtype` (a literal GGML type id) and the quantized
    activations xq, xd, xs, xsum (see quantize_q8_0 / quantize_q8_k): Q8_ROW_DOT's entry."""
    raise NotImplementedError("called from Numba code only")


@overload(q8_row_dot)
def _q8_row_dot(qtype, row, xq, xd, xs, xsum):
    impl = format_kernel(Q8_ROW_DOT, qtype, "q8 matvec")
    return lambda qtype, row, xq, xd, xs, xsum: impl(row, xq, xd, xs, xsum)


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def matvec_blocks(rows, qtype, xq, xd, xs, xsum, out):
    """out[r] = row r . x for activations already quantized (see quantize_activations); qtype:
    the rows' format, a literal (each format compiles its own kernel)."""
    for r in prange(rows.shape[0]):
        lanes.prefetch_row(rows, r + 1)
        out[r] = q8_row_dot(numba.literally(qtype), rows[r], xq, xd, xs, xsum)


def _matvec_q8_kernel(qtype: int):
    """The q8 matvec of one format (`qtype` a closure constant: see matvec._matvec_kernel).

    The activations are quantized here, outside any fastmath function: Numba compiles (and
    caches) a function called from a fastmath kernel with the caller's flags, and contracting
    llama.cpp's rounding `(v + 1.5 * 2^23) - 1.5 * 2^23` into an FMA changes the quantized
    values."""
    super_blocks = QType(qtype) in SUPER_BLOCK_TYPES

    @numba.njit(cache=True)
    def matvec_q8(rows, x, out):
        xq, xd, xs, xsum = quantize_activations(x, super_blocks)
        matvec_blocks(rows, qtype, xq, xd, xs, xsum, out)
    return matvec_q8


# out = W @ x with llama.cpp's numerics (x quantized once to Q8_0 / Q8_1 / Q8_K), one kernel per
# format: MATVEC_Q8[qtype](rows, x, out) with rows uint8 (n_rows, row_bytes), read-only; x float32
# (n,), n a multiple of the block size; out float32 (n_rows,).
MATVEC_Q8 = {t: _matvec_q8_kernel(int(t)) for t in Q8_ROW_DOT}


@numba.njit(cache=True)
def quantize_activations(x, super_blocks):
    """x (float32 (n,)) as 8-bit activation blocks: Q8_K when `super_blocks`, else Q8_0 with
    Q8_1's sums. Returns (qs int8 (n,), d float32, s float32 per block, sums int32)."""
    block = QK_K if super_blocks else QK
    n_blocks = x.size // block
    xq = np.empty(x.size, np.int8)
    xd = np.empty(n_blocks, F32)
    xs = np.empty(n_blocks, F32)
    if super_blocks:
        xsum = np.empty(x.size // 16, np.int32)
        quantize_q8_k(x, xq, xd, xs, xsum)
    else:
        xsum = np.empty(n_blocks, np.int32)
        quantize_q8_0(x, xq, xd, xs, xsum)
    return xq, xd, xs, xsum


@numba.njit(inline="always", cache=True)
def round_trip_q8_k_block(x, out):
    """out = the 256 values x (float32) holds as a Q8_K block, q * d: q = min(127,
    nearest_int(iscale * x)), iscale = -127 / (the first x of largest magnitude), d = 1 / iscale
    (quantize_q8_k, written so that LLVM vectorizes it). The sign of that x matters only to
    the zeros: 0 * d is +0 or -0."""
    high, low = F32(0), F32(0)
    for j in range(x.size):
        high, low = max(high, x[j]), min(low, x[j])
    if high == -low:  # a tie between +m and -m: the first of them (or all zeros)
        peak = high
        for j in range(x.size):
            if abs(x[j]) == high:
                peak = x[j]
                break
    else:
        peak = high if high > -low else low
    if peak == 0:
        out[:] = 0
        return
    iscale = F32(-127) / peak
    d = F32(1) / iscale
    for j in range(x.size):
        out[j] = F32(min(127, nearest_int(iscale * x[j]))) * d


@numba.njit(inline="always", cache=True)
def round_trip_q8_0_block(x, out):
    """out = the 32 values x (float32) holds as a Q8_0 block: roundf(x / scale) * fp16(scale),
    scale = max|x| / 127 (quantize_q8_0, written so that LLVM vectorizes it)."""
    amax = F32(0)
    for j in range(x.size):
        amax = max(amax, abs(x[j]))
    scale = amax / F32(127)
    inv, d = inverse(scale), half_to_float(f32_to_fp16_bits(scale))
    for j in range(x.size):
        out[j] = roundf(x[j] * inv) * d


@numba.njit(cache=True)
def round_trip_q8(x, super_blocks, out):
    """out[t] = x[t] as llama.cpp's 8-bit activation blocks hold it (q * d per block): Q8_K when
    `super_blocks` (for k-quant weights), else Q8_0 (Q8_1 stores the same values). Prefill with
    llama.cpp numerics multiplies these with dequantized weights. x, out: float32 (T, n).
    Serial on purpose: ~0.2 ms for 64 x 2048, while a parallel region here left Numba's OpenMP
    workers spinning on the cores the prefill's BLAS threads then needed (+3 ms a matmul)."""
    block = QK_K if super_blocks else QK
    per_row = x.shape[1] // block
    for i in range(x.shape[0] * per_row):
        t, b = i // per_row, i % per_row
        x_block, out_block = x[t, b * block:(b + 1) * block], out[t, b * block:(b + 1) * block]
        if super_blocks:
            round_trip_q8_k_block(x_block, out_block)
        else:
            round_trip_q8_0_block(x_block, out_block)
