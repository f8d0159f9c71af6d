"""Block formats unpacked in LLVM vector lanes: the building blocks of the CPU intrinsics.

Numba's loop vectorizer handles a block's 16- or 32-weight loops badly (fully unrolled and left
scalar, or vectorized for long trip counts and never entered; see docs/kernels-q8.md), so the hot
kernels emit fixed-width LLVM vector IR themselves through `numba.extending.intrinsic`:
kernels.cpu.vec_dot multiplies the unpacked weights with int8 activations, kernels.cpu.dequant
scales them to float32. Both unpack with the functions here, so each format's bit layout in
lanes is written once. The unpacking IR is target-independent; LLVM picks the instructions (AVX-512 VNNI
and GFNI byte shifts on these machines). The integer dot-product steps (`maddubs`, `madd`,
`sign_of`) call the x86 AVX2 instructions by name where the target has them (`native`, default
AVX2), since LLVM does not form `vpmaddubsw` from generic IR, and otherwise emit generic IR that
computes the same values.

Conventions: `builder` is an llvmlite IRBuilder; byte vectors are <n x i8>; no bounds checks
(callers index whole blocks inside tensors whose size the dispatch checked).

The memory hints are here too: `prefetch_address` (one cache line, from IR) and `prefetch_row`;
and `gather` (a vector of loads from n addresses) and `memory_fence` (a compiler-only barrier).
"""
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.registry import cpu_target
from numba.extending import intrinsic

I8, I16, I32, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
# Whether Numba compiles for a CPU with AVX2 (its target machine's features, which follow
# NUMBA_CPU_NAME / NUMBA_CPU_FEATURES when set): every machine of this project has it.
_FEATURES = cpu_target.target_context.codegen()._tm_features.split(",")
AVX2 = "+avx2" in _FEATURES
# Byte and word dot products that accumulate in one instruction (vpdpbusd, vpdpwssd on 256-bit
# lanes): AVX-512 VNNI with VL (Zen 4, Sapphire Rapids) or AVX-VNNI.
VNNI = ("+avx512vnni" in _FEATURES and "+avx512vl" in _FEATURES) or "+avxvnni" in _FEATURES
# The same on 512-bit lanes (AVX-512 VNNI; without it `dot_bytes` / `dot_words` on 16 lanes run
# as two 8-lane halves).
VNNI_512 = "+avx512vnni" in _FEATURES and "+avx512bw" in _FEATURES


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


def joined(builder, vectors):
    """The lanes of all `vectors` (a power-of-2 count of <n x T>) one after another, concatenated
    in pairs."""
    while len(vectors) > 1:
        vectors = [concat(builder, a, b) for a, b in zip(vectors[0::2], vectors[1::2])]
    return vectors[0]


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


def byte_pointer(context, builder, array_type, array, index=None):
    """i8* to the first byte of array (a Numba array value), or of its row `index` (an integer
    value) when given: data + index * strides[0]."""
    view = context.make_array(array_type)(context, builder, array)
    data = builder.bitcast(view.data, I8.as_pointer())
    if index is None:
        return data
    stride = cgutils.unpack_tuple(builder, view.strides)[0]
    return builder.gep(data, [builder.mul(builder.sext(index, stride.type), stride)])


def load(builder, pointer, at, element, n=None):
    """The element (n None) or <n x element> at byte offset `at` (a Python int or an integer
    value) from the i8* `pointer`, unaligned."""
    at = ir.Constant(I32, at) if isinstance(at, int) else at
    kind = element if n is None else ir.VectorType(element, n)
    return builder.load(builder.bitcast(builder.gep(pointer, [at]), kind.as_pointer()), align=1)


# Every half's float32 value, indexed by its bits: what `half` reads.
HALF_VALUES = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def half(builder, pointer, at):
    """The fp16 at byte `at` of the i8* `pointer`, as float32 (exact; NaNs as NumPy gives them):
    a lookup in HALF_VALUES, as ggml does on x86. LLVM lowers `fpext half` to a two-byte
    `vpinsrw` into a vector register it picks freely, keeping that register's other lanes, and
    in the q8 tile loops it picked the accumulator, so every block's scales waited for the
    previous block's sums; a scalar load from the table writes its whole register."""
    table = builder.module.globals.get("mistral_ref_half_values")
    if table is None:
        table = cgutils.global_constant(builder.module, "mistral_ref_half_values",
                                        ir.Constant(ir.ArrayType(F32, HALF_VALUES.size), HALF_VALUES.tolist()))
        table.linkage = "linkonce_odr"
    index = builder.zext(load(builder, pointer, at, I16), I32)
    return builder.load(builder.gep(table, [ir.Constant(I32, 0), index]))


def gather(builder, addresses, element):
    """<n x element>: the element at each of the n byte addresses (<n x i64>), in one gather
    instruction (vpgatherdd / vpgatherqd on AVX2 and AVX-512)."""
    n = addresses.type.count
    kind, pointers = ir.VectorType(element, n), ir.VectorType(element.as_pointer(), n)
    function = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(kind, [pointers, I32, ir.VectorType(ir.IntType(1), n), kind]),
        f"llvm.masked.gather.v{n}i{element.width}.v{n}p0")
    return builder.call(function, [builder.inttoptr(addresses, pointers), ir.Constant(I32, 1),
                                   ir.Constant(ir.VectorType(ir.IntType(1), n), [1] * n), ir.Constant(kind, None)])


def halves_to_float(builder, words):
    """<n x float> of the fp16 bits in <n x i16> `words` (vcvtph2ps: exact)."""
    n = words.type.count
    return builder.fpext(builder.bitcast(words, ir.VectorType(ir.HalfType(), n)), ir.VectorType(F32, n))


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


def call(builder, name, result, *args):
    """Call the LLVM intrinsic `name` (declared on first use) with args; result: its type."""
    function = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(result, [a.type for a in args]), name)
    return builder.call(function, list(args))


def fma(builder, a, b, c):
    """a * b + c lane by lane with one rounding (llvm.fma); a, b, c: <n x float>."""
    return call(builder, f"llvm.fma.v{a.type.count}f32", a.type, a, b, c)


def sum_lanes(builder, vector):
    """The float sum of the lanes of a <2^k x float>, halving: lanes [0, n/2) + [n/2, n), then
    again; always this order, and no fast-math flags, so the bits are the same in every kernel."""
    while vector.type.count > 1:
        n = vector.type.count // 2
        vector = builder.fadd(pick(builder, vector, list(range(n))),
                              pick(builder, vector, list(range(n, 2 * n))))
    return builder.extract_element(vector, ir.Constant(I32, 0))


# sum_per_vector's merges of two vectors A, B of 8 lanes, by how many adjacent lanes each source
# keeps together (w): the lanes of the low and the high shuffle, B's lanes numbered 8.. . Within
# each 128-bit half first (x86 unpack low / high of 32- and 64-bit elements), across the halves
# once, at the end (vperm2i128).
_MERGES = {1: ([0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]),
           2: ([0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]),
           4: ([0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15])}


def sum_per_vector(builder, vectors):
    """<k x i32>: the lane sums of k vectors <8 x i32> (k = 1, 2, 4, 8 or 16), vector j's in lane j.
    Pairs of vectors are merged by adding a shuffle of each one's lanes to a shuffle of the
    others (_MERGES: after merging at w, lanes hold partial sums of the vectors in runs of 2w),
    then the one vector left is folded, its high half added to its low half, down to k lanes.
    For k = 8: 14 in-half shuffles, 2 across the halves and 7 adds. Integer: exact in any order."""
    if len(vectors) > 8:
        return concat(builder, sum_per_vector(builder, vectors[:8]), sum_per_vector(builder, vectors[8:]))
    k, width = len(vectors), 1
    while len(vectors) > 1:
        low, high = (ir.Constant(ir.VectorType(I32, 8), lanes) for lanes in _MERGES[width])
        vectors = [builder.add(builder.shuffle_vector(a, b, low), builder.shuffle_vector(a, b, high))
                   for a, b in zip(vectors[0::2], vectors[1::2])]
        width *= 2
    vector = vectors[0]
    while vector.type.count > k:
        n = vector.type.count // 2
        vector = builder.add(pick(builder, vector, list(range(n))), pick(builder, vector, list(range(n, 2 * n))))
    return vector


def _widen(builder, vector, element, signed):
    kind = ir.VectorType(element, vector.type.count)
    return (builder.sext if signed else builder.zext)(vector, kind)


def _add_pairs(builder, vector):
    """<n/2 x T>: lanes 2k + 2k+1 of a <n x T>."""
    n = vector.type.count
    return builder.add(pick(builder, vector, list(range(0, n, 2))),
                       pick(builder, vector, list(range(1, n, 2))))


def maddubs(builder, unsigned, signed, native=AVX2):
    """<16 x i16>: unsigned[2k] * signed[2k] + unsigned[2k+1] * signed[2k+1] for two <32 x i8>,
    the first read as unsigned (vpmaddubsw). The instruction saturates to int16; every caller's
    operands keep |sum| <= 2 * 128 * 127 < 2^15, where it is exact, as the generic IR is."""
    if native:
        return call(builder, "llvm.x86.avx2.pmadd.ub.sw", ir.VectorType(I16, 16), unsigned, signed)
    return _add_pairs(builder, builder.mul(_widen(builder, unsigned, I16, False),
                                           _widen(builder, signed, I16, True)))


def madd(builder, a, b, native=AVX2):
    """<8 x i32>: a[2k] * b[2k] + a[2k+1] * b[2k+1] for two <16 x i16> (vpmaddwd; exact)."""
    if native:
        return call(builder, "llvm.x86.avx2.pmadd.wd", ir.VectorType(I32, 8), a, b)
    return _add_pairs(builder, builder.mul(_widen(builder, a, I32, True),
                                           _widen(builder, b, I32, True)))


def _dwords(builder, vector):
    """A vector as 32-bit lanes, the VNNI instructions' operand type."""
    return builder.bitcast(vector, ir.VectorType(I32, vector.type.count * vector.type.element.width // 32))


def _halves(builder, vector):
    n = vector.type.count // 2
    return pick(builder, vector, list(range(n))), pick(builder, vector, list(range(n, 2 * n)))


def _vnni(builder, name, acc, a, b, native, eight_lanes):
    """acc + VNNI instruction `name` (vpdpbusd, vpdpwssd) of a and b, on 8 or 16 int32 lanes:
    16 lanes in one 512-bit instruction where the target has it, else as two 8-lane halves."""
    if acc.type.count == 16 and native and VNNI_512:
        return call(builder, f"llvm.x86.avx512.{name}.512", acc.type, acc, _dwords(builder, a), _dwords(builder, b))
    if acc.type.count == 16:
        return concat(builder, *(eight_lanes(*halves) for halves in zip(*(_halves(builder, v) for v in (acc, a, b)))))
    return eight_lanes(acc, a, b)


def dot_bytes(builder, acc, unsigned, signed, native=VNNI):
    """<n x i32> (n 8 or 16): acc[k] + the sum of unsigned[4k + i] * signed[4k + i], i < 4, for
    two <4n x i8>, the first read as unsigned (vpdpbusd; exact). Without VNNI, maddubs then madd
    by ones, equal where maddubs does not saturate: callers without VNNI keep unsigned * signed
    pairs under 2^15."""
    def eight_lanes(acc, unsigned, signed):
        if native:
            return call(builder, "llvm.x86.avx512.vpdpbusd.256", acc.type, acc, _dwords(builder, unsigned),
                        _dwords(builder, signed))
        return builder.add(acc, madd(builder, maddubs(builder, unsigned, signed), constant(16, 1, I16)))
    return _vnni(builder, "vpdpbusd", acc, unsigned, signed, native, eight_lanes)


def dot_words(builder, acc, a, b, native=VNNI):
    """<n x i32> (n 8 or 16): acc + madd(a, b) for two <2n x i16> (vpdpwssd; exact)."""
    def eight_lanes(acc, a, b):
        if native:
            return call(builder, "llvm.x86.avx512.vpdpwssd.256", acc.type, acc, _dwords(builder, a),
                        _dwords(builder, b))
        return builder.add(acc, madd(builder, a, b))
    return _vnni(builder, "vpdpwssd", acc, a, b, native, eight_lanes)


def sign_of(builder, x, w, native=AVX2):
    """<32 x i8>: x[j] where w[j] > 0, -x[j] where w[j] < 0, 0 where w[j] == 0 (vpsignb): with
    |w| it turns a signed-by-signed byte product into maddubs' unsigned-by-signed one."""
    if native:
        return call(builder, "llvm.x86.avx2.psign.b", x.type, x, w)
    zero = ir.Constant(x.type, None)
    negative = builder.select(builder.icmp_signed("<", w, zero), builder.sub(zero, x), x)
    return builder.select(builder.icmp_signed("==", w, zero), zero, negative)


def magnitude(builder, w):
    """|w| lane by lane (<n x i8>; -128 stays 0x80, which maddubs reads as 128)."""
    return call(builder, f"llvm.abs.v{w.type.count}i8", w.type, w, ir.Constant(ir.IntType(1), 0))


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


def q6_k_half(builder, ql, qh):
    """<128 x i8>: the unsigned 6-bit weights q (0..63) of one half of a Q6_K super-block, in
    weight order, from its 64 bytes of ql and 32 of qh (<64 x i8>, <32 x i8>): quarter c takes
    its low 4 bits from ql[32 * (c % 2) + l] (nibble c // 2) and its top 2 bits from qh[l] bits
    2c, 2c + 1, l < 32 (llama.cpp's layout). The weight is q - 32."""
    low = concat(builder, builder.and_(ql, constant(64, 15)), builder.lshr(ql, constant(64, 4)))
    # Top bits of quarter c moved to bits 4-5 with one uniform shift per quarter.
    top = [builder.and_(builder.shl(qh, constant(32, 4)), constant(32, 48)),
           builder.and_(builder.shl(qh, constant(32, 2)), constant(32, 48)),
           builder.and_(qh, constant(32, 48)),
           builder.and_(builder.lshr(qh, constant(32, 2)), constant(32, 48))]
    high = concat(builder, concat(builder, top[0], top[1]), concat(builder, top[2], top[3]))
    return builder.or_(low, high)


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


def memory_fence(builder):
    """An empty inline asm that clobbers memory: no instruction, but LLVM moves no load or store
    across it, so the code after it is scheduled after the loads before it (a compiler-only
    barrier)."""
    builder.asm(ir.FunctionType(ir.VoidType(), []), "", "~{memory}", [], side_effect=True)


def prefetch_address(builder, pointer):
    """Emit a hint to load the cache line holding the i8* `pointer` (llvm.prefetch: read, keep in
    all cache levels); no fault on any address."""
    llvm_prefetch = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [pointer.type, I32, I32, I32]), "llvm.prefetch.p0i8")
    builder.call(llvm_prefetch, [pointer, ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])


@intrinsic
def prefetch(typingctx, rows, r, at):
    """Ask the CPU to start loading the cache line that holds byte `at` of row r of `rows` (a 2-D
    array; llvm.prefetch: read, keep in all cache levels). A hint: no effect on results, no
    fault on any address. Pointer arithmetic, not `rows[r]`: a row view costs an atomic
    reference-count increment and decrement, and with two threads taking rows of one matrix that
    counter's cache line bounced between the cores on every row (Q4_K 4096 x 4096, 2 threads:
    14.4 -> see docs/kernels.md)."""
    def codegen(context, builder, signature, args):
        row = byte_pointer(context, builder, signature.args[0], args[0], args[1])
        prefetch_address(builder, builder.gep(row, [args[2]]))
        return context.get_dummy_value()
    return types.none(rows, types.intp, types.intp), codegen


@numba.njit(inline="always", cache=True)
def prefetch_row(rows, r):
    """Prefetch row r of `rows` (uint8 (n_rows, row_bytes)), when there is one. The matvec
    kernels call this for the next row before computing the current one: while weights stream
    from memory the hardware prefetcher alone left them at 7 GB/s (Q4_K, 2 threads), with it 19
    (bench/matvec.py --stream)."""
    if r < rows.shape[0]:
        for at in range(0, rows.shape[1], 64):
            prefetch(rows, r, at)
