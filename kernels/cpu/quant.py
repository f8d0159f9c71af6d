"""Numba quantizers: llama.cpp's `quantize_row_*_ref` as scalar loops, parallel over blocks.

Each kernel takes float32 weights `x` (flat, a whole number of blocks) and fills `out` (uint8,
flat, n_blocks * type_size) with the same bytes as the NumPy reference and llama.cpp. Every local
is float32 and every constant np.float32, so no expression is widened to float64; Numba without
fastmath neither reorders nor fuses float operations, so each one rounds as in the C code.
Field offsets come from kernels.formats.
"""
from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType as QType
from numba import prange

from .dequant import k_scale_min
from .fp16 import f32_to_fp16_bits, half_to_float
from ..formats import QK, QK_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q3_K, Q4_K, Q5_K, Q6_K

F32 = np.float32
ZERO, HALF, ONE = F32(0.0), F32(0.5), F32(1.0)
ROUNDING_MAGIC = F32(12582912.0)  # 1.5 * 2^23: adding it leaves v rounded to an integer
GROUP_MAX_EPS = F32(1e-15)
BLOCKS_PER_TASK = 64  # blocks per parallel task: enough work to amortize its scratch buffers


# ---------------------------------------------------------------- helpers

@numba.njit(inline="always", cache=True)
def nearest_int(v):
    """llama.cpp's nearest_int: the float adder rounds half to even (|v| < 2^22)."""
    return int((v + ROUNDING_MAGIC) - ROUNDING_MAGIC)


@numba.njit(inline="always", cache=True)
def roundf(v):
    """C's roundf: half away from zero."""
    whole = F32(int(v))
    if abs(v - whole) >= HALF:
        whole += ONE if v > ZERO else -ONE
    return whole


@numba.njit(inline="always", cache=True)
def store_fp16(out, at, v):
    """Write float32 `v` as little-endian fp16 at out[at:at+2]; return the value it now holds."""
    bits = f32_to_fp16_bits(v)
    out[at], out[at + 1] = np.uint8(bits & 0xFF), np.uint8(bits >> 8)
    return half_to_float(bits)


@numba.njit(inline="always", cache=True)
def inverse(d):
    return ONE / d if d != ZERO else ZERO


@numba.njit(inline="always", cache=True)
def absmax_signed(x):
    """The first weight of largest magnitude, sign kept; +0.0 if all are zero."""
    amax, peak = ZERO, ZERO
    for v in x:
        if amax < abs(v):
            amax, peak = abs(v), v
    return peak


@numba.njit(inline="always", cache=True)
def min_max(x):
    lo, hi = x[0], x[0]
    for v in x[1:]:
        if v < lo:
            lo = v
        if v > hi:
            hi = v
    return lo, hi


@numba.njit(inline="always", cache=True)
def pack_k_scale_min(out, at, g, scale, minimum):
    """Store group g's six-bit scale and min into Q4_K/Q5_K's 12 zeroed bytes at out[at:]: the
    inverse of kernels.cpu.dequant.k_scale_min."""
    if g < 4:
        out[at + g] = scale
        out[at + g + 4] = minimum
    else:
        out[at + g + 4] = (scale & 0x0F) | ((minimum & 0x0F) << 4)
        out[at + g - 4] |= (scale >> 4) << 6
        out[at + g] |= (minimum >> 4) << 6


@numba.njit(inline="always", cache=True)
def task_bounds(task, n_blocks):
    """Blocks [first, end) of parallel task `task`."""
    first = task * BLOCKS_PER_TASK
    return first, min(first + BLOCKS_PER_TASK, n_blocks)


# ---------------------------------------------------------------- legacy formats

@numba.njit(parallel=True, cache=True)
def q4_0(x, out):
    n_blocks = x.size // QK
    for b in prange(n_blocks):
        xb, yb = x[b * QK:(b + 1) * QK], out[b * Q4_0.size:(b + 1) * Q4_0.size]
        d = absmax_signed(xb) / F32(-8.0)
        store_fp16(yb, Q4_0.d, d)
        idv = inverse(d)
        for j in range(QK // 2):
            lo = min(15, int(xb[j] * idv + F32(8.5)))
            hi = min(15, int(xb[j + QK // 2] * idv + F32(8.5)))
            yb[Q4_0.qs + j] = lo | (hi << 4)


@numba.njit(parallel=True, cache=True)
def q4_1(x, out):
    n_blocks = x.size // QK
    for b in prange(n_blocks):
        xb, yb = x[b * QK:(b + 1) * QK], out[b * Q4_1.size:(b + 1) * Q4_1.size]
        lo, hi = min_max(xb)
        d = (hi - lo) / F32(15.0)
        store_fp16(yb, Q4_1.d, d)
        store_fp16(yb, Q4_1.m, lo)
        idv = inverse(d)
        for j in range(QK // 2):
            q0 = min(15, int((xb[j] - lo) * idv + HALF))
            q1 = min(15, int((xb[j + QK // 2] - lo) * idv + HALF))
            yb[Q4_1.qs + j] = q0 | (q1 << 4)


@numba.njit(inline="always", cache=True)
def store_q5(yb, qs_at, qh_at, j, q0, q1):
    """Store 5-bit weights j and j + 16: low nibbles in qs[j], fifth bits as bits j and j + 16
    of the little-endian u32 qh."""
    yb[qs_at + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4)
    yb[qh_at + j // 8] |= ((q0 >> 4) & 1) << (j % 8)
    yb[qh_at + 2 + j // 8] |= ((q1 >> 4) & 1) << (j % 8)


@numba.njit(parallel=True, cache=True)
def q5_0(x, out):
    n_blocks = x.size // QK
    for b in prange(n_blocks):
        xb, yb = x[b * QK:(b + 1) * QK], out[b * Q5_0.size:(b + 1) * Q5_0.size]
        yb[:] = 0
        d = absmax_signed(xb) / F32(-16.0)
        store_fp16(yb, Q5_0.d, d)
        idv = inverse(d)
        for j in range(QK // 2):
            q0 = min(31, int(xb[j] * idv + F32(16.5)))
            q1 = min(31, int(xb[j + QK // 2] * idv + F32(16.5)))
            store_q5(yb, Q5_0.qs, Q5_0.qh, j, q0, q1)


@numba.njit(parallel=True, cache=True)
def q5_1(x, out):
    n_blocks = x.size // QK
    for b in prange(n_blocks):
        xb, yb = x[b * QK:(b + 1) * QK], out[b * Q5_1.size:(b + 1) * Q5_1.size]
        yb[:] = 0
        lo, hi = min_max(xb)
        d = (hi - lo) / F32(31.0)
        store_fp16(yb, Q5_1.d, d)
        store_fp16(yb, Q5_1.m, lo)
        idv = inverse(d)
        for j in range(QK // 2):
            q0 = int((xb[j] - lo) * idv + HALF) & 0xFF
            q1 = int((xb[j + QK // 2] - lo) * idv + HALF) & 0xFF
            store_q5(yb, Q5_1.qs, Q5_1.qh, j, q0, q1)


@numba.njit(parallel=True, cache=True)
def q8_0(x, out):
    n_blocks = x.size // QK
    for b in prange(n_blocks):
        xb, yb = x[b * QK:(b + 1) * QK], out[b * Q8_0.size:(b + 1) * Q8_0.size]
        amax = ZERO
        for v in xb:
            amax = max(amax, abs(v))
        d = amax / F32(127.0)
        store_fp16(yb, Q8_0.d, d)
        idv = inverse(d)
        for j in range(QK):
            yb[Q8_0.qs + j] = np.uint8(int(roundf(xb[j] * idv)) & 0xFF)


# ---------------------------------------------------------------- k-quants

@numba.njit(cache=True)
def make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep, L, Laux):
    """See kernels.reference.quant.make_qkx2_quants; fills L, returns (scale, the_min)."""
    n = x.size
    lo, hi = min_max(x)
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        sum_w += weights[i]
        sum_x += weights[i] * x[i]
    if lo > ZERO:
        lo = ZERO
    if hi == lo:
        L[:] = 0
        return ZERO, -lo
    fmax = F32(nmax)
    iscale = fmax / (hi - lo)
    scale = ONE / iscale
    best_error = ZERO
    for i in range(n):
        L[i] = max(0, min(nmax, nearest_int(iscale * (x[i] - lo))))
        diff = scale * F32(L[i]) + lo - x[i]
        best_error += weights[i] * (diff * diff)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F32(step) + fmax) / (hi - lo)
        sum_l, sum_l2, sum_xl = ZERO, ZERO, ZERO
        for i in range(n):
            level = max(0, min(nmax, nearest_int(iscale * (x[i] - lo))))
            Laux[i] = level
            wl = weights[i] * F32(level)
            sum_l += wl
            sum_l2 += wl * F32(level)
            sum_xl += wl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > ZERO:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > ZERO:
                this_min = ZERO
                this_scale = sum_xl / sum_l2
            cur_error = ZERO
            for i in range(n):
                diff = this_scale * F32(Laux[i]) + this_min - x[i]
                cur_error += weights[i] * (diff * diff)
            if cur_error < best_error:
                L[:] = Laux
                best_error, scale, lo = cur_error, this_scale, this_min
    return scale, -lo


@numba.njit(cache=True)
def make_qx_quants(x, nmax, L):
    """See kernels.reference.quant.make_qx_quants; fills L, returns scale."""
    n = x.size
    peak = absmax_signed(x)
    if abs(peak) < GROUP_MAX_EPS:
        L[:] = 0
        return ZERO
    fmax = F32(nmax)
    iscale = -fmax / peak
    sumlx, suml2 = ZERO, ZERO
    for i in range(n):
        level = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        L[i] = level + nmax
        w = x[i] * x[i]
        sumlx += w * x[i] * F32(level)
        suml2 += w * F32(level) * F32(level)
    scale = sumlx / suml2 if suml2 != ZERO else ZERO
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fmax + F32(0.1) * F32(step)) / peak
        sumlx, suml2 = ZERO, ZERO
        for i in range(n):
            level = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            w = x[i] * x[i]
            sumlx += w * x[i] * F32(level)
            suml2 += w * F32(level) * F32(level)
        if suml2 > ZERO and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i]))) + nmax
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@numba.njit(cache=True)
def make_q3_quants(x, nmax, L):
    """See kernels.reference.quant.make_q3_quants; fills L, returns scale."""
    n = x.size
    peak = absmax_signed(x)
    if abs(peak) < GROUP_MAX_EPS:
        L[:] = 0
        return ZERO
    iscale = F32(-nmax) / peak
    levels = np.empty(n, np.int32)
    sumlx, suml2 = ZERO, ZERO
    for i in range(n):
        levels[i] = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        w = x[i] * x[i]
        sumlx += w * x[i] * F32(levels[i])
        suml2 += w * F32(levels[i]) * F32(levels[i])
    for _ in range(5):
        changed = False
        for i in range(n):
            w = x[i] * x[i]
            slx = sumlx - w * x[i] * F32(levels[i])
            if slx > ZERO:
                sl2 = suml2 - w * F32(levels[i]) * F32(levels[i])
                new = max(-nmax, min(nmax - 1, nearest_int(x[i] * sl2 / slx)))
                if new != levels[i]:
                    slx += w * x[i] * F32(new)
                    sl2 += w * F32(new) * F32(new)
                    if sl2 > ZERO and slx * slx * suml2 > sumlx * sumlx * sl2:
                        levels[i], sumlx, suml2, changed = new, slx, sl2, True
        if not changed:
            break
    for i in range(n):
        L[i] = levels[i] + nmax
    return sumlx / suml2 if suml2 > ZERO else ZERO


@numba.njit(inline="always", cache=True)
def _qp_error(x, nmax, weights, iscale):
    scale, total = ONE / iscale, ZERO
    for i in range(x.size):
        diff = x[i] - scale * F32(min(nmax, nearest_int(iscale * x[i])))
        total += weights[i] * diff * diff
    return total


@numba.njit(cache=True)
def make_qp_quants(x, nmax, weights, L):
    """See kernels.reference.quant.make_qp_quants; fills L, returns scale."""
    n = x.size
    peak = ZERO
    for v in x:
        peak = max(peak, v)
    if peak < GROUP_MAX_EPS:
        L[:] = 0
        return ZERO
    iscale = F32(nmax) / peak
    best = _qp_error(x, nmax, weights, iscale)
    for step in range(-4, 5):
        if step != 0:
            trial = (F32(0.1) * F32(step) + F32(nmax)) / peak
            mse = _qp_error(x, nmax, weights, trial)
            if mse < best:
                best, iscale = mse, trial
    levels = np.empty(n, np.int32)
    sumlx, suml2 = ZERO, ZERO
    for i in range(n):
        levels[i] = min(nmax, nearest_int(iscale * x[i]))
        sumlx += weights[i] * x[i] * F32(levels[i])
        suml2 += weights[i] * F32(levels[i]) * F32(levels[i])
    for _ in range(5):
        changed = False
        for i in range(n):
            w = weights[i]
            slx = sumlx - w * x[i] * F32(levels[i])
            sl2 = suml2 - w * F32(levels[i]) * F32(levels[i])
            if slx > ZERO and sl2 > ZERO:
                new = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new != levels[i]:
                    slx += w * x[i] * F32(new)
                    sl2 += w * F32(new) * F32(new)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        levels[i], sumlx, suml2, changed = new, slx, sl2, True
        if not changed:
            break
    for i in range(n):
        L[i] = levels[i] & 0xFF
    return sumlx / suml2 if suml2 > ZERO else ZERO


@numba.njit(cache=True)
def _k_scales_and_levels(xb, yb, d_at, dmin_at, scales_at, nmax, rmin, nstep,
                         L, Laux, weights, scales, mins, importance):
    """quantize_row_q4_K_ref / q5_K_ref up to the levels (with `importance`, float32 (256,),
    quantize_row_q4_K_impl / q5_K_impl's; None: none): fills d, dmin, the 12 scale bytes and L
    (256 levels in [0, nmax])."""
    if importance is None:
        for j in range(QK_K // 32):
            xg = xb[32 * j:32 * j + 32]
            sum_x2 = ZERO
            for v in xg:
                sum_x2 += v * v
            av_x = F32(np.sqrt(sum_x2 / F32(32.0)))
            for i in range(32):
                weights[i] = av_x + abs(xg[i])
            scales[j], mins[j] = make_qkx2_quants(xg, weights, nmax, rmin, F32(0.1), nstep,
                                                  L[32 * j:32 * j + 32], Laux)
        max_scale, max_min = ZERO, ZERO
        for j in range(QK_K // 32):
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        inv_scale = F32(63.0) / max_scale if max_scale > ZERO else ZERO
        inv_min = F32(63.0) / max_min if max_min > ZERO else ZERO
        for j in range(QK_K // 32):
            ls = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
            lm = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
            pack_k_scale_min(yb, scales_at, j, ls, lm)
        d_all = store_fp16(yb, d_at, max_scale / F32(63.0))
        dmin_all = store_fp16(yb, dmin_at, max_min / F32(63.0))
    else:
        sum_x2 = ZERO
        for v in xb:
            sum_x2 += v * v
        sigma2 = F32(2.0) * sum_x2 / F32(QK_K)
        group_weight, ls, lm = np.empty(8, F32), np.empty(8, np.uint8), np.empty(8, np.uint8)
        for j in range(QK_K // 32):
            xg = xb[32 * j:32 * j + 32]
            group_weight[j] = ZERO
            for i in range(32):
                weights[i] = importance[32 * j + i] * F32(np.sqrt(sigma2 + xg[i] * xg[i]))
                group_weight[j] += weights[i]
            scales[j], mins[j] = make_qkx2_quants(xg, weights, nmax, F32(-0.9), F32(0.05), 36,
                                                  L[32 * j:32 * j + 32], Laux)
        d_block = make_qp_quants(scales, 63, group_weight, ls)
        m_block = make_qp_quants(mins, 63, group_weight, lm)
        for j in range(QK_K // 32):
            pack_k_scale_min(yb, scales_at, j, ls[j], lm[j])
        d_all = store_fp16(yb, d_at, d_block)
        dmin_all = store_fp16(yb, dmin_at, m_block)
    for j in range(QK_K // 32):
        ls, lm = k_scale_min(yb, scales_at, j)
        d = d_all * F32(ls)
        if d == ZERO:  # keep make_qkx2_quants' levels
            continue
        dm = dmin_all * F32(lm)
        for i in range(32):
            L[32 * j + i] = max(0, min(nmax, nearest_int((xb[32 * j + i] + dm) / d)))


@numba.njit(parallel=True, cache=True)
def _k_quant(x, out, size, d_at, dmin_at, scales_at, qs_at, qh_at, nmax, rmin, nstep, importance):
    """Q4_K (qh_at < 0) or Q5_K blocks: make_qkx2_quants fits per group of 32 (levels 0..nmax,
    rmin/nstep as llama.cpp passes them), then the low nibbles packed two groups per 32 bytes and,
    for Q5_K, the fifth bit of group g in bit g of qh."""
    n_blocks = x.size // QK_K
    for task in prange((n_blocks + BLOCKS_PER_TASK - 1) // BLOCKS_PER_TASK):
        L, Laux = np.empty(QK_K, np.uint8), np.empty(32, np.uint8)
        weights, scales, mins = np.empty(32, F32), np.empty(8, F32), np.empty(8, F32)
        first, end = task_bounds(task, n_blocks)
        for b in range(first, end):
            xb, yb = x[b * QK_K:(b + 1) * QK_K], out[b * size:(b + 1) * size]
            yb[:] = 0
            _k_scales_and_levels(xb, yb, d_at, dmin_at, scales_at, nmax, rmin, nstep, L, Laux, weights,
                                 scales, mins, None if importance is None else importance[b * QK_K:(b + 1) * QK_K])
            for c in range(4):
                for i in range(32):
                    low, high = L[64 * c + i], L[64 * c + 32 + i]
                    yb[qs_at + 32 * c + i] = (low & 0x0F) | ((high & 0x0F) << 4)
                    if qh_at >= 0:
                        yb[qh_at + i] |= ((low >> 4) << (2 * c)) | ((high >> 4) << (2 * c + 1))


@numba.njit(cache=True)
def q4_k(x, out, importance=None):
    _k_quant(x, out, Q4_K.size, Q4_K.d, Q4_K.dmin, Q4_K.scales, Q4_K.qs, -1, 15, F32(-1.0), 20, importance)


@numba.njit(cache=True)
def q5_k(x, out, importance=None):
    _k_quant(x, out, Q5_K.size, Q5_K.d, Q5_K.dmin, Q5_K.scales, Q5_K.qs, Q5_K.qh, 31, F32(-0.5), 15, importance)


@numba.njit(parallel=True, cache=True)
def q3_k(x, out):
    n_blocks = x.size // QK_K
    for task in prange((n_blocks + BLOCKS_PER_TASK - 1) // BLOCKS_PER_TASK):
        L, scales = np.empty(QK_K, np.uint8), np.empty(16, F32)
        first, end = task_bounds(task, n_blocks)
        for b in range(first, end):
            xb, yb = x[b * QK_K:(b + 1) * QK_K], out[b * Q3_K.size:(b + 1) * Q3_K.size]
            yb[:] = 0
            for g in range(16):
                scales[g] = make_q3_quants(xb[16 * g:16 * g + 16], 4, L[16 * g:16 * g + 16])
            max_scale = absmax_signed(scales)
            d_all = ZERO
            if max_scale != ZERO:
                iscale = F32(-32.0) / max_scale
                for g in range(16):
                    ls = max(-32, min(31, nearest_int(iscale * scales[g]))) + 32
                    yb[Q3_K.scales + g % 8] |= np.uint8((ls & 0x0F) << (4 * (g // 8)))
                    yb[Q3_K.scales + 8 + g % 4] |= np.uint8((ls >> 4) << (2 * (g // 4)))
                d_all = store_fp16(yb, Q3_K.d, ONE / iscale)
            for g in range(16):
                ls = (yb[Q3_K.scales + g % 8] >> (4 * (g // 8))) & 0x0F
                ls |= ((yb[Q3_K.scales + 8 + g % 4] >> (2 * (g // 4))) & 3) << 4
                d = d_all * F32(np.int32(ls) - 32)
                if d == ZERO:
                    continue
                for i in range(16):
                    L[16 * g + i] = max(-4, min(3, nearest_int(xb[16 * g + i] / d))) + 4
            for j in range(QK_K):
                level = L[j]
                if level > 3:
                    yb[Q3_K.hmask + j % 32] |= np.uint8(1 << (j // 32))
                    level -= 4
                yb[Q3_K.qs + 32 * (j // 128) + j % 32] |= np.uint8(level << (2 * ((j // 32) % 4)))


@numba.njit(parallel=True, cache=True)
def q6_k(x, out):
    n_blocks = x.size // QK_K
    for task in prange((n_blocks + BLOCKS_PER_TASK - 1) // BLOCKS_PER_TASK):
        L, scales = np.empty(QK_K, np.uint8), np.empty(16, F32)
        first, end = task_bounds(task, n_blocks)
        for b in range(first, end):
            xb, yb = x[b * QK_K:(b + 1) * QK_K], out[b * Q6_K.size:(b + 1) * Q6_K.size]
            yb[:] = 0
            for g in range(16):
                scales[g] = make_qx_quants(xb[16 * g:16 * g + 16], 32, L[16 * g:16 * g + 16])
            max_scale = absmax_signed(scales)
            if abs(max_scale) < GROUP_MAX_EPS:
                continue  # an all-zero block is all zero bytes
            iscale = F32(-128.0) / max_scale
            d_all = store_fp16(yb, Q6_K.d, ONE / iscale)
            for g in range(16):
                sc = np.int8(min(127, nearest_int(iscale * scales[g])) & 0xFF)
                yb[Q6_K.scales + g] = np.uint8(sc)
                d = d_all * F32(sc)
                if d == ZERO:
                    continue
                for i in range(16):
                    L[16 * g + i] = max(-32, min(31, nearest_int(xb[16 * g + i] / d))) + 32
            for h in range(2):
                for i in range(32):
                    w = L[128 * h + i], L[128 * h + 32 + i], L[128 * h + 64 + i], L[128 * h + 96 + i]
                    yb[Q6_K.ql + 64 * h + i] = (w[0] & 0x0F) | ((w[2] & 0x0F) << 4)
                    yb[Q6_K.ql + 64 * h + 32 + i] = (w[1] & 0x0F) | ((w[3] & 0x0F) << 4)
                    yb[Q6_K.qh + 32 * h + i] = ((w[0] >> 4) | ((w[1] >> 4) << 2)
                                                | ((w[2] >> 4) << 4) | ((w[3] >> 4) << 6))


QUANTIZE = {
    QType.Q4_0: q4_0, QType.Q4_1: q4_1, QType.Q5_0: q5_0, QType.Q5_1: q5_1, QType.Q8_0: q8_0,
    QType.Q3_K: q3_k, QType.Q4_K: q4_k, QType.Q5_K: q5_k, QType.Q6_K: q6_k,
}
