"""Numba CPU kernels for the transformer's float operations: RMSNorm, RoPE, attention, SwiGLU.

Each works on a whole chunk of tokens in one call (prefill: T tokens; decode: T = 1), so the
per-token Python overhead is one call per layer step. Shapes use T for tokens, H for query heads,
KV for key/value heads, D for the head dimension.
"""
import math

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import FASTMATH

F32 = np.float32
# SERIAL: a call on fewer than SERIAL_ELEMENTS values (decode; a batch of a few decode steps of a
# small model) runs on the calling thread, swiglu (an exp a value) below an eighth of that. A
# parallel loop still starts and joins the OpenMP team (~5 us), and a decode step of SmolLM2 makes
# 150 of these calls: with only T = 1 serial, SmolLM2's batch of 4 steps spent 1.0 ms of its 8.9
# in them against 0.4 for one step, and swiglu took 6 us serial on 1536 values.
SERIAL_ELEMENTS = 1 << 14


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def _rmsnorm_row(x, weight, eps, out):
    ss = 0.0  # float64 sum, as ggml does
    for i in range(x.size):
        ss += np.float64(x[i]) * x[i]
    scale = F32(1.0 / math.sqrt(ss / x.size + eps))
    for i in range(x.size):
        out[i] = x[i] * scale * weight[i]


@numba.njit(parallel=True, nogil=True, fastmath=FASTMATH, cache=True)
def rmsnorm(x, weight, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight. x, out: float32 (T, dim)."""
    if x.size < SERIAL_ELEMENTS:  # starting the threads costs more than these rows (see SERIAL)
        for t in range(x.shape[0]):
            _rmsnorm_row(x[t], weight, eps, out[t])
    else:
        for t in prange(x.shape[0]):
            _rmsnorm_row(x[t], weight, eps, out[t])


@numba.njit(nogil=True, cache=True)
def rope_rotations(positions, inv_freq, out):
    """out[t, i] = (cos, sin) of the angle positions[t] * inv_freq[i], computed in float64 so long
    positions stay exact, then rounded to float32: once per forward pass, for every layer's
    queries and keys (a sine and cosine per pair in each `rope` call had cost SmolLM2's 40-token
    prefill 1.3 of its 34 ms). positions: int64 (T,); inv_freq: float64 (rope_dim // 2,);
    out: float32 (T, rope_dim // 2, 2)."""
    for t in range(positions.size):
        for i in range(inv_freq.size):
            angle = positions[t] * inv_freq[i]
            out[t, i, 0], out[t, i, 1] = math.cos(angle), math.sin(angle)


@numba.njit(inline="always", cache=True)
def _rope_token(x, rotation, out):
    rotated = 2 * rotation.shape[0]
    for h in range(x.shape[0]):  # a head's pairs in one loop over memory in order: it vectorizes
        for i in range(rotation.shape[0]):
            c, s = rotation[i, 0], rotation[i, 1]
            a, b = x[h, 2 * i], x[h, 2 * i + 1]
            out[h, 2 * i] = a * c - b * s
            out[h, 2 * i + 1] = a * s + b * c
        for d in range(rotated, x.shape[1]):
            out[h, d] = x[h, d]


@numba.njit(parallel=True, nogil=True, cache=True)
def rope(x, rotations, out):
    """out = x with adjacent pairs (x[2i], x[2i+1]) of each head of token t rotated by the angle
    whose (cos, sin) is rotations[t, i] (`rope_rotations`).

    x, out: float32 (T, heads, D); rotations: float32 (T, rope_dim // 2, 2). Pairs past rope_dim
    are copied unchanged.
    """
    if x.size < SERIAL_ELEMENTS:  # see SERIAL
        for t in range(x.shape[0]):
            _rope_token(x[t], rotations[t], out[t])
    else:
        for t in prange(x.shape[0]):
            _rope_token(x[t], rotations[t], out[t])


@numba.njit(parallel=True, nogil=True, fastmath=FASTMATH, cache=True)
def attention(q, k_new, v_new, k_cache, v_cache, start_pos, window, out):
    """Causal (optionally sliding-window) grouped-query attention for a chunk of T new tokens.

    q: float32 (T, H, D), already rotated; k_new, v_new: (T, KV, D), the chunk's own keys and
    values; k_cache, v_cache: (KV, S, D), a ring of S slots holding position p at slot p % S, with
    the positions before `start_pos` that the chunk can see. The query at position p sees keys at
    positions max(0, p - window + 1) .. p (window = 0: all of them). Keys of the chunk come from
    k_new; earlier ones from the cache, so the cache may be written after this call.
    out: float32 (T, H, D). One online-softmax pass over the keys per (token, head) (`_attend`).
    """
    n_tokens, n_heads, head_dim = q.shape
    group = n_heads // k_new.shape[1]
    for th in prange(n_tokens * n_heads):
        t, h = th // n_heads, th % n_heads
        _attend(q, k_new, v_new, k_cache, v_cache, start_pos, window, t, h, h // group, out[t, h],
                np.empty(KEY_BLOCK, F32))


@numba.njit(parallel=True, nogil=True, fastmath=FASTMATH, cache=True)
def decode_attention(q, k_new, v_new, k_addresses, v_addresses, slots, layer, starts, window, out):
    """One decode step of B sequences, each against its own cache: `attention` with T = 1 for
    every sequence in one parallel region, then each key and value into its cache.

    q: float32 (B, H, D); k_new, v_new: (B, KV, D). The caches are float32 C-contiguous
    (n_layers, KV, S_b, D) arrays given by their data addresses (int64 (B,) each; a list of arrays
    would be a Numba typed list, whose constructor compiles in every new process) and slot counts
    S_b (int64 (B,)); `layer` is used. starts: int64 (B,), each sequence's position.
    out: float32 (B, H, D). Each query's arithmetic is `attention`'s (the same `_attend`), so a
    sequence gets the same bits either way.
    """
    n_seqs, n_heads, head_dim = q.shape
    n_kv = k_new.shape[1]
    group = n_heads // n_kv
    for bh in prange(n_seqs * n_heads):
        b, h = bh // n_heads, bh % n_heads
        k_cache = _layer_view(k_addresses[b], layer, n_kv, slots[b], head_dim)
        v_cache = _layer_view(v_addresses[b], layer, n_kv, slots[b], head_dim)
        _attend(q[b:b + 1], k_new[b:b + 1], v_new[b:b + 1], k_cache, v_cache, starts[b], window, 0, h,
                h // group, out[b, h], np.empty(KEY_BLOCK, F32))
    _write_slots(k_new, k_addresses, slots, layer, starts)  # after every read: a query may read
    _write_slots(v_new, v_addresses, slots, layer, starts)  # the slot a write reuses


@numba.njit(cache=True)
def _write_slots(new, addresses, slots, layer, starts):
    """new[b] (KV, D) into slot starts[b] % slots[b] of layer `layer` of cache b. Not inlined
    into the parallel kernel, whose dead-code pass would drop stores into a carray it made."""
    n_kv, head_dim = new.shape[1], new.shape[2]
    for b in range(len(new)):
        _layer_view(addresses[b], layer, n_kv, slots[b], head_dim)[:, starts[b] % slots[b]] = new[b]


@numba.njit(inline="always")
def _layer_view(address, layer, n_kv, n_slots, head_dim):
    """Layer `layer` (KV, S, D) of the float32 (n_layers, KV, S, D) cache whose data is at `address`."""
    size = n_kv * n_slots * head_dim
    return numba.carray(_float32_pointer(address + layer * size * 4), (n_kv, n_slots, head_dim))


@intrinsic
def _float32_pointer(typingctx, address):
    """An int64 address as a float32 pointer (for numba.carray)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))
    return types.CPointer(types.float32)(types.int64), codegen


KEY_BLOCK = 64  # keys scored together: their softmax weights are one vectorized loop of _exp


@numba.njit(fastmath=FASTMATH, inline="always")
def _attend(q, k_new, v_new, k_cache, v_cache, start_pos, window, t, h, kv, acc, weights):
    """acc (D,) = the attention of query (t, h), at position start_pos + t, over its visible keys
    (see `attention`): online softmax over blocks of KEY_BLOCK keys, whose scores and weights go
    through `weights` (float32 (KEY_BLOCK,) scratch): a block's scores, its maximum (rescaling
    what was accumulated when it rises), the weights in one loop of `_exp`, then the values.

    Keys and values are read by index, not as row views: a view of k_new costs an atomic
    reference count increment and decrement per key on a counter every thread shares. The value
    rows are added with `_add_weighted` (explicit vectors: LLVM did not vectorize `acc[i] +=
    weight * value[i]`, unable to rule out that acc and value overlap)."""
    head_dim, n_slots = q.shape[2], k_cache.shape[1]
    scale = F32(1.0 / math.sqrt(head_dim))
    pos = start_pos + t
    first = max(0, pos - window + 1) if window > 0 else 0
    acc[:] = 0
    best, total = F32(-np.inf), F32(0)
    for block in range(first, pos + 1, KEY_BLOCK):
        n_keys = min(KEY_BLOCK, pos + 1 - block)
        block_best = F32(-np.inf)
        j = 0
        while j < n_keys:  # the block's keys in runs of consecutive rows: the ring's, then the chunk's
            p = block + j
            run = _run_length(p, start_pos, n_slots, n_keys - j)
            if p >= start_pos:
                block_best = _score_run(weights, j, q, t, h, k_new, p - start_pos, kv, 1, 0, run, scale, block_best)
            else:
                block_best = _score_run(weights, j, q, t, h, k_cache, kv, p % n_slots, 0, 1, run, scale, block_best)
            j += run
        if block_best > best:  # rescale what was accumulated under the old maximum
            correction = _exp(best - block_best)
            total *= correction
            for i in range(head_dim):
                acc[i] *= correction
            best = block_best
        for j in range(n_keys):
            weights[j] = _exp(weights[j] - best)
            total += weights[j]
        j = 0
        while j < n_keys:
            p = block + j
            run = _run_length(p, start_pos, n_slots, n_keys - j)
            if p >= start_pos:
                _add_weighted(acc, weights, j, v_new, p - start_pos, kv, 1, 0, run)
            else:
                _add_weighted(acc, weights, j, v_cache, kv, p % n_slots, 0, 1, run)
            j += run
    for i in range(head_dim):
        acc[i] /= total


@numba.njit(inline="always", cache=True)
def _run_length(p, start_pos, n_slots, n_left):
    """How many keys from position p on (at most n_left) lie in consecutive rows: up to the
    chunk's first position for the ring's keys, and its end, where it wraps."""
    return n_left if p >= start_pos else min(n_left, start_pos - p, n_slots - p % n_slots)


@numba.njit(fastmath=FASTMATH, inline="always")
def _score_run(weights, at, q, t, h, rows, a, b, step_a, step_b, n, scale, best):
    """weights[at + j] = scale * q[t, h] . rows[a + j * step_a, b + j * step_b], j < n; returns
    the largest of them and `best`."""
    for j in range(n):
        score = F32(0)
        for i in range(q.shape[2]):
            score += q[t, h, i] * rows[a + j * step_a, b + j * step_b, i]
        weights[at + j] = score * scale
        best = max(best, weights[at + j])
    return best


@numba.njit(cache=True)
def _exp(x):
    """e^x for a float32 x <= 0 (a softmax weight), within 2 ulps; 0 below -87 (x = -inf included),
    NaN for NaN (a NaN score still reaches the logits, where the sampler reports it).
    Arithmetic only (Cephes' expf: x = n ln 2 + r, a degree-6 polynomial in r, times 2^n built in
    the exponent bits), so a loop of these vectorizes where libm's expf is a call per element.
    Not fastmath: reassociating the two-part ln 2 reduction would lose its precision."""
    clamped = max(x, F32(-87.0))
    n = np.floor(clamped * F32(1.44269504088896341) + F32(0.5))  # float32 (math.floor: an int)
    r = clamped - n * F32(0.693359375) + n * F32(2.12194440e-4)
    p = F32(1.9875691500e-4)
    p = p * r + F32(1.3981999507e-3)
    p = p * r + F32(8.3334519073e-3)
    p = p * r + F32(4.1665795894e-2)
    p = p * r + F32(1.6666665459e-1)
    p = p * r + F32(5.0000001201e-1)
    p = p * r * r + r + F32(1)
    power = _float_from_bits(np.int32((np.int32(n) + 127) << 23))
    if x >= F32(-87.0):
        return p * power
    return F32(0) if x < F32(-87.0) else x


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float32 whose IEEE-754 bits are the int32 `bits`."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@intrinsic
def _add_weighted(typingctx, acc, weights, at, rows, a, b, step_a, step_b, n):
    """acc[:] += weights[at + j] * rows[a + j * step_a, b + j * step_b, :] for j = 0 .. n - 1 in that
    order, acc float32 (D,), weights float32 (any,), rows float32 (A, B, D) (C-contiguous
    innermost axis): one FMA per lane and row, as the scalar loop (fastmath contracts it too),
    with acc held in registers (8-lane vectors, then single lanes) across the rows, loaded and
    stored once."""
    def codegen(context, builder, signature, args):
        acc_, weights_, at_, rows_, a_, b_, step_a_, step_b_, n_ = args
        acc_view = context.make_array(signature.args[0])(context, builder, acc_)
        weights_view = context.make_array(signature.args[1])(context, builder, weights_)
        rows_view = context.make_array(signature.args[3])(context, builder, rows_)
        n_lanes = cgutils.unpack_tuple(builder, acc_view.shape)[0]
        strides = cgutils.unpack_tuple(builder, rows_view.strides)
        f32, byte = ir.FloatType(), ir.IntType(8).as_pointer()
        vector = ir.VectorType(f32, 8)
        fma8 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector] * 3),
                                              "llvm.fma.v8f32")
        fma1 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32] * 3), "llvm.fma.f32")

        def row_pointer(j):  # float* to rows[a + j * step_a, b + j * step_b, 0]
            offset = builder.add(builder.mul(builder.add(a_, builder.mul(j, step_a_)), strides[0]),
                                 builder.mul(builder.add(b_, builder.mul(j, step_b_)), strides[1]))
            return builder.bitcast(builder.gep(builder.bitcast(rows_view.data, byte), [offset]),
                                   acc_view.data.type)

        def accumulate(first, count, kind, fma):
            """acc[first + i * width], i < count (`kind`: a vector of width lanes, or one float)."""
            width = kind.count if isinstance(kind, ir.VectorType) else 1
            at_lane = lambda i: builder.add(first, ir.Constant(first.type, i * width))  # noqa: E731
            pointer = lambda base, i: builder.bitcast(builder.gep(base, [at_lane(i)]), kind.as_pointer())  # noqa: E731
            sums = [cgutils.alloca_once_value(builder, builder.load(pointer(acc_view.data, i), align=4))
                    for i in range(count)]
            with cgutils.for_range(builder, n_) as loop:
                weight = builder.load(builder.gep(weights_view.data, [builder.add(at_, loop.index)]))
                if width > 1:
                    weight = builder.shuffle_vector(
                        builder.insert_element(ir.Constant(kind, None), weight, ir.Constant(ir.IntType(32), 0)),
                        ir.Constant(kind, None), ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width))
                row = row_pointer(loop.index)
                for i, total in enumerate(sums):
                    builder.store(builder.call(fma, [weight, builder.load(pointer(row, i), align=4),
                                                     builder.load(total)]), total)
            for i, total in enumerate(sums):
                builder.store(builder.load(total), pointer(acc_view.data, i), align=4)

        # The row's 8-lane vectors in groups held in registers: 32 at a time, then the binary
        # digits of the rest (D = 64: one group of 8), then the lanes left one at a time.
        index = n_lanes.type
        n_vectors = builder.udiv(n_lanes, ir.Constant(index, 8))
        full = builder.udiv(n_vectors, ir.Constant(index, 32))
        with cgutils.for_range(builder, full) as group:
            accumulate(builder.mul(group.index, ir.Constant(index, 32 * 8)), 32, vector, fma8)
        rest = builder.urem(n_vectors, ir.Constant(index, 32))
        for count in (16, 8, 4, 2, 1):
            first = builder.add(builder.mul(full, ir.Constant(index, 32)),
                                builder.mul(builder.udiv(rest, ir.Constant(index, 2 * count)), ir.Constant(index, 2 * count)))
            with builder.if_then(builder.icmp_unsigned("!=", builder.and_(rest, ir.Constant(index, count)),
                                                       ir.Constant(index, 0))):
                accumulate(builder.mul(first, ir.Constant(index, 8)), count, vector, fma8)
        with cgutils.for_range_slice(builder, builder.mul(n_vectors, ir.Constant(n_lanes.type, 8)), n_lanes,
                                     ir.Constant(n_lanes.type, 1)) as (lane, _):
            accumulate(lane, 1, f32, fma1)
        return context.get_dummy_value()
    if not (isinstance(acc, types.Array) and isinstance(rows, types.Array) and rows.ndim == 3
            and acc.dtype == rows.dtype == weights.dtype == types.float32):
        return None
    return types.none(acc, weights, types.intp, rows, types.intp, types.intp, types.intp, types.intp,
                      types.intp), codegen


@numba.njit(inline="always", cache=True)
def _swiglu_row(gate, up, out):
    # silu(g) = g * sigmoid(g) with sigmoid from e = e^-|g| (<= 1: `_exp`'s domain, which
    # vectorizes; libm's expf was a call per value, 1.6 ns each in SmolLM2's 40-token prefill).
    # Below g = -87 it is -0 (_exp's 0), where silu is under 1e-36 in magnitude.
    # Not fastmath: its reciprocal for the division gave the vector loop and its scalar tail
    # different bits, so a value's result depended on where in the row it sat.
    for i in range(gate.size):
        g = gate[i]
        e = _exp(-abs(g))
        out[i] = g * ((F32(1) if g >= F32(0) else e) / (F32(1) + e)) * up[i]


# error_model "numpy": Python's check for a zero divisor (1 + e never is) kept the loop scalar.
@numba.njit(parallel=True, nogil=True, error_model="numpy", cache=True)
def swiglu(gate, up, out):
    """out = silu(gate) * up, elementwise. All float32 (T, ffn_dim)."""
    if gate.size < SERIAL_ELEMENTS // 8:  # see SERIAL
        for t in range(gate.shape[0]):
            _swiglu_row(gate[t], up[t], out[t])
    else:
        for t in prange(gate.shape[0]):
            _swiglu_row(gate[t], up[t], out[t])
