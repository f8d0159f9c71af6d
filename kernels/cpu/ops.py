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
# SERIAL: a one-token call (decode) runs on the calling thread. A parallel loop of one iteration
# still starts and joins the OpenMP team (~5 us), and a decode step of SmolLM2 makes 150 of these
# calls (rmsnorm, rope, swiglu).


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
    if x.shape[0] == 1:  # decode: starting the threads costs more than one row (see SERIAL)
        _rmsnorm_row(x[0], weight, eps, out[0])
    else:
        for t in prange(x.shape[0]):
            _rmsnorm_row(x[t], weight, eps, out[t])


@numba.njit(inline="always", cache=True)
def _rope_token(x, position, inv_freq, out):
    out[:] = x
    for i in range(inv_freq.size):
        angle = position * inv_freq[i]
        c, s = F32(math.cos(angle)), F32(math.sin(angle))
        for h in range(x.shape[0]):
            a, b = x[h, 2 * i], x[h, 2 * i + 1]
            out[h, 2 * i] = a * c - b * s
            out[h, 2 * i + 1] = a * s + b * c


@numba.njit(parallel=True, nogil=True, cache=True)
def rope(x, positions, inv_freq, out):
    """out = x with adjacent pairs (x[2i], x[2i+1]) of each head rotated by positions[t] *
    inv_freq[i].

    x, out: float32 (T, heads, D); positions: int64 (T,); inv_freq: float64 (rope_dim // 2,).
    Pairs past rope_dim are copied unchanged. Angles are computed in float64 so long positions
    stay exact.
    """
    if x.shape[0] == 1:  # decode: see SERIAL
        _rope_token(x[0], positions[0], inv_freq, out[0])
    else:
        for t in prange(x.shape[0]):
            _rope_token(x[t], positions[t], inv_freq, out[t])


@numba.njit(parallel=True, nogil=True, fastmath=FASTMATH, cache=True)
def attention(q, k_new, v_new, k_cache, v_cache, start_pos, window, out):
    """Causal (optionally sliding-window) grouped-query attention for a chunk of T new tokens.

    q: float32 (T, H, D), already rotated; k_new, v_new: (T, KV, D), the chunk's own keys and
    values; k_cache, v_cache: (KV, S, D), a ring of S slots holding position p at slot p % S, with
    the positions before `start_pos` that the chunk can see. The query at position p sees keys at
    positions max(0, p - window + 1) .. p (window = 0: all of them). Keys of the chunk come from
    k_new; earlier ones from the cache, so the cache may be written after this call.
    out: float32 (T, H, D). One online-softmax pass over the keys per (token, head).
    """
    n_tokens, n_heads, head_dim = q.shape
    group = n_heads // k_new.shape[1]
    for th in prange(n_tokens * n_heads):
        t, h = th // n_heads, th % n_heads
        _attend(q, k_new, v_new, k_cache, v_cache, start_pos, window, t, h, h // group, out[t, h])


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
                h // group, out[b, h])
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


@numba.njit(fastmath=FASTMATH, inline="always")
def _attend(q, k_new, v_new, k_cache, v_cache, start_pos, window, t, h, kv, acc):
    """acc (D,) = the attention of query (t, h), at position start_pos + t, over its visible keys
    (see `attention`): one online-softmax pass.

    Keys and values are read by index, not as row views: a view of k_new costs an atomic
    reference count increment and decrement per key on a counter every thread shares. The value
    rows are added with `_add_scaled` (explicit vectors: LLVM did not vectorize `acc[i] +=
    weight * value[i]`, unable to rule out that acc and value overlap)."""
    head_dim, n_slots = q.shape[2], k_cache.shape[1]
    scale = F32(1.0 / math.sqrt(head_dim))
    pos = start_pos + t
    first = max(0, pos - window + 1) if window > 0 else 0
    acc[:] = 0
    best, total = F32(-np.inf), F32(0)
    for p in range(first, pos + 1):
        new, slot = p >= start_pos, p % n_slots
        score = F32(0)
        if new:
            for i in range(head_dim):
                score += q[t, h, i] * k_new[p - start_pos, kv, i]
        else:
            for i in range(head_dim):
                score += q[t, h, i] * k_cache[kv, slot, i]
        score *= scale
        if score > best:  # rescale what was accumulated under the old maximum
            correction = F32(math.exp(best - score))
            total *= correction
            for i in range(head_dim):
                acc[i] *= correction
            best = score
        weight = F32(math.exp(score - best))
        total += weight
        if new:
            _add_scaled(acc, weight, v_new, p - start_pos, kv)
        else:
            _add_scaled(acc, weight, v_cache, kv, slot)
    for i in range(head_dim):
        acc[i] /= total


@intrinsic
def _add_scaled(typingctx, acc, weight, rows, a, b):
    """acc[:] += weight * rows[a, b, :], acc float32 (D,) and rows float32 (A, B, D) (C-contiguous
    innermost axis), as 8-lane vector multiply-adds and then one lane at a time. The same
    operations, lane by lane, as the scalar loop (one FMA each: fastmath contracts that loop too)."""
    def codegen(context, builder, signature, args):
        acc_, weight_, rows_, a_, b_ = args
        acc_view = context.make_array(signature.args[0])(context, builder, acc_)
        rows_view = context.make_array(signature.args[2])(context, builder, rows_)
        n = cgutils.unpack_tuple(builder, acc_view.shape)[0]
        row_strides = cgutils.unpack_tuple(builder, rows_view.strides)
        offset = builder.add(builder.mul(a_, row_strides[0]), builder.mul(b_, row_strides[1]))
        byte = ir.IntType(8).as_pointer()
        source = builder.bitcast(builder.gep(builder.bitcast(rows_view.data, byte), [offset]),
                                 acc_view.data.type)
        target, f32 = acc_view.data, ir.FloatType()
        lanes8 = ir.VectorType(f32, 8)
        splat = builder.insert_element(ir.Constant(lanes8, None), weight_, ir.Constant(ir.IntType(32), 0))
        splat = builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8))
        fma8 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(lanes8, [lanes8] * 3),
                                              "llvm.fma.v8f32")
        fma1 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32] * 3), "llvm.fma.f32")
        vectors = builder.udiv(n, ir.Constant(n.type, 8))
        with cgutils.for_range(builder, vectors) as loop:
            at = builder.mul(loop.index, ir.Constant(n.type, 8))
            x = builder.bitcast(builder.gep(source, [at]), lanes8.as_pointer())
            y = builder.bitcast(builder.gep(target, [at]), lanes8.as_pointer())
            builder.store(builder.call(fma8, [splat, builder.load(x, align=4), builder.load(y, align=4)]), y,
                          align=4)
        with cgutils.for_range_slice(builder, builder.mul(vectors, ir.Constant(n.type, 8)), n,
                                     ir.Constant(n.type, 1)) as (i, _):
            y = builder.gep(target, [i])
            builder.store(builder.call(fma1, [weight_, builder.load(builder.gep(source, [i])), builder.load(y)]), y)
        return context.get_dummy_value()
    if not (isinstance(acc, types.Array) and isinstance(rows, types.Array) and rows.ndim == 3
            and acc.dtype == rows.dtype == types.float32):
        return None
    return types.none(acc, types.float32, rows, types.intp, types.intp), codegen


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def _swiglu_row(gate, up, out):
    for i in range(gate.size):
        g = gate[i]
        out[i] = g / (F32(1) + math.exp(-g)) * up[i]


@numba.njit(parallel=True, nogil=True, fastmath=FASTMATH, cache=True)
def swiglu(gate, up, out):
    """out = silu(gate) * up, elementwise. All float32 (T, ffn_dim)."""
    if gate.shape[0] == 1:  # decode: see SERIAL
        _swiglu_row(gate[0], up[0], out[0])
    else:
        for t in prange(gate.shape[0]):
            _swiglu_row(gate[t], up[t], out[t])
