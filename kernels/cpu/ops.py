"""Numba CPU kernels for the transformer's float operations: RMSNorm, RoPE, attention, SwiGLU.

Each works on a whole chunk of tokens in one call (prefill: T tokens; decode: T = 1), so the
per-token Python overhead is one call per layer step. Shapes use T for tokens, H for query heads,
KV for key/value heads, D for the head dimension.
"""
import math

import numba
import numpy as np
from numba import prange

from . import FASTMATH

F32 = np.float32


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def rmsnorm(x, weight, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight. x, out: float32 (T, dim)."""
    for t in prange(x.shape[0]):
        ss = 0.0  # float64 sum, as ggml does
        for i in range(x.shape[1]):
            ss += np.float64(x[t, i]) * x[t, i]
        scale = F32(1.0 / math.sqrt(ss / x.shape[1] + eps))
        for i in range(x.shape[1]):
            out[t, i] = x[t, i] * scale * weight[i]


@numba.njit(parallel=True, cache=True)
def rope(x, positions, inv_freq, out):
    """out = x with adjacent pairs (x[2i], x[2i+1]) of each head rotated by positions[t] *
    inv_freq[i].

    x, out: float32 (T, heads, D); positions: int64 (T,); inv_freq: float64 (rope_dim // 2,).
    Pairs past rope_dim are copied unchanged. Angles are computed in float64 so long positions
    stay exact.
    """
    for t in prange(x.shape[0]):
        out[t] = x[t]
        for i in range(inv_freq.size):
            angle = positions[t] * inv_freq[i]
            c, s = F32(math.cos(angle)), F32(math.sin(angle))
            for h in range(x.shape[1]):
                a, b = x[t, h, 2 * i], x[t, h, 2 * i + 1]
                out[t, h, 2 * i] = a * c - b * s
                out[t, h, 2 * i + 1] = a * s + b * c


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
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
    n_slots = k_cache.shape[1]
    scale = F32(1.0 / math.sqrt(head_dim))
    for th in prange(n_tokens * n_heads):
        t, h = th // n_heads, th % n_heads
        kv = h // group
        pos = start_pos + t
        first = max(0, pos - window + 1) if window > 0 else 0
        acc = out[t, h]
        acc[:] = 0
        best, total = -np.inf, F32(0)
        for p in range(first, pos + 1):
            if p >= start_pos:
                key, value = k_new[p - start_pos, kv], v_new[p - start_pos, kv]
            else:
                key, value = k_cache[kv, p % n_slots], v_cache[kv, p % n_slots]
            score = F32(0)
            for i in range(head_dim):
                score += q[t, h, i] * key[i]
            score *= scale
            if score > best:  # rescale what was accumulated under the old maximum
                correction = F32(math.exp(best - score))
                total *= correction
                for i in range(head_dim):
                    acc[i] *= correction
                best = score
            weight = F32(math.exp(score - best))
            total += weight
            for i in range(head_dim):
                acc[i] += weight * value[i]
        for i in range(head_dim):
            acc[i] /= total


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def swiglu(gate, up, out):
    """out = silu(gate) * up, elementwise. All float32 (T, ffn_dim)."""
    for t in prange(gate.shape[0]):
        for i in range(gate.shape[1]):
            g = gate[t, i]
            out[t, i] = g / (F32(1) + math.exp(-g)) * up[t, i]
