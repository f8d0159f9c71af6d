"""Fused dequantize-and-multiply for decode: out = W @ x with W still in its block format.

One kernel for every format, parallel over output rows. Per block, an intrinsic unpacks the
weights in LLVM vector lanes (kernels.cpu.lanes), converts them to float32, scales them and
multiply-adds them with x into a row Accumulator: ACC_LANES float32 sums that stay in registers
from the row's first block to its last and are added together once. Everything is float32 and
only the order of operations differs from the float64 reference: ~1e-7 relative (the tests
allow 1e-5). See docs/kernels.md for the measured throughput.

Why intrinsics: Numba's loop vectorizer leaves a block's 16- or 32-weight loops scalar (fully
unrolled), and indexing raw[at + j] turns vector loads into byte-by-byte gathers, since Numba's
wraparound of negative indices hides that at + j >= 0 (Q6_K ran at 0.9 GB/s that way). And a
horizontal sum per block costs more than the block, hence the one accumulator per row.
"""
import numba
import numpy as np
from gguf import GGMLQuantizationType as QType
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from .dequant import (Q4_0_D, Q4_0_QS, Q4_0_SIZE, Q4_1_D, Q4_1_M, Q4_1_QS, Q4_1_SIZE,
                                 Q4_K_D, Q4_K_DMIN, Q4_K_QS, Q4_K_SCALES, Q4_K_SIZE, Q5_0_D,
                                 Q5_0_QH, Q5_0_QS, Q5_0_SIZE, Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS,
                                 Q5_1_SIZE, Q5_K_D, Q5_K_DMIN, Q5_K_QH, Q5_K_QS, Q5_K_SCALES,
                                 Q5_K_SIZE, Q6_K_D, Q6_K_QH, Q6_K_QL, Q6_K_SCALES, Q6_K_SIZE,
                                 Q8_0_D, Q8_0_QS, Q8_0_SIZE, q5_high_bits)
from . import lanes
from .fp16 import fp16_at, half_to_float
from ..formats import QK, QK_K

F32 = np.float32
FAST = {"reassoc", "contract", "nsz", "arcp", "afn"}  # reassociate sums; keep NaN/inf semantics
F32_ID, F16_ID, Q4_0_ID, Q4_1_ID, Q5_0_ID, Q5_1_ID, Q8_0_ID, Q4_K_ID, Q5_K_ID, Q6_K_ID = (
    int(t) for t in (QType.F32, QType.F16, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1,
                     QType.Q8_0, QType.Q4_K, QType.Q5_K, QType.Q6_K))
SUPPORTED = (QType.F32, QType.F16, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0,
             QType.Q4_K, QType.Q5_K, QType.Q6_K)

# ------------------------------------------------------------------ the row accumulator

# A legacy block's 32 weights: two AVX-512 registers, so two independent chains of FMAs.
ACC_LANES = 32
ACC_VECTOR = ir.VectorType(lanes.F32, ACC_LANES)


class Accumulator(types.Type):
    """A row's ACC_LANES running float32 sums as one Numba value (an LLVM <ACC_LANES x float>):
    Numba has no vector type, and this lets the block loops stay Python loops while the sums
    stay in registers between the intrinsics that update them."""

    def __init__(self):
        super().__init__(name=f"float32x{ACC_LANES}")


register_model(Accumulator)(lambda dmm, fe_type: models.PrimitiveModel(dmm, fe_type, ACC_VECTOR))
accumulator = Accumulator()


@intrinsic
def zero_accumulator(typingctx):
    """A new Accumulator, all lanes 0."""
    def codegen(context, builder, signature, args):
        return ir.Constant(ACC_VECTOR, [0.0] * ACC_LANES)
    return accumulator(), codegen


@intrinsic
def lane_sum(typingctx, acc):
    """float32 sum of an Accumulator's lanes (halving: the top half added to the bottom half)."""
    if acc != accumulator:
        return None

    def codegen(context, builder, signature, args):
        sums = args[0]
        while sums.type.count > 1:
            n = sums.type.count // 2
            sums = builder.fadd(lanes.pick(builder, sums, list(range(n))),
                                lanes.pick(builder, sums, list(range(n, 2 * n))))
        return builder.extract_element(sums, ir.Constant(lanes.I32, 0))
    return types.float32(acc), codegen


def _fma(builder, a, b, c):
    """a * b + c lane by lane with one rounding (llvm.fma); a, b, c: <n x float>."""
    fma = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(a.type, [a.type] * 3), f"llvm.fma.v{a.type.count}f32")
    return builder.call(fma, [a, b, c])


def _to_float(builder, integers, signed=True):
    """<n x float> of the integer lanes of `integers` (<n x i8>)."""
    convert = builder.sitofp if signed else builder.uitofp
    return convert(integers, ir.VectorType(lanes.F32, integers.type.count))


def _x_at(context, builder, x_type, x, xo, first, n):
    """<n x float>: x[xo + first:xo + first + n] (x: a float32 array value, xo: an index value)."""
    at = builder.add(xo, ir.Constant(xo.type, first))
    return lanes.vector_at(context, builder, x_type, x, at, n)


def _multiply_add(context, builder, acc, weights, x_type, x, xo):
    """acc + weights[j] * x[xo + j]: weights (<n x float>, n a multiple of ACC_LANES) folded into
    the accumulator's lanes ACC_LANES at a time."""
    for first in range(0, weights.type.count, ACC_LANES):
        acc = _fma(builder, lanes.pick(builder, weights, list(range(first, first + ACC_LANES))),
                   _x_at(context, builder, x_type, x, xo, first, ACC_LANES), acc)
    return acc


# ------------------------------------------------------------------ one block per intrinsic
# Each returns acc plus the block's weights w_j times x[xo + j], in the accumulator's lanes.

@intrinsic
def nibble_pairs_multiply_add(typingctx, acc, raw, at, high, d, bias, x, xo):
    """Q4_0, Q4_1, Q5_0, Q5_1: w_j = d * q_j + bias, j < 32, q_j unsigned, for the block whose 16
    packed bytes are raw[at:at + 16] and whose fifth bits are `high` (0 for Q4_0/Q4_1; see
    lanes.nibble_pairs). bias: -8 * d (Q4_0), -16 * d (Q5_0) or m (Q4_1, Q5_1): the offset goes
    into the FMA, where it is free, rather than into the integer lanes (two shuffles more)."""
    def codegen(context, builder, signature, args):
        acc_, raw_, at_, high_, d_, bias_, x_, xo_ = args
        packed = lanes.bytes_at(context, builder, signature.args[1], raw_, at_, QK // 2)
        q = _to_float(builder, lanes.nibble_pairs(builder, packed, high_), signed=False)
        weights = _fma(builder, q, lanes.splat(builder, d_, QK), lanes.splat(builder, bias_, QK))
        return _multiply_add(context, builder, acc_, weights, signature.args[6], x_, xo_)
    return accumulator(acc, raw, at, types.uint32, types.float32, types.float32, x, xo), codegen


@intrinsic
def q8_0_multiply_add(typingctx, acc, raw, at, d, x, xo):
    """Q8_0: w_j = d * int8(raw[at + j]), j < 32."""
    def codegen(context, builder, signature, args):
        acc_, raw_, at_, d_, x_, xo_ = args
        q = _to_float(builder, lanes.bytes_at(context, builder, signature.args[1], raw_, at_, QK))
        weights = builder.fmul(lanes.splat(builder, d_, QK), q)
        return _multiply_add(context, builder, acc_, weights, signature.args[4], x_, xo_)
    return accumulator(acc, raw, at, types.float32, x, xo), codegen


@intrinsic
def k_quant_multiply_add(typingctx, acc, raw, at, scales_at, qs_at, qh_at, h_mask, d, dmin, x,
                         xo, x_sums):
    """Q4_K (h_mask 0) and Q5_K (h_mask 1) super-block at raw[at:], its fields at the offsets
    *_at: 8 groups of 32, w_j = (d * scale_g) * q_j - dmin * min_g, where q_j of group g is the
    nibble g % 2 of qs[32 * (g // 2) + j], plus 16 where bit g of qh[j] is set (Q5_K).
    x_sums[i]: the sum of x[32 * i:32 * (i + 1)].

    Scales and mins cost once per group, not per weight: a group's 32 products q_j * x_j are
    first added in pairs (j, j + 16), then scaled, 16 lanes at a time; the mins multiply the
    group sums of x."""
    def codegen(context, builder, signature, args):
        acc_, raw_, at_, scales_at_, qs_at_, qh_at_, h_mask_, d_, dmin_, x_, xo_, x_sums_ = args
        raw_type, x_type = signature.args[1], signature.args[9]

        def field(offset, extra, n):
            where = builder.add(at_, builder.add(offset, ir.Constant(offset.type, extra)))
            return lanes.bytes_at(context, builder, raw_type, raw_, where, n)

        scales, mins = lanes.k_scales_mins(builder, field(scales_at_, 0, 12))
        scales = builder.fmul(lanes.splat(builder, d_, 8), _to_float(builder, scales, False))
        qh = field(qh_at_, 0, 32)
        for pair in range(4):  # groups 2 * pair and 2 * pair + 1 share 32 bytes of qs
            folded = []
            for g in (2 * pair, 2 * pair + 1):
                q = _to_float(builder, lanes.fields(
                    builder, field(qs_at_, 32 * pair, 32), ir.Constant(lanes.I8, 4 * (g % 2)),
                    ir.Constant(lanes.I8, 15), qh, ir.Constant(lanes.I8, g), h_mask_, 4), False)
                first = builder.fmul(lanes.pick(builder, q, list(range(16))),
                                     _x_at(context, builder, x_type, x_, xo_, 32 * g, 16))
                folded.append(_fma(builder, lanes.pick(builder, q, list(range(16, 32))),
                                   _x_at(context, builder, x_type, x_, xo_, 32 * g + 16, 16),
                                   first))
            scale_per_lane = lanes.pick(builder, scales, [2 * pair] * 16 + [2 * pair + 1] * 16)
            acc_ = _fma(builder, lanes.concat(builder, folded[0], folded[1]), scale_per_lane, acc_)
        group_sums = lanes.vector_at(context, builder, signature.args[11], x_sums_,
                                     builder.sdiv(xo_, ir.Constant(xo_.type, QK)), 8)
        min_terms = builder.fmul(builder.fmul(lanes.splat(builder, builder.fneg(dmin_), 8),
                                              _to_float(builder, mins, False)), group_sums)
        return builder.fadd(acc_, lanes.pick(builder, min_terms, list(range(8)) + [None] * 24))
    integer = types.intp
    return accumulator(acc, raw, integer, integer, integer, integer, integer, types.float32,
                       types.float32, x, integer, x_sums), codegen


@intrinsic
def q6_k_multiply_add(typingctx, acc, raw, at, d, x, xo):
    """Q6_K super-block at raw[at:]: 16 groups of 16, w_j = (d * scale_g) * (q_j - 32), with q_j
    as lanes.q6_k_half unpacks it and scale_g the int8 scales[g]."""
    def codegen(context, builder, signature, args):
        acc_, raw_, at_, d_, x_, xo_ = args
        raw_type = signature.args[1]

        def offset(field):
            return builder.add(at_, ir.Constant(at_.type, field))

        scales = builder.fmul(lanes.splat(builder, d_, 16), _to_float(
            builder, lanes.bytes_at(context, builder, raw_type, raw_, offset(Q6_K_SCALES), 16)))
        for h in range(2):  # halves of 128 weights, 8 groups each
            q = lanes.q6_k_half(context, builder, raw_type, raw_, offset(Q6_K_QL + 64 * h),
                                offset(Q6_K_QH + 32 * h))
            scale_per_weight = lanes.pick(builder, scales, [8 * h + j // 16 for j in range(128)])
            weights = builder.fmul(_to_float(builder, q), scale_per_weight)
            acc_ = _multiply_add(context, builder, acc_, weights, signature.args[4], x_,
                                 builder.add(xo_, ir.Constant(xo_.type, 128 * h)))
        return acc_
    return accumulator(acc, raw, at, types.float32, x, xo), codegen


# ------------------------------------------------------------------ rows

@numba.njit(inline="always", cache=True)
def k_quant_row_dot(acc, row, size, d_at, dmin_at, scales_at, qs_at, qh_at, x, x_sums):
    """acc plus row . x for a Q4_K (qh_at < 0) or Q5_K row (blocks of `size` bytes)."""
    h_mask, qh_at = (1, qh_at) if qh_at >= 0 else (0, qs_at)  # Q4_K: any bytes, masked out
    for blk in range(x.size // QK_K):
        b = blk * size
        acc = k_quant_multiply_add(acc, row, b, scales_at, qs_at, qh_at, h_mask,
                                   fp16_at(row, b + d_at), fp16_at(row, b + dmin_at),
                                   x, blk * QK_K, x_sums)
    return acc


@numba.njit(inline="always", cache=True)
def quantized_row_dot(row, qtype, x, x_sums):
    """Accumulator of row . x for a row of one of the block formats (qtype: its GGML id);
    x_sums: block_sums(x)."""
    acc = zero_accumulator()
    if qtype == Q4_K_ID:
        acc = k_quant_row_dot(acc, row, Q4_K_SIZE, Q4_K_D, Q4_K_DMIN, Q4_K_SCALES, Q4_K_QS, -1,
                              x, x_sums)
    elif qtype == Q6_K_ID:
        for blk in range(x.size // QK_K):
            b = blk * Q6_K_SIZE
            acc = q6_k_multiply_add(acc, row, b, fp16_at(row, b + Q6_K_D), x, blk * QK_K)
    elif qtype == Q5_K_ID:
        acc = k_quant_row_dot(acc, row, Q5_K_SIZE, Q5_K_D, Q5_K_DMIN, Q5_K_SCALES, Q5_K_QS,
                              Q5_K_QH, x, x_sums)
    elif qtype == Q8_0_ID:
        for blk in range(x.size // QK):
            b = blk * Q8_0_SIZE
            acc = q8_0_multiply_add(acc, row, b + Q8_0_QS, fp16_at(row, b + Q8_0_D), x, blk * QK)
    elif qtype == Q4_0_ID:
        for blk in range(x.size // QK):
            b = blk * Q4_0_SIZE
            d = fp16_at(row, b + Q4_0_D)
            acc = nibble_pairs_multiply_add(acc, row, b + Q4_0_QS, 0, d, F32(-8) * d, x, blk * QK)
    elif qtype == Q4_1_ID:
        for blk in range(x.size // QK):
            b = blk * Q4_1_SIZE
            acc = nibble_pairs_multiply_add(acc, row, b + Q4_1_QS, 0, fp16_at(row, b + Q4_1_D),
                                            fp16_at(row, b + Q4_1_M), x, blk * QK)
    elif qtype == Q5_0_ID:
        for blk in range(x.size // QK):
            b = blk * Q5_0_SIZE
            d = fp16_at(row, b + Q5_0_D)
            acc = nibble_pairs_multiply_add(acc, row, b + Q5_0_QS, q5_high_bits(row, b + Q5_0_QH),
                                            d, F32(-16) * d, x, blk * QK)
    else:  # Q5_1
        for blk in range(x.size // QK):
            b = blk * Q5_1_SIZE
            acc = nibble_pairs_multiply_add(acc, row, b + Q5_1_QS, q5_high_bits(row, b + Q5_1_QH),
                                            fp16_at(row, b + Q5_1_D), fp16_at(row, b + Q5_1_M),
                                            x, blk * QK)
    return acc


@numba.njit(inline="always", fastmath=FAST, cache=True)
def f16_row_dot(row, x):
    halves, s = row.view(np.uint16), F32(0)
    for j in range(x.size):
        s += half_to_float(halves[j]) * x[j]
    return s


@numba.njit(inline="always", fastmath=FAST, cache=True)
def f32_row_dot(row, x):
    values = row.view(np.float32)
    s = F32(0)
    for j in range(x.size):
        s += values[j] * x[j]
    return s


@numba.njit(fastmath=FAST, cache=True)
def block_sums(x):
    """float32 (n // 32,): the sums of x (float32 (n,)) over each block of 32. A serial function
    of its own: inside matvec, Numba made each block's `.sum()` a parallel region, ~170 us a call
    at n = 4096 with 2 threads whatever the number of rows (a third of a 4096 x 4096 Q4_K call)."""
    sums = np.zeros(x.size // QK, F32)
    for j in range(x.size):
        sums[j // QK] += x[j]
    return sums


@numba.njit(parallel=True, fastmath=FAST, cache=True)
def matvec(rows, qtype, x, out):
    """out[r] = dot(dequantized row r, x).

    rows: uint8 (n_rows, row_bytes), read-only; qtype: GGML type id; x: float32 (n,); out: float32
    (n_rows,).
    """
    x_sums = block_sums(x)
    for r in prange(rows.shape[0]):
        lanes.prefetch_row(rows, r + 1)
        row = rows[r]
        if qtype == F16_ID:
            out[r] = f16_row_dot(row, x)
        elif qtype == F32_ID:
            out[r] = f32_row_dot(row, x)
        else:
            out[r] = lane_sum(quantized_row_dot(row, qtype, x, x_sums))
