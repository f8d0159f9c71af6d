"""Fused dequantize-and-multiply for decode: out = W @ x with W still in its block format.

`MATVEC[qtype](rows, x, out)`: one kernel per format, built from the format's row function in
`ROW_DOT`, parallel over output rows. Per block, an intrinsic unpacks the
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
from numba.extending import intrinsic, models, overload, register_model

from . import FASTMATH, format_kernel, lanes
from .dequant import q5_high_bits
from .fp16 import bfloat16_to_float, fp16_at, half_to_float
from ..formats import QK, QK_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K

F32 = np.float32

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
        return lanes.sum_lanes(builder, args[0])
    return types.float32(acc), codegen


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
        acc = lanes.fma(builder, lanes.pick(builder, weights, list(range(first, first + ACC_LANES))),
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
        weights = lanes.fma(builder, q, lanes.splat(builder, d_, QK), lanes.splat(builder, bias_, QK))
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
                folded.append(lanes.fma(builder, lanes.pick(builder, q, list(range(16, 32))),
                                   _x_at(context, builder, x_type, x_, xo_, 32 * g + 16, 16),
                                   first))
            scale_per_lane = lanes.pick(builder, scales, [2 * pair] * 16 + [2 * pair + 1] * 16)
            acc_ = lanes.fma(builder, lanes.concat(builder, folded[0], folded[1]), scale_per_lane, acc_)
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
            builder, lanes.bytes_at(context, builder, raw_type, raw_, offset(Q6_K.scales), 16)))
        for h in range(2):  # halves of 128 weights, 8 groups each
            q = builder.sub(lanes.q6_k_half(
                builder, lanes.bytes_at(context, builder, raw_type, raw_, offset(Q6_K.ql + 64 * h), 64),
                lanes.bytes_at(context, builder, raw_type, raw_, offset(Q6_K.qh + 32 * h), 32)),
                lanes.constant(128, 32))
            scale_per_weight = lanes.pick(builder, scales, [8 * h + j // 16 for j in range(128)])
            weights = builder.fmul(_to_float(builder, q), scale_per_weight)
            acc_ = _multiply_add(context, builder, acc_, weights, signature.args[4], x_,
                                 builder.add(xo_, ir.Constant(xo_.type, 128 * h)))
        return acc_
    return accumulator(acc, raw, at, types.float32, x, xo), codegen


# ------------------------------------------------------------------ one row per format
# Each returns row . x as float32; x_sums = block_sums(x) (the k-quants' mins multiply it).

@numba.njit(inline="always", cache=True)
def legacy_row_dot(row, x, size, d_at, m_at, qh_at, qs_at, offset):
    """row . x for a Q4_0, Q4_1, Q5_0 or Q5_1 row (blocks of `size` bytes): w = d * q + bias,
    bias the fp16 at m_at (Q4_1, Q5_1) or -offset * d (m_at < 0); fifth bits from the qh at qh_at
    (qh_at < 0: none). The offsets are constants, so each format compiles to its branch alone."""
    acc = zero_accumulator()
    for blk in range(x.size // QK):
        b = blk * size
        d = fp16_at(row, b + d_at)
        bias = fp16_at(row, b + m_at) if m_at >= 0 else F32(-offset) * d
        high = q5_high_bits(row, b + qh_at) if qh_at >= 0 else np.uint32(0)
        acc = nibble_pairs_multiply_add(acc, row, b + qs_at, high, d, bias, x, blk * QK)
    return lane_sum(acc)


@numba.njit(inline="always", cache=True)
def q4_0_row_dot(row, x, x_sums):
    return legacy_row_dot(row, x, Q4_0.size, Q4_0.d, -1, -1, Q4_0.qs, 8)


@numba.njit(inline="always", cache=True)
def q4_1_row_dot(row, x, x_sums):
    return legacy_row_dot(row, x, Q4_1.size, Q4_1.d, Q4_1.m, -1, Q4_1.qs, 0)


@numba.njit(inline="always", cache=True)
def q5_0_row_dot(row, x, x_sums):
    return legacy_row_dot(row, x, Q5_0.size, Q5_0.d, -1, Q5_0.qh, Q5_0.qs, 16)


@numba.njit(inline="always", cache=True)
def q5_1_row_dot(row, x, x_sums):
    return legacy_row_dot(row, x, Q5_1.size, Q5_1.d, Q5_1.m, Q5_1.qh, Q5_1.qs, 0)


@numba.njit(inline="always", cache=True)
def q8_0_row_dot(row, x, x_sums):
    acc = zero_accumulator()
    for blk in range(x.size // QK):
        b = blk * Q8_0.size
        acc = q8_0_multiply_add(acc, row, b + Q8_0.qs, fp16_at(row, b + Q8_0.d), x, blk * QK)
    return lane_sum(acc)


@numba.njit(inline="always", cache=True)
def k_quant_row_dot(row, size, d_at, dmin_at, scales_at, qs_at, qh_at, x, x_sums):
    """row . x for a Q4_K (qh_at < 0) or Q5_K row (blocks of `size` bytes)."""
    acc = zero_accumulator()
    h_mask, qh_at = (1, qh_at) if qh_at >= 0 else (0, qs_at)  # Q4_K: any bytes, masked out
    for blk in range(x.size // QK_K):
        b = blk * size
        acc = k_quant_multiply_add(acc, row, b, scales_at, qs_at, qh_at, h_mask,
                                   fp16_at(row, b + d_at), fp16_at(row, b + dmin_at),
                                   x, blk * QK_K, x_sums)
    return lane_sum(acc)


@numba.njit(inline="always", cache=True)
def q4_k_row_dot(row, x, x_sums):
    return k_quant_row_dot(row, Q4_K.size, Q4_K.d, Q4_K.dmin, Q4_K.scales, Q4_K.qs, -1, x, x_sums)


@numba.njit(inline="always", cache=True)
def q5_k_row_dot(row, x, x_sums):
    return k_quant_row_dot(row, Q5_K.size, Q5_K.d, Q5_K.dmin, Q5_K.scales, Q5_K.qs, Q5_K.qh,
                           x, x_sums)


@numba.njit(inline="always", cache=True)
def q6_k_row_dot(row, x, x_sums):
    acc = zero_accumulator()
    for blk in range(x.size // QK_K):
        b = blk * Q6_K.size
        acc = q6_k_multiply_add(acc, row, b, fp16_at(row, b + Q6_K.d), x, blk * QK_K)
    return lane_sum(acc)


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def _half_row_dot(row, x, bfloat16):
    """row . x for a row of 16-bit floats: IEEE halves, or with `bfloat16` bfloat16s."""
    halves, s = row.view(np.uint16), F32(0)
    for j in range(x.size):
        s += (bfloat16_to_float(halves[j]) if bfloat16 else half_to_float(halves[j])) * x[j]
    return s


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def f16_row_dot(row, x, x_sums):
    return _half_row_dot(row, x, False)


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def bf16_row_dot(row, x, x_sums):
    return _half_row_dot(row, x, True)


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def f32_row_dot(row, x, x_sums):
    values = row.view(np.float32)
    s = F32(0)
    for j in range(x.size):
        s += values[j] * x[j]
    return s


ROW_DOT = {QType.F32: f32_row_dot, QType.F16: f16_row_dot, QType.BF16: bf16_row_dot, QType.Q4_0: q4_0_row_dot,
           QType.Q4_1: q4_1_row_dot, QType.Q5_0: q5_0_row_dot, QType.Q5_1: q5_1_row_dot,
           QType.Q8_0: q8_0_row_dot, QType.Q4_K: q4_k_row_dot, QType.Q5_K: q5_k_row_dot,
           QType.Q6_K: q6_k_row_dot}
SUPPORTED = tuple(ROW_DOT)


def row_dot(qtype, row, x, x_sums):
    """row . x (float32) for a row of format `qtype` (a literal GGML type id): ROW_DOT's entry."""
    raise NotImplementedError("called from Numba code only")


@overload(row_dot)
def _row_dot(qtype, row, x, x_sums):
    impl = format_kernel(ROW_DOT, qtype, "float32 matvec")
    return lambda qtype, row, x, x_sums: impl(row, x, x_sums)


@numba.njit(fastmath=FASTMATH, cache=True)
def block_sums(x):
    """float32 (n // 32,): the sums of x (float32 (n,)) over each block of 32. A serial function
    of its own: inside matvec, Numba made each block's `.sum()` a parallel region, ~170 us a call
    at n = 4096 with 2 threads whatever the number of rows (a third of a 4096 x 4096 Q4_K call)."""
    sums = np.zeros(x.size // QK, F32)
    for j in range(x.size):
        sums[j // QK] += x[j]
    return sums


def _matvec_kernel(qtype: int):
    """The matvec of one format. `qtype` is a closure constant, which Numba types as a literal:
    row_dot resolves to the format's function at compile time, and the cache keys on its value."""
    @numba.njit(parallel=True, nogil=True, fastmath=FASTMATH, cache=True)
    def matvec(rows, x, out):
        x_sums = block_sums(x)
        for r in prange(rows.shape[0]):
            lanes.prefetch_row(rows, r + 1)
            out[r] = row_dot(qtype, rows[r], x, x_sums)
    return matvec


# out = W @ x, one kernel per format: MATVEC[qtype](rows, x, out) with rows uint8 (n_rows,
# row_bytes), read-only; x float32 (n,); out float32 (n_rows,).
MATVEC = {t: _matvec_kernel(int(t)) for t in ROW_DOT}
