"""Block formats unpacked in LLVM vector lanes: the building blocks of the CPU intrinsics.

Numba's loop vectorizer handles a block's 16- or 32-weight loops badly (fully unrolled and left
scalar, or vectorized for long trip counts and never entered; see docs/kernels-q8.md), so the hot
kernels emit fixed-width LLVM vector IR themselves through `numba.extending.intrinsic`:
kernels.cpu.vec_dot multiplies the unpacked weights with int8 activations, kernels.cpu.dequant
scales them to float32. Both unpack with the functions here, so each format's bit layout in
lanes is written once. The IR is target-independent; LLVM picks the instructions (AVX-512 VNNI
and GFNI byte shifts on these machines).

Conventions: `builder` is an llvmlite IRBuilder; byte vectors are <n x i8>; no bounds checks
(callers index whole blocks inside tensors whose size the dispatch checked).

`prefetch_row` is here too, the one memory hint the matvec kernels give.
"""
import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

I8, I32, F32 = ir.IntType(8), ir.IntType(32), ir.FloatType()


def bytes_at(context, builder, array_type, array, at, n):
    """<n x i8> loaded from array[at:at + n] (array: a Numba uint8/int8 array value)."""
    data = context.make_array(array_type)(context, builder, array).data
    pointer = builder.bitcast(builder.gep(data, [at]), ir.VectorType(I8, n).as_pointer())
    return builder.load(pointer, align=1)


def splat(builder, value, n):
    """<n x T> with every lane `value` (a T)."""
    vector = builder.insert_element(ir.Constant(ir.VectorType(value.type, n), None), value,
                                    ir.Constant(I32, 0))
    return builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(I32, n), [0] * n))


def byte_splat(builder, value, n):
    """<n x i8> with every lane the integer `value` truncated to 8 bits."""
    return splat(builder, builder.trunc(value, I8) if value.type.width > 8 else value, n)


def constant(n, value, element=I8):
    return ir.Constant(ir.VectorType(element, n), [value] * n)


def concat(builder, a, b):
    """<2n x T>: the lanes of a, then the lanes of b (both <n x T>)."""
    n = a.type.count
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(I32, 2 * n), list(range(2 * n))))


def reduce_add(builder, vector):
    """The sum of an integer vector's lanes (llvm.vector.reduce.add), in its element type."""
    function = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vector.type.element, [vector.type]),
        f"llvm.vector.reduce.add.v{vector.type.count}i{vector.type.element.width}")
    return builder.call(function, [vector])


def nibble_pairs(builder, packed, high):
    """<2n x i8> weights of a legacy block from its n packed bytes (<n x i8>): weight j < n is
    packed[j] & 15, weight n + j is packed[j] >> 4; with `high` (an integer: Q5_0/Q5_1's qh,
    or None for Q4_0/Q4_1), bit j of high is added as 16 to weight j."""
    n = packed.type.count
    weights = concat(builder, builder.and_(packed, constant(n, 15)),
                     builder.lshr(packed, constant(n, 4)))
    if high is None:
        return weights
    # high's bits as a lane mask (bit j -> lane j on little-endian targets) selecting 16 or 0:
    # one mask-register move and a masked byte move on AVX-512, where shifting a splat by each
    # lane's index needs 32-bit lanes and narrowing (Q5_0 float matvec, 1 thread: 5.3 -> 7.1 GB/s).
    word = ir.IntType(2 * n)
    high_word = builder.zext(high, word) if high.type.width < 2 * n else builder.trunc(high, word)
    fifth = builder.select(builder.bitcast(high_word, ir.VectorType(ir.IntType(1), 2 * n)),
                           constant(2 * n, 16), constant(2 * n, 0))
    return builder.or_(weights, fifth)


def fields(builder, low, shift, low_mask, high, h_shift, h_mask, h_pos):
    """<n x i8> weights of k-quant groups, lane j being
    ((low[j] >> shift) & low_mask) | (((high[j] >> h_shift) & h_mask) << h_pos).
    low, high: <n x i8>; the rest integers (h_pos a Python int). With h_mask 0, low alone."""
    n = low.type.count
    weights = builder.and_(builder.lshr(low, byte_splat(builder, shift, n)),
                           byte_splat(builder, low_mask, n))
    top = builder.and_(builder.lshr(high, byte_splat(builder, h_shift, n)),
                       byte_splat(builder, h_mask, n))
    return builder.or_(weights, builder.shl(top, constant(n, h_pos)))


def vector_at(context, builder, array_type, array, at, n):
    """<n x T> loaded from array[at:at + n], T the array's element type."""
    data = context.make_array(array_type)(context, builder, array).data
    pointer = builder.bitcast(builder.gep(data, [at]),
                              ir.VectorType(data.type.pointee, n).as_pointer())
    return builder.load(pointer, align=1)


def pick(builder, vector, indices):
    """<len(indices) x T> with lane k = vector[indices[k]]; an index None gives a zero lane."""
    zero = ir.Constant(vector.type, None)
    n = vector.type.count
    return builder.shuffle_vector(vector, zero, ir.Constant(
        ir.VectorType(I32, len(indices)), [n if i is None else i for i in indices]))


def k_scales_mins(builder, packed):
    """(<8 x i8> scales, <8 x i8> mins): the 6-bit scale and min of the 8 groups of a Q4_K / Q5_K
    super-block from its 12 packed bytes (<12 x i8>). Groups 0-3: the low 6 bits of bytes 0-3
    (scales) and 4-7 (mins); groups 4-7: the low (scales) or high (mins) nibble of bytes 8-11,
    with bits 4-5 from the top 2 bits of bytes 0-3 (scales) or 4-7 (mins)."""
    def top_bits(first):  # bits 6-7 of bytes first..first + 3 as bits 4-5 of groups 4-7
        upper_bytes = pick(builder, packed, [None] * 4 + list(range(first, first + 4)))
        return builder.shl(builder.lshr(upper_bytes, constant(8, 6)), constant(8, 4))
    low_scales = builder.and_(pick(builder, packed, [0, 1, 2, 3, 8, 9, 10, 11]),
                              ir.Constant(ir.VectorType(I8, 8), [63] * 4 + [15] * 4))
    low_mins = builder.and_(builder.lshr(pick(builder, packed, [4, 5, 6, 7, 8, 9, 10, 11]),
                                         ir.Constant(ir.VectorType(I8, 8), [0] * 4 + [4] * 4)),
                            ir.Constant(ir.VectorType(I8, 8), [63] * 4 + [15] * 4))
    return builder.or_(low_scales, top_bits(0)), builder.or_(low_mins, top_bits(4))


def q6_k_half(context, builder, array_type, w, ql_at, qh_at):
    """<128 x i8>: the signed weights q - 32 of one half of a Q6_K super-block, in weight order:
    quarter c takes its low 4 bits from ql[32 * (c % 2) + l] (nibble c // 2) and its top 2 bits
    from qh[l] bits 2c, 2c + 1, l < 32 (llama.cpp's layout)."""
    ql = bytes_at(context, builder, array_type, w, ql_at, 64)
    qh = bytes_at(context, builder, array_type, w, qh_at, 32)
    low = concat(builder, builder.and_(ql, constant(64, 15)), builder.lshr(ql, constant(64, 4)))
    # Top bits of quarter c moved to bits 4-5 with one uniform shift per quarter.
    top = [builder.and_(builder.shl(qh, constant(32, 4)), constant(32, 48)),
           builder.and_(builder.shl(qh, constant(32, 2)), constant(32, 48)),
           builder.and_(qh, constant(32, 48)),
           builder.and_(builder.lshr(qh, constant(32, 2)), constant(32, 48))]
    high = concat(builder, concat(builder, top[0], top[1]), concat(builder, top[2], top[3]))
    return builder.sub(builder.or_(low, high), constant(128, 32))


def store_scaled(context, builder, array_type, out, at, weights, scale, bias):
    """out[at + j] = scale * float(weights[j]) (+ bias), j < n, as float32 operations in that
    order (llama.cpp's, so the bits match). weights: <n x i8>, signed; scale, bias: float32
    values (bias None: no addition; a subtraction `- m` is passed as bias -m, the same bits)."""
    n = weights.type.count
    values = builder.fmul(splat(builder, scale, n),
                          builder.sitofp(weights, ir.VectorType(F32, n)))
    if bias is not None:
        values = builder.fadd(values, splat(builder, bias, n))
    data = context.make_array(array_type)(context, builder, out).data
    builder.store(values, builder.bitcast(builder.gep(data, [at]),
                                          ir.VectorType(F32, n).as_pointer()), align=4)


@intrinsic
def prefetch(typingctx, array, at):
    """Ask the CPU to start loading the cache line that holds array[at] (llvm.prefetch: read,
    keep in all cache levels). A hint: no effect on results, no fault on any address."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        pointer = builder.bitcast(builder.gep(data, [args[1]]), I8.as_pointer())
        llvm_prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [pointer.type, I32, I32, I32]),
            "llvm.prefetch.p0i8")
        builder.call(llvm_prefetch, [pointer, ir.Constant(I32, 0), ir.Constant(I32, 3),
                                     ir.Constant(I32, 1)])
        return context.get_dummy_value()
    return types.none(array, types.intp), codegen


@numba.njit(inline="always", cache=True)
def prefetch_row(rows, r):
    """Prefetch row r of `rows` (uint8 (n_rows, row_bytes)), when there is one. The matvec
    kernels call this for the next row before computing the current one: while weights stream
    from memory the hardware prefetcher alone left them at 7 GB/s (Q4_K, 2 threads), with it 19
    (bench/matvec.py --stream)."""
    if r < rows.shape[0]:
        row = rows[r]
        for at in range(0, row.size, 64):
            prefetch(row, at)
