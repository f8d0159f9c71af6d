"""Quantized matmul with llama.cpp's numerics: activations quantized to 8 bits, integer dot products.

`MATMUL_Q8[qtype](matrices, x, outs)` computes out[t] = W @ x[t] for T columns of activations,
which it quantizes first with `quantize_activations` (once per call: q, k and v share it, as do
gate and up): the activation blocks are bit-identical to llama.cpp's
`quantize_row_q8_{0,1,K}_ref`, every block's integer sum is exact, and only the float
combination of the sums with the scales is ordered differently from the generic C code (~1e-6
relative; kernels.reference.vec_dot is the definition). Prefill runs it with T = the chunk's
tokens, decode with T = 1, a batch of B decode steps with T = B: every (row, column) gets the
same float operations whatever T is, so column t of a prefill equals the decode of token t bit
for bit. Types without a q8 path here (F32, F16, BF16, Q2_K, Q3_K) use the float kernels.

The work is one intrinsic, `dot_tile`, that runs a few rows against a few columns in LLVM vector
IR (TILE_ROWS = 16 rows with AVX-512 VNNI, else 8, x 16 or 8 columns for prefill, x 2-8 for a
batch of decode steps; 8 x 1 in decode, Q6_K's decode 4 x 1); decode takes its rows in bands
(`band_tile`), each of a tile's rows a long run of memory. In its row-major tiles (Q6_K's decode,
Q8_0 without VNNI, a matrix's rows past its last whole tile) per block it loads and unpacks each
row's weights once (kernels.cpu.lanes), multiplies them with each column's int8 block in
byte lanes (`vpmaddubsw`, unsigned by signed, pairs into int16; Q8_0's signed weights pass as
|w| with x taking w's sign), scales pairs into int32 lanes (`vpmaddwd`, by 1 or by the k-quant group scales), reduces
the whole tile's int32 lanes together and folds them into one float32 accumulator per (row,
column) with one FMA by d_w * d_x. Tiles of 8 or 16 rows of the other formats put the rows across
the lanes instead (`ROWS_DOT`): each row's block sum ends in its own lane, with no reduction, and
the same float steps follow. The float arithmetic is emitted with no fast-math flags, so
LLVM cannot reorder or fuse it differently for one tile shape than for another. See
docs/kernels-q8.md.
"""
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import numba
import numpy as np
from gguf import GGMLQuantizationType as QType
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import lanes
from .fp16 import f32_to_fp16_bits, half_to_float
from .lanes import I8, I16, I32
from .quant import ROUNDING_MAGIC, inverse
from ..formats import FORMATS, QK, QK_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K

F32 = np.float32
I64 = ir.IntType(64)
I32X8 = ir.VectorType(I32, 8)
ZERO_SUMS = ir.Constant(I32X8, None)

# ------------------------------------------------------------------ activation quantizers
# Bit-identical to llama.cpp's quantize_row_q8_*_ref (and kernels.reference.vec_dot): no fastmath.
# Outputs for one x (float32 (n,)), per block b: qs[b] int8 (block,); d[b] float32 (Q8_0/Q8_1: the
# fp16-rounded value the dot product uses); s[b] float32 (Q8_1's fp16 d * sum(q)); sums[b]
# int16: sum(q) (1,) for Q8_0, llama.cpp's bsums (16,) for Q8_K.

def _float_block(context, builder, array_type, array, b, n):
    """<n x float>: block b of the float32 C-contiguous `array`, elements n * b .. n * b + n - 1."""
    return lanes.load(builder, lanes.byte_pointer(context, builder, array_type, array),
                      builder.mul(b, ir.Constant(b.type, 4 * n)), lanes.F32, n)


def _store_row(context, builder, array_type, array, b, values):
    """Row b of the int8 `array` (rows contiguous) = the <n x i32> values truncated to bytes."""
    row = lanes.byte_pointer(context, builder, array_type, array, b)
    kind = ir.VectorType(I8, values.type.count)
    builder.store(builder.trunc(values, kind), builder.bitcast(row, kind.as_pointer()), align=1)


@intrinsic
def _abs_max_q8_0(typingctx, x, b):
    """max |x[32b:32b + 32]| (float32 x, C-contiguous) in one vector: the same value as the
    running maximum from 0 for any floats but NaN (whose outcome depends on the order anyway)."""
    def codegen(context, builder, signature, args):
        values = _float_block(context, builder, signature.args[0], args[0], args[1], QK)
        magnitudes = lanes.call(builder, f"llvm.fabs.v{QK}f32", values.type, values)
        return lanes.call(builder, f"llvm.vector.reduce.fmax.v{QK}f32", lanes.F32, magnitudes)
    return types.float32(x, b), codegen


@intrinsic
def _round_q8_0(typingctx, x, b, inv, qs):
    """qs[b, :] = roundf(x[32b + j] * inv) as int8 (C's roundf: halves away from zero,
    llvm.round), j < 32, in vectors; returns their int32 sum. qs: int8 (blocks, 32), rows
    contiguous."""
    def codegen(context, builder, signature, args):
        x_, b_, inv_, qs_ = args
        scaled = builder.fmul(_float_block(context, builder, signature.args[0], x_, b_, QK), lanes.splat(builder, inv_, QK))
        q = builder.fptosi(lanes.call(builder, f"llvm.round.v{QK}f32", scaled.type, scaled), ir.VectorType(I32, QK))
        _store_row(context, builder, signature.args[3], qs_, b_, q)
        return lanes.reduce_add(builder, q)
    return types.int32(x, b, inv, qs), codegen


@numba.njit(cache=True)
def quantize_q8_0(x, qs, d, s, sums):
    for b in range(x.size // QK):
        scale = _abs_max_q8_0(x, b) / F32(127)
        total = _round_q8_0(x, b, inverse(scale), qs)
        d[b] = half_to_float(f32_to_fp16_bits(scale))
        s[b] = half_to_float(f32_to_fp16_bits(F32(total) * scale))
        sums[b, 0] = total


@intrinsic
def _peak_q8_k(typingctx, x, b):
    """The first of x[256b:256b + 256] (float32, C-contiguous) of largest magnitude, sign kept
    (+0.0 when all are zero), in vectors: the largest magnitude, then the first lane holding it."""
    def codegen(context, builder, signature, args):
        values = _float_block(context, builder, signature.args[0], args[0], args[1], QK_K)
        magnitudes = lanes.call(builder, f"llvm.fabs.v{QK_K}f32", values.type, values)
        amax = lanes.call(builder, f"llvm.vector.reduce.fmax.v{QK_K}f32", lanes.F32, magnitudes)
        at_max = builder.bitcast(builder.fcmp_ordered("==", magnitudes, lanes.splat(builder, amax, QK_K)),
                                 ir.IntType(QK_K))
        first = lanes.call(builder, f"llvm.cttz.i{QK_K}", at_max.type, at_max, ir.Constant(ir.IntType(1), 0))
        peak = builder.extract_element(values, builder.trunc(first, I32))
        # all zero, or all NaN (no largest magnitude): 0, as the scalar scan from 0 left them
        return builder.select(builder.fcmp_unordered("==", amax, ir.Constant(lanes.F32, 0)), ir.Constant(lanes.F32, 0), peak)
    return types.float32(x, b), codegen


@intrinsic
def _round_q8_k(typingctx, x, b, iscale, qs, sums):
    """qs[b, j] = min(127, nearest_int(iscale * x[256b + j])) (llama.cpp's rounding: through the
    float adder, half to even), j < 256, and sums[b, g] = the sum of group g's 16, in vectors.
    qs: int8 (blocks, 256), sums: int16 (blocks, 16), rows contiguous."""
    def codegen(context, builder, signature, args):
        x_, b_, iscale_, qs_, sums_ = args
        values = _float_block(context, builder, signature.args[0], x_, b_, QK_K)
        magic = lanes.constant(QK_K, float(ROUNDING_MAGIC), lanes.F32)
        rounded = builder.fsub(builder.fadd(builder.fmul(lanes.splat(builder, iscale_, QK_K), values), magic), magic)
        q = builder.fptosi(rounded, ir.VectorType(I32, QK_K))
        q = lanes.call(builder, f"llvm.smin.v{QK_K}i32", q.type, q, lanes.constant(QK_K, 127, I32))
        _store_row(context, builder, signature.args[3], qs_, b_, q)
        group_sums = lanes.byte_pointer(context, builder, signature.args[4], sums_, b_)
        for g in range(QK_K // 16):
            total = lanes.reduce_add(builder, lanes.pick(builder, q, list(range(16 * g, 16 * g + 16))))
            builder.store(builder.trunc(total, I16), builder.bitcast(builder.gep(group_sums, [ir.Constant(I32, 2 * g)]),
                                                                     I16.as_pointer()), align=1)
        return context.get_dummy_value()
    return types.none(x, b, iscale, qs, sums), codegen


@numba.njit(cache=True)
def quantize_q8_k(x, qs, d, sums):
    for b in range(x.size // QK_K):
        peak = _peak_q8_k(x, b)
        if peak == 0:
            qs[b] = 0
            sums[b] = 0
            d[b] = 0
            continue
        iscale = F32(-127) / peak
        _round_q8_k(x, b, iscale, qs, sums)
        d[b] = F32(1) / iscale


@numba.njit(cache=True)
def quantize_column(x, t, super_blocks, xq, xd, xs, xsum):
    if super_blocks:
        quantize_q8_k(x[t], xq[:, t], xd[:, t], xsum[:, t])
    else:
        quantize_q8_0(x[t], xq[:, t], xd[:, t], xs[:, t], xsum[:, t])


@numba.njit(cache=True)
def quantize_one(x, super_blocks, xq, xd, xs, xsum):
    quantize_column(x, 0, super_blocks, xq, xd, xs, xsum)


@numba.njit(parallel=True, nogil=True, cache=True)
def quantize_columns(x, super_blocks, xq, xd, xs, xsum):
    for t in prange(x.shape[0]):
        quantize_column(x, t, super_blocks, xq, xd, xs, xsum)


@numba.njit(cache=True)
def quantize_activations(x, super_blocks):
    """x (float32 (T, n)) as 8-bit activation blocks for a matmul with T columns: Q8_K when
    `super_blocks` (the k-quants' partner), else Q8_0 with Q8_1's sums. Block-major, so that a
    tile of columns is one run of memory per block: returns (xq int8 (blocks, T, block),
    xd float32 (blocks, T), xs float32 (blocks, T): Q8_1's s, xsum int16: Q8_K's bsums
    (blocks, T, 16), or sum(q) (blocks, T, 1) for Q8_0). Compiled, like its callers' whole
    path, because a decode step makes hundreds of these calls on small matrices; one column runs
    serially (a parallel region costs more than it)."""
    n_columns, n = x.shape
    block = QK_K if super_blocks else QK
    xq = np.empty((n // block, n_columns, block), np.int8)
    xd = np.empty((n // block, n_columns), F32)
    xs = np.empty((n // block, n_columns), F32)
    xsum = np.empty((n // block, n_columns, 16 if super_blocks else 1), np.int16)
    if n_columns == 1:
        quantize_one(x, super_blocks, xq, xd, xs, xsum)
    else:
        quantize_columns(x, super_blocks, xq, xd, xs, xsum)
    return xq, xd, xs, xsum


# ------------------------------------------------------------------ one block, a tile of columns

class _Columns:
    """A tile's activation columns inside dot_tile's loop, at block b: each column's int8 block
    and Q8_K sums, and the columns' scales d_x and Q8_1 sums s_x side by side (<width x float>)."""

    def __init__(self, builder, width, xq, xd, xs, xsum, column_bytes):
        self.builder, self.width = builder, width
        self.xq, self.xsum, self.column_bytes = xq, xsum, column_bytes
        self.d = lanes.load(builder, xd, 0, lanes.F32, width)
        self.s = lanes.load(builder, xs, 0, lanes.F32, width)

    def x(self, j, at, n):
        """<n x i8>: column j's activations at offset `at` of the block."""
        return lanes.load(self.builder, self.xq, j * self.column_bytes + at, I8, n)

    def bsums(self, j):
        """<16 x i16>: column j's 16 Q8_K sums of 16 activations in this super-block."""
        return lanes.load(self.builder, self.xsum, 32 * j, I16, 16)

    def block_sums(self):
        """<width x i32>: the columns' Q8_0 sums of this block's 32 activations."""
        return self.builder.sext(lanes.load(self.builder, self.xsum, 0, I16, self.width),
                                 ir.VectorType(I32, self.width))


# A block emitter returns its row's terms, in the order they are added to each (row, column)
# accumulator: (sums, scale, offset), sums a <8 x i32> of exact integer sums per column, scale
# the block's float32 weight scale and offset an int, adds float(sum of the lanes - offset *
# sum(x)) * (scale * d_x); (None, m, 0) adds m * s_x (Q4_1 / Q5_1's offset times Q8_1's s).

def _legacy(layout, offset=0, affine=False):
    """Q4_0 / Q5_0 (weights q - offset, offset 8 / 16: q . x - offset * sum(x) with Q8_0's block
    sums, after the tile's reduction), Q4_1 / Q5_1 (affine: d * q + m, with Q8_1's s), Q8_0
    (signed bytes: |w| . (x with w's sign)): one block of 32 per call."""
    five_bit = "qh" in layout._fields

    def emit(builder, block, columns):
        d = lanes.half(builder, block, layout.d)
        if layout is Q8_0:
            weights = lanes.load(builder, block, layout.qs, I8, QK)
            unsigned = lanes.magnitude(builder, weights)
            x_of = lambda j: lanes.sign_of(builder, columns.x(j, 0, QK), weights)  # noqa: E731
        else:
            high = (builder.zext(lanes.load(builder, block, layout.qh, I32), ir.IntType(64))
                    if five_bit else None)
            unsigned = lanes.nibble_pairs(builder, lanes.load(builder, block, layout.qs, I8, QK // 2),
                                          high)
            x_of = lambda j: columns.x(j, 0, QK)  # noqa: E731
        sums = [lanes.dot_bytes(builder, ZERO_SUMS, unsigned, x_of(j)) for j in range(columns.width)]
        return [(sums, d, offset)] + ([(None, lanes.half(builder, block, layout.m), 0)] if affine else [])
    return emit


def _k_quant(layout):
    """Q4_K, Q5_K: 8 groups of 32, weight (d * scale_g) * q - dmin * min_g; the mins multiply
    Q8_K's bsums."""
    five_bit = "qh" in layout._fields

    def emit(builder, block, columns):
        d, dmin = (lanes.half(builder, block, at) for at in (layout.d, layout.dmin))
        scales, mins = (builder.zext(v, ir.VectorType(I16, 8)) for v in lanes.k_scales_mins(
            builder, lanes.load(builder, block, layout.scales, I8, 12)))
        qh = lanes.load(builder, block, layout.qh, I8, 32) if five_bit else lanes.constant(32, 0)
        sums = [ZERO_SUMS] * columns.width
        for g in range(8):
            q = lanes.fields(builder, lanes.load(builder, block, layout.qs + 32 * (g // 2), I8, 32),
                             ir.Constant(I8, 4 * (g % 2)), ir.Constant(I8, 15), qh,
                             ir.Constant(I8, g), ir.Constant(I8, int(five_bit)), 4)
            scale = lanes.pick(builder, scales, [g] * 16)
            for j in range(columns.width):
                pairs = lanes.maddubs(builder, q, columns.x(j, 32 * g, 32))
                sums[j] = lanes.dot_words(builder, sums[j], pairs, scale)
        min_per_bsum = lanes.pick(builder, mins, [i // 2 for i in range(16)])
        min_sums = [lanes.madd(builder, columns.bsums(j), min_per_bsum) for j in range(columns.width)]
        return [(sums, d, 0), (min_sums, builder.fneg(dmin), 0)]
    return emit


def _q6_k(builder, block, columns):
    """Q6_K: 16 groups of 16, weight d * scale_g * (q - 32), int8 scales; the - 32 goes through
    Q8_K's bsums: sum_g scale_g * (q . x - 32 * bsum_g), exact."""
    d = lanes.half(builder, block, Q6_K.d)
    scales = builder.sext(lanes.load(builder, block, Q6_K.scales, I8, 16), ir.VectorType(I16, 16))
    sums = [ZERO_SUMS] * columns.width
    for u in range(8):  # 32 weights: groups 2u and 2u + 1, quarter c of half h (lanes.q6_k_half's layout)
        h, c = divmod(u, 4)
        q = lanes.fields(builder, lanes.load(builder, block, Q6_K.ql + 64 * h + 32 * (c % 2), I8, 32),
                         ir.Constant(I8, 4 * (c // 2)), ir.Constant(I8, 15),
                         lanes.load(builder, block, Q6_K.qh + 32 * h, I8, 32), ir.Constant(I8, 2 * c),
                         ir.Constant(I8, 3), 4)
        scale = lanes.pick(builder, scales, [2 * u] * 8 + [2 * u + 1] * 8)
        for j in range(columns.width):
            pairs = lanes.maddubs(builder, q, columns.x(j, 32 * u, 32))
            sums[j] = lanes.dot_words(builder, sums[j], pairs, scale)
    offsets = [lanes.madd(builder, columns.bsums(j), scales) for j in range(columns.width)]
    return [([builder.sub(total, builder.shl(offset, ir.Constant(I32X8, [5] * 8)))
              for total, offset in zip(sums, offsets)], d, 0)]


# Each format's block emitter and its weights per block (the activation block it meets: Q8_K
# for the k-quants, Q8_0 / Q8_1 for the rest).
BLOCK_DOT = {QType.Q4_0: _legacy(Q4_0, offset=8), QType.Q4_1: _legacy(Q4_1, affine=True),
             QType.Q5_0: _legacy(Q5_0, offset=16), QType.Q5_1: _legacy(Q5_1, affine=True),
             QType.Q8_0: _legacy(Q8_0), QType.Q4_K: _k_quant(Q4_K),
             QType.Q5_K: _k_quant(Q5_K), QType.Q6_K: _q6_k}
SUPPORTED = tuple(BLOCK_DOT)
SUPER_BLOCK_TYPES = tuple(t for t in BLOCK_DOT if FORMATS[t].block_size == QK_K)  # Q8_K partners


def _row_major_codegen(fmt, n_rows, n_columns):
    """dot_tile's code for n_rows x n_columns (n_rows * n_columns <= 8): one float32 accumulator per
    (row, column), the lanes of one vector."""
    emit = BLOCK_DOT[fmt.qtype]
    lanes_type = ir.VectorType(lanes.F32, n_rows * n_columns)
    per_row = [i for i in range(n_rows) for _ in range(n_columns)]  # lane -> its row
    per_column = [j for _ in range(n_rows) for j in range(n_columns)]  # lane -> its column

    def codegen(context, builder, signature, args):
        rows = _tile_rows(builder, args[2], args[11], n_rows)
        row_pointers = [lanes.byte_pointer(context, builder, signature.args[1], args[1], row) for row in rows]
        n_blocks, at_block = _activation_blocks(context, builder, signature, args, fmt)
        acc = cgutils.alloca_once_value(builder, ir.Constant(lanes_type, None))
        prefetch = _next_tile_prefetch(context, builder, signature, args, rows, fmt)

        def per_row_vector(values):  # <lanes> with lane (i, j) = values[i]
            vector = ir.Constant(ir.VectorType(lanes.F32, n_rows), None)
            for i, value in enumerate(values):
                vector = builder.insert_element(vector, value, ir.Constant(I32, i))
            return lanes.pick(builder, vector, per_row)

        with cgutils.for_range(builder, n_blocks) as loop:
            b = loop.index
            prefetch(b)
            columns = _Columns(builder, n_columns, *at_block(b), fmt.block_size)
            terms = [emit(builder, builder.gep(row, [builder.mul(b, ir.Constant(b.type, fmt.type_size))]),
                          columns) for row in row_pointers]
            # Every integer term of the whole tile reduced at once: term p's lanes are
            # p * n_lanes.. of `reduced` (one reduction for Q4_K's sums and mins, not two).
            integer_terms = [k for k, term in enumerate(terms[0]) if term[0] is not None]
            reduced = lanes.sum_per_vector(builder, [v for k in integer_terms for row_terms in terms
                                                     for v in row_terms[k][0]])
            n_lanes = len(per_column)
            for k in range(len(terms[0])):
                scale = per_row_vector([row_terms[k][1] for row_terms in terms])
                if terms[0][k][0] is None:  # m * s_x
                    update = (scale, lanes.pick(builder, columns.s, per_column))
                else:
                    p = integer_terms.index(k)
                    sums = lanes.pick(builder, reduced, list(range(p * n_lanes, (p + 1) * n_lanes)))
                    offset = terms[0][k][2]  # the format's, the same for every row
                    if offset:  # - offset * sum(x), exact
                        x_sums = lanes.pick(builder, columns.block_sums(), per_column)
                        sums = builder.sub(sums, builder.mul(
                            x_sums, lanes.constant(len(per_column), offset, I32)))
                    update = (builder.sitofp(sums, lanes_type),
                              builder.fmul(scale, lanes.pick(builder, columns.d, per_column)))
                builder.store(lanes.fma(builder, *update, builder.load(acc)), acc)
        totals = builder.load(acc)
        _store_outputs(context, builder, signature, args, n_rows, n_columns,
                       lambda i, j: builder.extract_element(totals, ir.Constant(I32, i * n_columns + j)))
    return codegen


# ------------------------------------------------------------------ eight rows in the lanes

# For the formats in ROWS_DOT the rows of a tile go across the lanes instead (every tile of 2 or
# more columns; Q4_K / Q5_K's one-column tiles too): a block's bytes of 8 rows transposed so that
# lane r of a <8 x i32> holds 4 weights of row r, each vpdpbusd
# against 4 activation bytes broadcast to every lane adds 4 products to all 8 rows at once, and a
# block ends with each row's exact sum in its own lane: no horizontal reduction (the row-major
# tile spends more on reducing than on multiplying). The sums, scales and their order are the
# row-major tile's, so the results are the same bits.

# x86's in-lane unpacks and the 128-bit halves' exchange, as shuffles of two <8 x i32>.
_LOW_32, _HIGH_32 = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
_LOW_64, _HIGH_64 = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
_LOW_128, _HIGH_128 = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]


def _in_each_half(mask, n):
    """An 8-lane shuffle mask of two vectors applied to each 256-bit half of two <n x i32>."""
    return [8 * h + i if i < 8 else n + 8 * h + i - 8 for h in range(n // 8) for i in mask]


def _transposed(builder, blocks, at, n_dwords):
    """[<n x i32>] * n_dwords: vector k has lane r = dword k of the n_dwords at byte `at` of
    blocks[r] (a RowBlocks of n = 8 or 16 rows). 4 and 8 dwords as the unpack ladder of an 8 x 8
    transpose (3 shuffles a vector; LLVM's own lowering of one wide shuffle cost ~20% of a Q4_K
    matvec), 16 rows as two such ladders side by side in the 256-bit halves of 512-bit lanes;
    fewer dwords a gather each where the blocks' addresses are known, else loaded and picked."""
    n = len(blocks)
    shuffle = lambda a, b, mask: builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(I32, n), _in_each_half(mask, n)))  # noqa: E731
    if n_dwords == 8:  # rows r and r + 8 in one vector's halves
        rows = [lanes.joined(builder, [lanes.load(builder, block, at, I32, 8) for block in blocks[r::8]])
                for r in range(8)]
    elif n_dwords == 4:  # rows r, r + 4 (and r + 8, r + 12) side by side: the same ladder from its second step
        rows = [lanes.joined(builder, [lanes.load(builder, block, at, I32, 4) for block in blocks[r::4]])
                for r in range(4)]
    elif blocks.addresses is not None:
        return [blocks.dwords(at + 4 * k) for k in range(n_dwords)]
    else:
        row_major = lanes.joined(builder, [lanes.load(builder, block, at, I32, n_dwords) for block in blocks])
        return [lanes.pick(builder, row_major, [r * n_dwords + k for r in range(n)]) for k in range(n_dwords)]
    pairs = [shuffle(a, b, mask) for a, b in zip(rows[0::2], rows[1::2]) for mask in (_LOW_32, _HIGH_32)]
    quads = [shuffle(pairs[i], pairs[i + 2], mask) for first in range(0, len(pairs), 4)
             for i in (first, first + 1) for mask in (_LOW_64, _HIGH_64)]
    if n_dwords == 4:
        return quads
    return [shuffle(quads[k], quads[k + 4], mask) for mask in (_LOW_128, _HIGH_128) for k in range(4)]


class RowBlocks(list):
    """Block b of each of a tile's n rows: the i8* to each (the list), and the blocks' addresses
    (<n x i64>) for `dwords`, or None: the one-column tiles read a row's scales with scalar loads
    (decode: a gather measured slower there, Q4_K 8 x 1 in L1 104 -> 81 GOPS a core)."""

    def __init__(self, builder, pointers, addresses, type_size):
        super().__init__(pointers)
        self.builder, self.addresses, self.type_size = builder, addresses, type_size
        self.gathered = {}

    def dwords(self, at):
        """<n x i32>: the dword at byte `at` of each block, in one gather (shared by its callers)."""
        if at not in self.gathered:
            at_ = lanes.constant(len(self), at, I64)
            self.gathered[at] = lanes.gather(self.builder, self.builder.add(self.addresses, at_), I32)
        return self.gathered[at]


def _per_row(builder, blocks, at):
    """<n x float>: the fp16 at byte `at` of each of n rows' blocks, row r in lane r. With the
    blocks' addresses: from one gather (shared by the two fp16 of a dword: d and m or dmin, read
    inside the block) and one conversion, where 16 scalar loads and inserts had been a third of a
    Q4_1 tile's work at 8 columns (Q4_1 16 x 8 in L1: 250 -> 309 GOPS a core)."""
    n = len(blocks)
    if blocks.addresses is None:
        vector = ir.Constant(ir.VectorType(lanes.F32, n), None)
        for r, block in enumerate(blocks):
            vector = builder.insert_element(vector, lanes.half(builder, block, at), ir.Constant(I32, r))
        return vector
    start = at - at % 4 if at - at % 4 + 4 <= blocks.type_size else at - 2
    dwords = builder.lshr(blocks.dwords(start), lanes.constant(n, 8 * (at - start), I32))
    return lanes.halves_to_float(builder, builder.trunc(dwords, ir.VectorType(I16, n)))


EIGHT = 8  # rows of the one-column tiles across the lanes (of a <8 x i32>)
# Rows of the tiles of several columns: 16 rows across 512-bit lanes where the target has AVX-512
# VNNI (each vpdpbusd then adds 4 products to 16 rows, and each shuffle of the transposes moves
# 16 rows' weights; see docs/kernels-q8.md), else 8.
TILE_ROWS = 16 if lanes.VNNI_512 else EIGHT


class RowLanes(NamedTuple):
    """A block of n rows (8 or 16) as the transposed tile multiplies it, lane r of every vector
    row r's. The integer sum is sum over groups of scale * sum(w . x[at..at + 3]) (scale None: 1)
    - offset * sum(x) (- bsum_dot << bsum_shift, Q6_K's - 32); it adds float(sum) * (d * d_x) to
    the accumulator, then m * s_x (Q4_1, Q5_1), then float(bsum_dot) * (bsum_scale * d_x) (Q4_K,
    Q5_K: -dmin), bsum_dot the sum over bsum_pairs of coefficients . Q8_K's bsums 2p, 2p + 1."""

    groups: list        # [() -> ([(<4n x i8> unsigned weights, at)], <n x i32> scale or None)]
    d: Any              # <n x float>
    offset: int = 0
    m: Any = None       # <n x float>
    bsum_pairs: list = ()  # [(<2n x i16> coefficients, p)]
    bsum_scale: Any = None  # <n x float>
    bsum_shift: int | None = None  # the bsum term in the integer sum instead
    # Each half of a group sums to an int16 (Q4_K: |16 * 15 * 128| < 2^15), so `vpdpwssd` by
    # the scale (in each lane's low int16) multiplies and adds a half in one instruction, where a
    # whole group's sum needed `vpmulld` (2 uops) and an add: the same integers.
    halves_in_words: bool = False


def _as_bytes(builder, vector):
    return builder.bitcast(vector, ir.VectorType(I8, 4 * vector.type.count))


def _rows_legacy(layout, offset=0, affine=False):
    """A legacy block of n rows: one group, weights lane r's 4 bytes multiplying activation bytes
    at..at + 3. Q8_0's signed bytes pass as w + 128 (offset 128), the 4-bit formats' nibbles as
    they are, Q5_0 / Q5_1's fifth bits from qh as 16 where set."""
    five_bit = "qh" in layout._fields

    def emit(builder, blocks):
        n = len(blocks)
        d = _per_row(builder, blocks, layout.d)
        m = _per_row(builder, blocks, layout.m) if affine else None
        if layout is Q8_0:
            flip = lanes.constant(4 * n, 0x80)
            weights = [(builder.xor(_as_bytes(builder, v), flip), 4 * k)
                       for k, v in enumerate(_transposed(builder, blocks, layout.qs, QK // 4))]
            return RowLanes([lambda: (weights, None)], d, 128)
        high = _as_bytes(builder, _transposed(builder, blocks, layout.qh, 1)[0]) if five_bit else None
        weights = []
        for k, packed in enumerate(_transposed(builder, blocks, layout.qs, QK // 8)):
            packed = _as_bytes(builder, packed)
            for at, w in ((4 * k, builder.and_(packed, lanes.constant(4 * n, 15))),  # low nibbles
                          (16 + 4 * k, builder.lshr(packed, lanes.constant(4 * n, 4)))):  # high ones
                if five_bit:  # byte i of lane r: bit at + i of row r's qh, as 16
                    spread = lanes.pick(builder, high, [4 * r + at // 8 for r in range(n) for _ in range(4)])
                    bits = ir.Constant(ir.VectorType(I8, 4 * n), [1 << ((at + i) % 8) for _ in range(n) for i in range(4)])
                    set_ = builder.icmp_unsigned("!=", builder.and_(spread, bits), lanes.constant(4 * n, 0))
                    w = builder.or_(w, builder.select(set_, lanes.constant(4 * n, 16), lanes.constant(4 * n, 0)))
                weights.append((w, at))
        return RowLanes([lambda: (weights, None)], d, offset, m)
    return emit


def _k_scales_mins_lanes(builder, blocks, at):
    """([<n x i32>] * 8, [<n x i32>] * 8): group g's 6-bit scale and min of each of n rows' Q4_K /
    Q5_K super-blocks (lanes.k_scales_mins' bit layout, read here lane-wise from the 12 packed
    bytes at byte `at` transposed as 3 dwords: shifts and masks, no shuffles per row)."""
    packed = _transposed(builder, blocks, at, 3)  # bytes 0-3, 4-7, 8-11 of each row
    splat = lambda value: lanes.constant(len(blocks), value, I32)  # noqa: E731

    def bits(vector, shift, mask):
        return builder.and_(builder.lshr(vector, splat(shift)) if shift else vector, splat(mask))

    def field(g, low, nibble):
        """Group g's 6 bits: groups 0-3 the low 6 bits of byte g of `low` (bytes 0-3 for scales,
        4-7 for mins); groups 4-7 the nibble at bit `nibble` of byte g of bytes 8-11, with bits
        4-5 from the top 2 bits of byte g - 4 of `low`."""
        if g < 4:
            return bits(low, 8 * g, 63)
        top = builder.shl(bits(low, 8 * (g - 4) + 6, 3), splat(4))
        return builder.or_(bits(packed[2], 8 * (g - 4) + nibble, 15), top)
    return [field(g, packed[0], 0) for g in range(8)], [field(g, packed[1], 4) for g in range(8)]


def _rows_k_quant(layout):
    """A Q4_K / Q5_K super-block of n rows: 8 groups of 32 weights, each with its 6-bit scale per
    row; the mins multiply Q8_K's bsums (each pair 2p, 2p + 1 by group p's min). A group's
    weights are emitted when the tile asks for them, so only one group's are live at a time."""
    five_bit = "qh" in layout._fields

    def emit(builder, blocks):
        n = len(blocks)
        scales, mins = _k_scales_mins_lanes(builder, blocks, layout.scales)
        high = []  # Q5_K's qh, transposed when the first group needs it
        packed = {}  # each pair of groups' 32 bytes a row, transposed when the first of them needs them

        def group(g):
            pair = g // 2  # groups 2 * pair (low nibbles) and 2 * pair + 1 (high) share 32 bytes
            if pair not in packed:
                packed[pair] = [_as_bytes(builder, v) for v in _transposed(builder, blocks, layout.qs + 32 * pair, 8)]
            if five_bit and not high:
                high.extend(_as_bytes(builder, v) for v in _transposed(builder, blocks, layout.qh, 8))
            weights = []
            for k, v in enumerate(packed[pair]):
                w = builder.and_(v, lanes.constant(4 * n, 15)) if g % 2 == 0 else builder.lshr(v, lanes.constant(4 * n, 4))
                if five_bit:  # bit g of qh byte l is weight l's fifth bit
                    fifth = builder.and_(builder.lshr(high[k], lanes.constant(4 * n, g)), lanes.constant(4 * n, 1))
                    w = builder.or_(w, builder.shl(fifth, lanes.constant(4 * n, 4)))
                weights.append((w, 32 * g + 4 * k))
            return weights, scales[g]
        sixteen = lanes.constant(n, 16, I32)  # each min in both int16 halves of its lane
        pairs = [(builder.bitcast(builder.or_(m, builder.shl(m, sixteen)), ir.VectorType(I16, 2 * n)), p)
                 for p, m in enumerate(mins)]
        return RowLanes([functools.partial(group, g) for g in range(8)], _per_row(builder, blocks, layout.d),
                        bsum_pairs=pairs, bsum_scale=builder.fneg(_per_row(builder, blocks, layout.dmin)),
                        halves_in_words=lanes.VNNI and not five_bit)
    return emit


def _rows_q6_k(builder, blocks):
    """A Q6_K super-block of n rows: 16 groups of 16 weights q - 32 (q: a nibble of ql, 2 bits of
    qh; lanes.q6_k_half's layout, as _q6_k reads it), an int8 scale each per row; the - 32 goes
    through Q8_K's bsums into the integer sum, as in the row-major tile, so the results are the
    same bits."""
    n = len(blocks)
    scale_bytes = _transposed(builder, blocks, Q6_K.scales, 4)  # group g's: byte g % 4 of vector g // 4
    scales = [builder.ashr(builder.shl(scale_bytes[g // 4], lanes.constant(n, 24 - 8 * (g % 4), I32)),
                           lanes.constant(n, 24, I32)) for g in range(16)]
    chunks = {}  # 32 bytes a row at byte `at`, transposed when a group first needs them

    def chunk(at):
        if at not in chunks:
            chunks[at] = [_as_bytes(builder, v) for v in _transposed(builder, blocks, at, 8)]
        return chunks[at]

    def group(g):
        h, c = divmod(g // 2, 4)  # 32 weights: groups 2u and 2u + 1, quarter c of half h
        low, high = chunk(Q6_K.ql + 64 * h + 32 * (c % 2)), chunk(Q6_K.qh + 32 * h)
        dwords = range(4 * (g % 2), 4 * (g % 2) + 4)
        return [(lanes.fields(builder, low[k], ir.Constant(I8, 4 * (c // 2)), ir.Constant(I8, 15), high[k],
                              ir.Constant(I8, 2 * c), ir.Constant(I8, 3), 4), 16 * g + 4 * (k % 4))
                for k in dwords], scales[g]
    sixteen = lanes.constant(n, 16, I32)  # scales 2p and 2p + 1 in the int16 halves of a lane
    pairs = [(builder.bitcast(builder.or_(builder.and_(scales[2 * p], lanes.constant(n, 0xFFFF, I32)),
                                          builder.shl(scales[2 * p + 1], sixteen)), ir.VectorType(I16, 2 * n)), p)
             for p in range(8)]
    return RowLanes([functools.partial(group, g) for g in range(16)], _per_row(builder, blocks, Q6_K.d),
                    bsum_pairs=pairs, bsum_shift=5)


ROWS_DOT = {QType.Q4_0: _rows_legacy(Q4_0, offset=8), QType.Q4_1: _rows_legacy(Q4_1, affine=True),
            QType.Q5_0: _rows_legacy(Q5_0, offset=16), QType.Q5_1: _rows_legacy(Q5_1, affine=True),
            QType.Q4_K: _rows_k_quant(Q4_K), QType.Q5_K: _rows_k_quant(Q5_K)}
if TILE_ROWS == 16:  # on 8 lanes Q6_K's 16 group scales a row made this layout slower (287 -> 245 GOPS, T = 128)
    ROWS_DOT[QType.Q6_K] = _rows_q6_k
if lanes.VNNI:  # Q8_0's w + 128 (up to 255) would saturate vpmaddubsw's int16 pairs without it
    ROWS_DOT[QType.Q8_0] = _rows_legacy(Q8_0)


def _rows_in_lanes_codegen(fmt, n_rows, n_columns):
    """dot_tile's code for n_rows (8 or 16) x n_columns of a format in ROWS_DOT: one
    <n_rows x float> accumulator per column, its lanes the rows."""
    emit = ROWS_DOT[fmt.qtype]

    def codegen(context, builder, signature, args):
        rows = _tile_rows(builder, args[2], args[11], n_rows)
        blocks0 = [lanes.byte_pointer(context, builder, signature.args[1], args[1], row) for row in rows]
        gather = n_columns > 1  # the per-row fields by gathers (RowBlocks), from these addresses
        addresses0 = ir.Constant(ir.VectorType(I64, n_rows), None)
        for r, block in enumerate(blocks0 if gather else ()):
            addresses0 = builder.insert_element(addresses0, builder.ptrtoint(block, I64), ir.Constant(I32, r))
        n_blocks, at_block = _activation_blocks(context, builder, signature, args, fmt)
        row_vector = ir.VectorType(lanes.F32, n_rows)
        no_sums = ir.Constant(ir.VectorType(I32, n_rows), None)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(row_vector, None)) for _ in range(n_columns)]
        prefetch = _next_tile_prefetch(context, builder, signature, args, rows, fmt)
        with cgutils.for_range(builder, n_blocks) as loop:
            b = loop.index
            prefetch(b)
            xq, xd, xs, xsum = at_block(b)
            offset = builder.mul(b, ir.Constant(b.type, fmt.type_size))
            addresses = builder.add(addresses0, lanes.splat(builder, builder.sext(offset, I64), n_rows)) if gather else None
            block = emit(builder, RowBlocks(builder, [builder.gep(row, [offset]) for row in blocks0], addresses,
                                            fmt.type_size))
            column = lambda array, at, kind: lanes.splat(builder, lanes.load(builder, array, at, kind), n_rows)  # noqa: E731
            # Group by group, every column: only one group's weights are live. Column by column,
            # LLVM kept all 64 vectors of a Q4_K super-block and reloaded them from the stack; and
            # it interleaves the groups again unless a fence between them keeps each group's loads
            # in place (the 1B shape's batch of 8 decode steps 62-67 -> 57-59 ms).
            column_sums = [no_sums] * n_columns
            for k, group in enumerate(block.groups):
                if k:
                    lanes.memory_fence(builder)
                weights, group_scale = group()
                # At 16 columns LLVM turned those vpdpwssd back into vpmaddwd + vpaddd and spilled
                # more: 5682 -> 6463 instructions a super-block and no faster; vpmulld stays there.
                in_words = block.halves_in_words and n_columns <= 8
                half = len(weights) // 2
                parts = [weights[:half], weights[half:]] if in_words else [weights]
                for j in range(n_columns):
                    for part in parts:
                        dots = column_sums[j] if group_scale is None else no_sums
                        for w, at in part:
                            x = builder.bitcast(column(xq, j * fmt.block_size + at, I32), w.type)
                            dots = lanes.dot_bytes(builder, dots, w, x)
                        if group_scale is None:
                            column_sums[j] = dots
                        elif in_words:
                            words = ir.VectorType(I16, 2 * n_rows)
                            column_sums[j] = lanes.dot_words(builder, column_sums[j], builder.bitcast(dots, words),
                                                             builder.bitcast(group_scale, words))
                        else:
                            column_sums[j] = builder.add(column_sums[j], builder.mul(dots, group_scale))
            for j in range(n_columns):
                sums = column_sums[j]
                if block.offset:
                    x_sum = builder.sext(lanes.load(builder, xsum, 2 * j, I16), I32)
                    sums = builder.sub(sums, lanes.splat(builder, builder.mul(x_sum, ir.Constant(I32, block.offset)),
                                                         n_rows))
                bsum_dot = no_sums
                for coefficients, p in block.bsum_pairs:
                    bsums = builder.bitcast(column(xsum, 32 * j + 4 * p, I32), coefficients.type)
                    bsum_dot = lanes.dot_words(builder, bsum_dot, coefficients, bsums)
                if block.bsum_shift is not None:
                    sums = builder.sub(sums, builder.shl(bsum_dot, lanes.constant(n_rows, block.bsum_shift, I32)))
                d_x = column(xd, 4 * j, lanes.F32)
                acc = lanes.fma(builder, builder.sitofp(sums, row_vector), builder.fmul(block.d, d_x),
                                builder.load(accs[j]))
                if block.m is not None:
                    acc = lanes.fma(builder, block.m, column(xs, 4 * j, lanes.F32), acc)
                if block.bsum_scale is not None:
                    acc = lanes.fma(builder, builder.sitofp(bsum_dot, row_vector), builder.fmul(block.bsum_scale, d_x), acc)
                builder.store(acc, accs[j])
        totals = [builder.load(acc) for acc in accs]
        _store_outputs(context, builder, signature, args, n_rows, n_columns,
                       lambda i, j: builder.extract_element(totals[j], ir.Constant(I32, i)))
        return context.get_dummy_value()
    return codegen


def _activation_blocks(context, builder, signature, args, fmt):
    """(number of blocks, at(b)): the i8* to block b of each activation array (xq, xd, xs, xsum),
    column t. Each array is C-contiguous (blocks, T, ...): column t + j of block b sits at
    data + b * strides[0] + (t + j) * column_bytes."""
    t_ = args[8]
    column_bytes = (fmt.block_size, 4, 4, 32 if fmt.block_size == QK_K else 2)
    views = [context.make_array(signature.args[i])(context, builder, args[i]) for i in (4, 5, 6, 7)]
    n_blocks = cgutils.unpack_tuple(builder, views[1].shape)[0]
    strides = [cgutils.unpack_tuple(builder, view.strides)[0] for view in views]
    starts = [builder.gep(builder.bitcast(view.data, I8.as_pointer()), [builder.mul(t_, ir.Constant(t_.type, size))])
              for view, size in zip(views, column_bytes)]
    return n_blocks, lambda b: [builder.gep(start, [builder.mul(b, stride)]) for start, stride in zip(starts, strides)]


def _tile_rows(builder, r, spacing, n_rows):
    """The tile's row indices: r, r + spacing, ..., r + (n_rows - 1) * spacing."""
    return [builder.add(r, builder.mul(builder.sext(spacing, r.type), ir.Constant(r.type, i))) for i in range(n_rows)]


def _next_tile_prefetch(context, builder, signature, args, rows, fmt):
    """prefetch(b) hints block b of the next tile's rows: one tile ahead, a block at a time, as
    decode streams its rows (a burst of whole rows at the start of a tile hid less of the memory
    latency: the 7B shape's decode step 236 -> 207-212 ms; the 1B shape's batch of 8 decode steps
    77 -> 66 ms). The next tile's rows are each one row further when the rows are spaced
    (matvec's bands), else the ones after these. Tiles of several columns after a unit's first
    read its rows from the caches; prefetching the next unit again is cheap next to their work."""
    spacing, r_ = args[11], args[2]
    one = ir.Constant(spacing.type, 1)
    ahead = builder.select(builder.icmp_signed("==", spacing, one), ir.Constant(r_.type, len(rows)),
                           ir.Constant(r_.type, 1))
    next_rows = [lanes.byte_pointer(context, builder, signature.args[1], args[1], builder.add(row, ahead))
                 for row in rows]

    def prefetch(b):
        for row in next_rows:
            base = builder.gep(row, [builder.mul(b, ir.Constant(b.type, fmt.type_size))])
            # Every 64th byte from the block's start: with the next block's start that is a byte of
            # every line the rows run over (a Q4_1 tile of 4 columns had spent 18% of its
            # instructions on prefetching the lines of each 20-byte block twice).
            for at in range(0, fmt.type_size, 64):
                lanes.prefetch_address(builder, builder.gep(base, [ir.Constant(I32, at)]))
    return prefetch


def _store_outputs(context, builder, signature, args, n_rows, n_columns, value):
    """out[t + j, row i of the tile] = value(i, j) (a float32), for every i < n_rows, j < n_columns."""
    t_, out_ = args[8], args[10]
    out_view = context.make_array(signature.args[10])(context, builder, out_)
    out_stride = cgutils.unpack_tuple(builder, out_view.strides)[0]
    data = builder.bitcast(out_view.data, I8.as_pointer())
    for i, row in enumerate(_tile_rows(builder, args[2], args[11], n_rows)):
        for j in range(n_columns):
            column = builder.add(t_, ir.Constant(t_.type, j))
            at = builder.add(builder.mul(column, out_stride), builder.mul(row, ir.Constant(row.type, 4)))
            builder.store(value(i, j), builder.bitcast(builder.gep(data, [at]), lanes.F32.as_pointer()), align=4)


@intrinsic
def dot_tile(typingctx, qtype, rows, r, height, xq, xd, xs, xsum, t, width, out, spacing):
    """out[t + j, r_i] = row r_i of `rows` (uint8 (n_rows, row_bytes), format `qtype`) . column
    t + j of the activations (quantize_activations' arrays, as it makes them), r_i = r + i *
    spacing, i < height, j < width. qtype, height, width: literals, each a power of 2, height *
    width <= 8 or height 8 or 16 (rows across the lanes for the formats in ROWS_DOT, else
    row-major tiles one after another).

    Row-major: one float32 accumulator per (row, column), lanes of a vector (an alloca, which LLVM keeps in
    a register); per block, the integer sums of every term and every lane of the tile are reduced
    together (lanes.sum_per_vector), and each term is scaled with one multiply and one FMA. Lane (i, j) gets the
    same float operations whatever the tile's shape, which makes every shape's results equal."""
    if not all(isinstance(a, types.IntegerLiteral) for a in (qtype, height, width)):
        return None
    fmt = FORMATS[QType(qtype.literal_value)]
    n_rows, n_columns = height.literal_value, width.literal_value
    if n_rows in (EIGHT, 2 * EIGHT) and fmt.qtype in ROWS_DOT:
        codegen = _rows_in_lanes_codegen(fmt, n_rows, n_columns)
    else:  # row-major tiles of at most 8 lanes, one after another
        per_pass = min(n_rows, EIGHT // n_columns)
        passes = [(first, _row_major_codegen(fmt, per_pass, n_columns)) for first in range(0, n_rows, per_pass)]

        def codegen(context, builder, signature, args):
            r_, spacing = args[2], args[11]
            for first, emit_tile in passes:
                first_row = builder.add(r_, builder.mul(builder.sext(spacing, r_.type), ir.Constant(r_.type, first)))
                emit_tile(context, builder, signature, [*args[:2], first_row, *args[3:]])
            return context.get_dummy_value()
    return types.none(qtype, rows, r, height, xq, xd, xs, xsum, t, width, out, spacing), codegen


# ------------------------------------------------------------------ the kernels

# Matrices one kernel call takes (q, k and v): a smaller group is padded with empty ones, so each
# format compiles one specialization, not one per group size (a tuple's length is part of its type).
FUSED = 3
UNITS_PER_TASK = 16 // TILE_ROWS  # 16 rows a task: they stay in L1/L2 while every column tile runs
# Columns per pass over a unit of rows, row-major tiles (measured: 4 -> 8 is 1.2-1.4x, 16 worse)
# and rows across the lanes (8 -> 16: Q4_0 4096 x 4096, T = 128, 410 -> 459 GOPS; Q4_K 299 -> 325).
COLUMN_TILE = {False: 8, True: 16}
# What pads a group: a matrix of no rows and its output (any T: the kernels never index it).
NO_ROWS, NO_OUTPUT = np.empty((0, 0), np.uint8), np.empty((0, 0), F32)
NO_ROWS.flags.writeable = False


# Decode: 8 rows across the lanes for the formats in ROWS_DOT (the 1B shape's decode step: 47.3 ->
# 41.3 ms for Q4_K; the 32-weight formats gained as much only once decode read in bands: Q4_0
# 14336 x 4096 from memory 19.8 -> 27.8 GB/s) but Q6_K; row-major tiles of 4 rows for the others
# (Q6_K, Q8_0 without VNNI), whose integer sums are then reduced together. Q6_K 14336 x 4096 from
# memory in bands, prefetched block by block: 24.0 GB/s with 1 row a tile, 32.6 with 4 (before
# either, 4 rows had measured 11 against 1's 18), 30.7 with 8 rows across the lanes.
ROW_MAJOR_DECODE_ROWS = 4


def decode_rows(qtype: QType) -> int:
    """Rows a tile of the one-column kernel runs, for format `qtype`."""
    return EIGHT if qtype in ROWS_DOT and qtype != QType.Q6_K else ROW_MAJOR_DECODE_ROWS


# Decode reads a matrix in bands of BAND_SPACING tiles: a tile takes rows r, r + BAND_SPACING, ...,
# and the next tile rows r + 1, r + 1 + BAND_SPACING, ..., each the continuation in memory of one
# of this tile's. Each thread then streams `height` long runs of memory at once, which the hardware
# prefetcher follows; tiles of consecutive rows end every stream at the end of a row (2.3 KB for a
# 4096-wide Q4_K row: 14336 x 4096 from memory 21.6 -> 29.8 GB/s, see docs/kernels.md).
BAND_SPACING = 64
# The tiles of several columns read in bands too, up to BANDED_COLUMNS columns (a batch of decode
# steps): the 1B shape's batch of 2 steps 32.7 -> 27.0 ms, of 4 41 -> 35.5, of 8 54.7 -> 49.8, of
# 16 97-103 -> 86-88. A prompt's chunk runs each unit's rows against many column tiles: there
# consecutive rows measured as fast or faster (SmolLM2's 320-token prefill).
BANDED_COLUMNS = 16


def tile_columns(n_columns: int) -> int:
    """How many columns to compute for n_columns of activations (the caller repeats the last
    one): one more for 3, 7 and 15, which would take a pass of every narrower tile width (2 + 1,
    4 + 2 + 1, ...) where one pass of the next width costs less. SmolLM2 q8, a batch of 7 decode
    steps: 10.8 -> 9.0-9.1 ms (8 alone 8.5); of 3: 7.5 -> 6.0-6.1. Padding 5 or 6 to 8 measured
    slower than 4 + 2 (docs/kernels-q8.md, session 14)."""
    return n_columns + 1 if n_columns >= 3 and n_columns & (n_columns + 1) == 0 else n_columns


@numba.njit(cache=True)
def band_tile(n_rows, u, height):
    """(first row, spacing) of tile u of a matrix of n_rows rows read `height` rows a tile in
    bands; the rows past the last whole band in tiles of consecutive rows (spacing 1)."""
    band_rows = height * BAND_SPACING
    banded = n_rows // band_rows * BAND_SPACING  # tiles inside whole bands
    if u < banded:
        return u // BAND_SPACING * band_rows + u % BAND_SPACING, BAND_SPACING
    return n_rows // band_rows * band_rows + (u - banded) * height, 1


@numba.njit(cache=True)
def n_units(matrices, rows_per_unit):
    """Whole `rows_per_unit`-row work units of all the matrices (a tuple of 2-D arrays)."""
    total = 0
    for m in range(len(matrices)):
        total += matrices[m].shape[0] // rows_per_unit
    return total


@numba.njit(cache=True)
def unit(matrices, rows_per_unit, i):
    """(matrix, its unit) of work unit i, the units counted matrix by matrix. A function of its
    own, not inlined (parfors reject an inlined body that reassigns the loop index) and no
    arrays (an allocation here compiled np.empty's implementation anew in every process)."""
    m, i = 0, np.int64(i)  # a parallel loop's index may be unsigned: int64 - uint64 is a float
    while i >= matrices[m].shape[0] // rows_per_unit:
        i -= matrices[m].shape[0] // rows_per_unit
        m += 1
    return m, i


def _matmul_q8_kernels(qtype: int):
    """(matvec, matmul_tiles): the q8 matmul of one format (`qtype` a closure constant, typed
    as a literal: see matvec._matvec_kernel), over a tuple of matrices that share their input
    (q, k and v; gate and up) in one parallel loop: one fork and join per group instead of one
    per matrix, and the rows of all of them split evenly between the threads. Several columns run TILE_ROWS rows
    against COLUMN_TILE columns at a time (8, or 16 for the formats whose rows go across the
    lanes), then 8, 4, 2, and one at a time, in bands up to BANDED_COLUMNS columns; one column
    (decode) runs `step` rows a tile in bands, in a parallel loop of its own (inside the tiled
    kernel's loop LLVM kept the wide tiles' pointers live and the one-column path ran from the
    stack). Every tile prefetches the
    next tile's rows block by block (_next_tile_prefetch). Every
    tile shape gives each (row, column) the same result (dot_tile). Each kernel quantizes x
    first, once for all its matrices: in the same compiled call, because a decode step makes ~120
    of these calls and a separate call (with its four arrays to box) cost ~5 us each."""
    step = decode_rows(QType(qtype))
    wide = COLUMN_TILE[QType(qtype) in ROWS_DOT]
    half_wide = wide // 2
    super_blocks = FORMATS[QType(qtype)].block_size == QK_K  # Q8_K activations, else Q8_0 / Q8_1

    @numba.njit(parallel=True, nogil=True, cache=True)
    def matmul_tiles(matrices, x, outs):
        xq, xd, xs, xsum = quantize_activations(x, super_blocks)
        n_columns = x.shape[0]
        # Column passes of decreasing width (16,) 8, 4, 2, 1: each tile as wide as what is left allows.
        tiled = n_columns - n_columns % wide
        half = tiled + (n_columns - tiled) // half_wide * half_wide
        quad = half + (n_columns - half) // 4 * 4
        pair = quad + (n_columns - quad) // 2 * 2
        n_tiles = n_units(matrices, TILE_ROWS)
        banded = n_columns <= BANDED_COLUMNS
        for task in prange((n_tiles + UNITS_PER_TASK - 1) // UNITS_PER_TASK):
            first, last = task * UNITS_PER_TASK, min(n_tiles, (task + 1) * UNITS_PER_TASK)
            for i in range(first, last):
                m, u = unit(matrices, TILE_ROWS, i)
                r, spacing = band_tile(matrices[m].shape[0], u, TILE_ROWS) if banded else (u * TILE_ROWS, 1)
                for t in range(0, tiled, wide):
                    dot_tile(qtype, matrices[m], r, TILE_ROWS, xq, xd, xs, xsum, t, wide, outs[m], spacing)
                for t in range(tiled, half, half_wide):
                    dot_tile(qtype, matrices[m], r, TILE_ROWS, xq, xd, xs, xsum, t, half_wide, outs[m], spacing)
                for t in range(half, quad, 4):
                    dot_tile(qtype, matrices[m], r, TILE_ROWS, xq, xd, xs, xsum, t, 4, outs[m], spacing)
                for t in range(quad, pair, 2):
                    dot_tile(qtype, matrices[m], r, TILE_ROWS, xq, xd, xs, xsum, t, 2, outs[m], spacing)
                for t in range(pair, n_columns):
                    for k in range(0, TILE_ROWS, step):
                        dot_tile(qtype, matrices[m], r + k * spacing, step, xq, xd, xs, xsum, t, 1, outs[m], spacing)
        for m in range(len(matrices)):  # the rows past each matrix's last whole unit: 8, then 1 at a time
            n_rows = matrices[m].shape[0]
            eights = n_rows // EIGHT * EIGHT
            for r in range(n_rows // TILE_ROWS * TILE_ROWS, eights, EIGHT):
                for t in range(n_columns):
                    dot_tile(qtype, matrices[m], r, EIGHT, xq, xd, xs, xsum, t, 1, outs[m], 1)
            for r in range(eights, n_rows):
                for t in range(n_columns):
                    dot_tile(qtype, matrices[m], r, 1, xq, xd, xs, xsum, t, 1, outs[m], 1)

    @numba.njit(parallel=True, nogil=True, cache=True)
    def matvec(matrices, x, outs):
        xq, xd, xs, xsum = quantize_activations(x, super_blocks)
        for i in prange(n_units(matrices, step)):
            m, u = unit(matrices, step, i)
            rows = matrices[m]
            r, spacing = band_tile(rows.shape[0], u, step)
            dot_tile(qtype, rows, r, step, xq, xd, xs, xsum, 0, 1, outs[m], spacing)
        for m in range(len(matrices)):
            for r in range(matrices[m].shape[0] // step * step, matrices[m].shape[0]):
                dot_tile(qtype, matrices[m], r, 1, xq, xd, xs, xsum, 0, 1, outs[m], 1)

    return matvec, matmul_tiles


Q8_KERNELS = {t: _matmul_q8_kernels(int(t)) for t in BLOCK_DOT}  # (one column, several) by format


class FusedQ8:
    """outs[m] = x @ W_m.T with llama.cpp's numerics for matrices of one format that share their
    input: matrices a tuple (any length) of W_m's rows, uint8 (n_rows_m, row_bytes), all
    read-only; called with x float32 (T, n), C-contiguous, quantized inside
    (quantize_activations), and outs as many float32 (T, n_rows_m). One kernel call per FUSED
    matrices, a smaller group padded with empty ones; the argument tuples are built here, once:
    a decode step makes ~120 of these calls, and building them on each cost ~1 us, with the
    caller's ~1.3 us ~6% of SmolLM2's step. Python, not a compiled wrapper: a compiled closure
    that calls other compiled functions cannot be cached, and recompiling it cost every new
    process ~1.3 s."""

    def __init__(self, qtype: QType, matrices: tuple[np.ndarray, ...]):
        self.one_column, self.columns = Q8_KERNELS[QType(qtype)]
        self.calls = []  # (first matrix, the group's matrices padded, the outputs' padding)
        for at in range(0, len(matrices), FUSED):
            group = matrices[at:at + FUSED]
            pad = FUSED - len(group)
            self.calls.append((at, group + (NO_ROWS,) * pad, (NO_OUTPUT,) * pad))

    def __call__(self, x: np.ndarray, outs: Sequence[np.ndarray]) -> None:
        kernel = self.one_column if x.shape[0] == 1 else self.columns
        for at, group, padding in self.calls:
            kernel(group, x, tuple(outs[at:at + FUSED]) + padding)


# MATMUL_Q8[qtype](matrices, x, outs): a FusedQ8 for one call (tests, benchmarks).
MATMUL_Q8 = {t: lambda matrices, x, outs, qtype=t: FusedQ8(qtype, matrices)(x, outs) for t in BLOCK_DOT}


def matmul_q8(rows: np.ndarray, qtype: QType, x: np.ndarray) -> np.ndarray:
    """x @ W.T (float32 (T, n_rows)) for W's rows (uint8 (n_rows, row_bytes), read-only) and x
    (float32 (T, n)): MATMUL_Q8 for one matrix. For tests and benchmarks; the model goes
    through kernels.dispatch, which multiplies matrices that share x in one call."""
    out = np.empty((x.shape[0], rows.shape[0]), F32)
    MATMUL_Q8[qtype]((rows,), np.ascontiguousarray(x), (out,))
    return out
