"""NumPy reference quantizers: llama.cpp's `quantize_row_*_ref`, vectorized over blocks.

Each function takes float32 weights (flat, a whole number of blocks) and returns the raw bytes of
the blocks (uint8, flat), byte-identical to llama.cpp's reference C quantizers, which are what
`llama-quantize` runs when no importance matrix is given. Block layouts come from kernels.formats.

Byte identity needs the C code's exact float32 arithmetic, so three rules hold throughout:
- every value is float32 and every operation is written in the C expression's order;
- sums run element by element (`for i in range(n): acc = acc + ...`), vectorized across blocks
  only, never with np.sum, whose pairwise summation rounds differently;
- rounding follows C: `nearest_int` rounds half to even, `roundf` half away from zero, a cast to
  an integer truncates toward zero.
Each block's result depends on its own weights only, so blocks are independent rows here.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QType

from ..formats import FORMATS, QK_K

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)  # llama.cpp: a group whose largest |weight| is below this is all zero


def nearest_int(v: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int: adds 1.5 * 2^23 so the float adder rounds half to even.

    Equal to rint for |v| < 2^22, the domain llama.cpp asserts."""
    return np.rint(v).astype(np.int32)


def roundf(v: np.ndarray) -> np.ndarray:
    """C's roundf: half away from zero. (floor(|v| + 0.5) would round 0.49999997 up.)"""
    whole = np.trunc(v)
    return whole + np.sign(v) * (np.abs(v - whole) >= F32(0.5))


def _inverse(d: np.ndarray) -> np.ndarray:
    """`d ? 1.0f/d : 0.0f`"""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0)).astype(F32)


def _fp16_round_trip(v: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v)): the scale as the dequantizer will see it."""
    return v.astype(np.float16).astype(F32)


def _empty_blocks(qtype: QType, n_blocks: int) -> np.ndarray:
    return np.zeros(n_blocks, dtype=FORMATS[qtype].block)


def _absmax_signed(x: np.ndarray) -> np.ndarray:
    """Per row, the first weight of largest magnitude, sign kept; +0.0 for an all-zero row
    (`float max = 0; ... if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`)."""
    peak = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]
    return np.where(peak != 0, peak, F32(0))


def _min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, `if (v < min) min = v; if (v > max) max = v;` from the first weight on: the C
    loop, so that which zero (+0.0 or -0.0) wins is the same too."""
    lo, hi = x[:, 0].copy(), x[:, 0].copy()
    for i in range(1, x.shape[1]):
        lo = np.where(x[:, i] < lo, x[:, i], lo)
        hi = np.where(x[:, i] > hi, x[:, i], hi)
    return lo, hi


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) 4-bit values -> (n, 16) bytes: weight j in the low nibble of byte j, j+16 high."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _pack_fifth_bits(q: np.ndarray) -> np.ndarray:
    """(n, 32) 5-bit values -> (n, 4) bytes of the little-endian u32 whose bit j is q[j]'s bit 4."""
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


# ---------------------------------------------------------------- legacy formats, 32 per block

def q4_0(x: np.ndarray) -> np.ndarray:
    x = x.reshape(-1, 32)
    y = _empty_blocks(QType.Q4_0, len(x))
    d = _absmax_signed(x) / F32(-8)
    q = np.minimum(15, np.trunc(x * _inverse(d)[:, None] + F32(8.5)).astype(np.int8))
    y["d"] = d.astype(np.float16)
    y["qs"] = _pack_nibbles(q.astype(np.uint8))
    return y.view(np.uint8)


def q4_1(x: np.ndarray) -> np.ndarray:
    x = x.reshape(-1, 32)
    y = _empty_blocks(QType.Q4_1, len(x))
    lo, hi = _min_max(x)
    d = (hi - lo) / F32(15)
    q = np.minimum(15, np.trunc((x - lo[:, None]) * _inverse(d)[:, None] + F32(0.5)).astype(np.int8))
    y["d"], y["m"] = d.astype(np.float16), lo.astype(np.float16)
    y["qs"] = _pack_nibbles(q.astype(np.uint8))
    return y.view(np.uint8)


def q5_0(x: np.ndarray) -> np.ndarray:
    x = x.reshape(-1, 32)
    y = _empty_blocks(QType.Q5_0, len(x))
    d = _absmax_signed(x) / F32(-16)
    q = np.minimum(31, np.trunc(x * _inverse(d)[:, None] + F32(16.5)).astype(np.int8)).astype(np.uint8)
    y["d"] = d.astype(np.float16)
    y["qh"] = _pack_fifth_bits(q)
    y["qs"] = _pack_nibbles(q & 0x0F)
    return y.view(np.uint8)


def q5_1(x: np.ndarray) -> np.ndarray:
    x = x.reshape(-1, 32)
    y = _empty_blocks(QType.Q5_1, len(x))
    lo, hi = _min_max(x)
    d = (hi - lo) / F32(31)
    q = np.trunc((x - lo[:, None]) * _inverse(d)[:, None] + F32(0.5)).astype(np.uint8)
    y["d"], y["m"] = d.astype(np.float16), lo.astype(np.float16)
    y["qh"] = _pack_fifth_bits(q)
    y["qs"] = _pack_nibbles(q & 0x0F)
    return y.view(np.uint8)


def q8_0(x: np.ndarray) -> np.ndarray:
    x = x.reshape(-1, 32)
    y = _empty_blocks(QType.Q8_0, len(x))
    d = np.abs(x).max(axis=1) / F32(127)
    y["d"] = d.astype(np.float16)
    y["qs"] = roundf(x * _inverse(d)[:, None]).astype(np.int8)
    return y.view(np.uint8)


# ---------------------------------------------------------------- k-quants, 256 per super-block

def make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit x ~ scale * L - min with L in [0, nmax], minimizing the weighted squared error.

    x, weights: (groups, n) float32. Starts from the min/max fit, then tries nstep + 1 rescalings
    (rmin + rdelta * is + nmax levels over the range), solving the 2-parameter least squares for
    each and keeping the best. As in llama.cpp, a better fit's `min` is used by the next steps.
    Returns scale (groups,), the_min = -min >= 0 (groups,), L (groups, n) uint8.
    """
    n = x.shape[1]
    lo, hi = _min_max(x)
    sum_w = weights[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        sum_w = sum_w + weights[:, i]
        sum_x = sum_x + weights[:, i] * x[:, i]
    lo = np.where(lo > 0, F32(0), lo)
    flat = hi == lo
    lo_ = lo[:, None]

    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(nmax) / (hi - lo)
        scale = F32(1) / iscale
        L = np.clip(nearest_int(iscale[:, None] * (x - lo_)), 0, nmax)
        best_error = np.zeros_like(sum_w)
        for i in range(n):
            diff = scale * L[:, i].astype(F32) + lo - x[:, i]
            best_error = best_error + weights[:, i] * (diff * diff)

        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (hi - lo)
            Laux = np.clip(nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax).astype(F32)
            sum_l = np.zeros_like(sum_w)
            sum_l2 = np.zeros_like(sum_w)
            sum_xl = np.zeros_like(sum_w)
            for i in range(n):
                wl = weights[:, i] * Laux[:, i]
                sum_l = sum_l + wl
                sum_l2 = sum_l2 + wl * Laux[:, i]
                sum_xl = sum_xl + wl * x[:, i]
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            positive_min = this_min > 0
            this_min = np.where(positive_min, F32(0), this_min)
            this_scale = np.where(positive_min, sum_xl / sum_l2, this_scale)
            cur_error = np.zeros_like(sum_w)
            for i in range(n):
                diff = this_scale * Laux[:, i] + this_min - x[:, i]
                cur_error = cur_error + weights[:, i] * (diff * diff)
            better = (D > 0) & (cur_error < best_error)
            L = np.where(better[:, None], Laux.astype(L.dtype), L)
            best_error = np.where(better, cur_error, best_error)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)

    L[flat] = 0
    scale = np.where(flat, F32(0), scale)
    return scale, -lo, L.astype(np.uint8)


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Fit x ~ scale * (L - nmax) with L in [0, 2 nmax), weights x^2 (llama.cpp's rmse_type 1).

    x: (groups, n) float32. Tries 19 level counts nmax + 0.1 * is around nmax and keeps the one
    with the smallest weighted error. Returns scale (groups,) float32 and L (groups, n) uint8.
    """
    n = x.shape[1]
    peak = _absmax_signed(x)
    all_zero = np.abs(peak) < GROUP_MAX_EPS

    def fit(iscale):
        l = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = l.astype(F32)
        sumlx = np.zeros(len(x), F32)
        suml2 = np.zeros(len(x), F32)
        for i in range(n):
            w = x[:, i] * x[:, i]
            sumlx = sumlx + w * x[:, i] * lf[:, i]
            suml2 = suml2 + w * lf[:, i] * lf[:, i]
        return l + nmax, sumlx, suml2

    with np.errstate(divide="ignore", invalid="ignore"):
        L, sumlx, suml2 = fit(F32(-nmax) / peak)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            L_try, sumlx, suml2 = fit(-(F32(nmax) + F32(0.1) * F32(step)) / peak)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better[:, None], L_try, L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    L[all_zero] = 0
    scale = np.where(all_zero, F32(0), scale)
    return scale.astype(F32), L.astype(np.uint8)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Fit x ~ scale * (L - nmax) with L in [0, 2 nmax), weights x^2 (llama.cpp's make_q3_quants
    with do_rmse): levels from the largest weight, then up to five passes that move one level at
    a time when it lowers the weighted error.

    x: (groups, n) float32. Returns scale (groups,) float32 and L (groups, n) uint8; an all-zero
    group gets scale 0 and levels 0.
    """
    n = x.shape[1]
    peak = _absmax_signed(x)
    all_zero = np.abs(peak) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        l = np.clip(nearest_int((F32(-nmax) / peak)[:, None] * x), -nmax, nmax - 1)
        sumlx = np.zeros(len(x), F32)
        suml2 = np.zeros(len(x), F32)
        for i in range(n):
            w, li = x[:, i] * x[:, i], l[:, i].astype(F32)
            sumlx = sumlx + w * x[:, i] * li
            suml2 = suml2 + w * li * li
        # C stops after a pass that changes nothing; the next pass would change nothing either
        for _ in range(5):
            for i in range(n):
                xi, li = x[:, i], l[:, i].astype(F32)
                w = xi * xi
                slx, sl2 = sumlx - w * xi * li, suml2 - w * li * li
                new = np.clip(nearest_int(np.where(slx > 0, xi * sl2 / slx, F32(0))), -nmax, nmax - 1)
                nf = new.astype(F32)
                new_slx, new_sl2 = slx + w * xi * nf, sl2 + w * nf * nf
                take = ((slx > 0) & (new != l[:, i]) & (new_sl2 > 0)
                        & (new_slx * new_slx * suml2 > sumlx * sumlx * new_sl2))
                l[:, i] = np.where(take, new, l[:, i])
                sumlx, suml2 = np.where(take, new_slx, sumlx), np.where(take, new_sl2, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    L = (l + nmax).astype(np.uint8)
    L[all_zero] = 0
    return np.where(all_zero, F32(0), scale), L


def make_qp_quants(x: np.ndarray, nmax: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fit x ~ scale * L with L in [0, nmax] for x >= 0 (a super-block's group scales or mins),
    minimizing the `weights`-weighted squared error (llama.cpp's make_qp_quants): the largest x
    as nmax, 8 trial rescalings, then up to five passes moving one level at a time.

    x, weights: (groups, n) float32. Returns scale (groups,) float32 and L (groups, n) uint8.
    """
    n = x.shape[1]
    peak = np.maximum(x.max(axis=1), F32(0))
    all_zero = peak < GROUP_MAX_EPS

    def error(iscale):
        L = np.minimum(nmax, nearest_int(iscale[:, None] * x))
        scale, total = F32(1) / iscale, np.zeros(len(x), F32)
        for i in range(n):
            diff = x[:, i] - scale * L[:, i].astype(F32)
            total = total + weights[:, i] * diff * diff
        return total

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / peak
        best = error(iscale)  # the first fit is not clamped to nmax: it never exceeds it
        for step in range(-4, 5):
            if step:
                trial = (F32(0.1) * F32(step) + F32(nmax)) / peak
                mse = error(trial)
                iscale, best = np.where(mse < best, trial, iscale), np.minimum(mse, best)
        l = np.minimum(nmax, nearest_int(iscale[:, None] * x))
        sumlx, suml2 = np.zeros(len(x), F32), np.zeros(len(x), F32)
        for i in range(n):
            li = l[:, i].astype(F32)
            sumlx = sumlx + weights[:, i] * x[:, i] * li
            suml2 = suml2 + weights[:, i] * li * li
        for _ in range(5):  # as make_q3_quants: a pass that changes nothing ends it
            for i in range(n):
                xi, w, li = x[:, i], weights[:, i], l[:, i].astype(F32)
                slx, sl2 = sumlx - w * xi * li, suml2 - w * li * li
                move = (slx > 0) & (sl2 > 0)
                new = np.minimum(nmax, nearest_int(np.where(move, xi * sl2 / slx, F32(0))))
                nf = new.astype(F32)
                new_slx, new_sl2 = slx + w * xi * nf, sl2 + w * nf * nf
                take = move & (new != l[:, i]) & (new_slx * new_slx * suml2 > sumlx * sumlx * new_sl2)
                l[:, i] = np.where(take, new, l[:, i])
                sumlx, suml2 = np.where(take, new_slx, sumlx), np.where(take, new_sl2, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    L = (l & 0xFF).astype(np.uint8)
    L[all_zero] = 0
    return np.where(all_zero, F32(0), scale), L


def _q4_k_q5_k(x: np.ndarray, qtype: QType, nmax: int, rmin: float, nstep: int,
               importance: np.ndarray | None):
    """The shared half of quantize_row_q4_K_ref / q5_K_ref: eight groups of 32 per super-block,
    each fitted with make_qkx2_quants, their scales and mins quantized to 6 bits against the
    super-block's fp16 `d` and `dmin`, then the weights requantized with the rounded scales.
    With `importance` (float32, one per weight), quantize_row_q4_K_impl / q5_K_impl instead:
    weights importance * sqrt(sigma^2 + x^2), 37 rescalings, the 6-bit scales and mins fitted by
    make_qp_quants. Returns the blocks with d, dmin and scales filled in, and the levels L
    (n_blocks, 256)."""
    nb = len(x)
    groups = x.reshape(nb * 8, 32)
    y = _empty_blocks(qtype, nb)
    if importance is None:
        sum_x2 = np.zeros(nb * 8, F32)
        for i in range(32):
            sum_x2 = sum_x2 + groups[:, i] * groups[:, i]
        av_x = np.sqrt(sum_x2 / F32(32))
        weights = av_x[:, None] + np.abs(groups)
        scales, mins, L = make_qkx2_quants(groups, weights, nmax, rmin, F32(0.1), nstep)
        scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)

        max_scale = scales.max(axis=1)  # `if (scale > max_scale)` from 0: positive or +0.0
        max_scale = np.where(max_scale > 0, max_scale, F32(0))
        max_min = mins.max(axis=1)
        max_min = np.where(max_min > 0, max_min, F32(0))
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
            inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        # `uint8_t ls = nearest_int(...)` wraps modulo 256 before the MIN(63, ...)
        ls = np.minimum(63, nearest_int(inv_scale[:, None] * scales) & 0xFF).astype(np.uint8)
        lm = np.minimum(63, nearest_int(inv_min[:, None] * mins) & 0xFF).astype(np.uint8)
        y["d"] = (max_scale / F32(63)).astype(np.float16)
        y["dmin"] = (max_min / F32(63)).astype(np.float16)
    else:
        sum_x2 = np.zeros(nb, F32)
        for i in range(QK_K):
            sum_x2 = sum_x2 + x[:, i] * x[:, i]
        sigma2 = F32(2) * sum_x2 / F32(QK_K)
        weights = importance.reshape(nb * 8, 32) * np.sqrt(np.repeat(sigma2, 8)[:, None] + groups * groups)
        group_weight = np.zeros(nb * 8, F32)
        for i in range(32):
            group_weight = group_weight + weights[:, i]
        scales, mins, L = make_qkx2_quants(groups, weights, nmax, F32(-0.9), F32(0.05), 36)
        group_weight = group_weight.reshape(nb, 8)
        d, ls = make_qp_quants(scales.reshape(nb, 8), 63, group_weight)
        dmin, lm = make_qp_quants(mins.reshape(nb, 8), 63, group_weight)
        y["d"], y["dmin"] = d.astype(np.float16), dmin.astype(np.float16)
    L = L.reshape(nb, 8, 32)

    # 12 bytes: low 6 bits of scales 0-3 and mins 0-3, then the low nibbles of scales/mins 4-7;
    # the top two bits of scales/mins 4-7 sit in bits 6-7 of the first eight bytes.
    y["scales"][:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    y["scales"][:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    y["scales"][:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)

    d = y["d"].astype(F32)[:, None] * ls.astype(F32)
    dm = y["dmin"].astype(F32)[:, None] * lm.astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int((x.reshape(nb, 8, 32) + dm[..., None]) / d[..., None]), 0, nmax)
    L = np.where((d != 0)[..., None], requant, L)  # a zero scale keeps make_qkx2_quants' levels
    return y, L.reshape(nb, QK_K).astype(np.uint8)


def q4_k(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    x = x.reshape(-1, QK_K)
    y, L = _q4_k_q5_k(x, QType.Q4_K, nmax=15, rmin=-1.0, nstep=20, importance=importance)
    # byte l of chunk c (64 weights) holds weight 64c + l low, 64c + 32 + l high
    L = L.reshape(len(x), 4, 2, 32)
    y["qs"] = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(len(x), -1)
    return y.view(np.uint8)


def q5_k(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    x = x.reshape(-1, QK_K)
    y, L = _q4_k_q5_k(x, QType.Q5_K, nmax=31, rmin=-0.5, nstep=15, importance=importance)
    low = (L & 0x0F).reshape(len(x), 4, 2, 32)
    y["qs"] = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(len(x), -1)
    # bit k of qh[l] is the fifth bit of weight 32k + l
    high = (L >> 4).reshape(len(x), 8, 32)
    y["qh"] = sum(high[:, k] << k for k in range(8)).astype(np.uint8)
    return y.view(np.uint8)


def _sixteen_groups(x: np.ndarray, fit, nmax: int):
    """Q3_K / Q6_K's first step: each super-block's 16 groups of 16 fitted by `fit`. Returns x
    (nb, 256), the scales (nb, 16), the levels (nb, 16, 16) and per super-block the first scale of
    largest magnitude, its sign kept (nb,)."""
    x = x.reshape(-1, QK_K)
    scales, L = fit(x.reshape(len(x) * 16, 16), nmax=nmax)
    scales = scales.reshape(len(x), 16)
    return x, scales, L.reshape(len(x), 16, 16), _absmax_signed(scales)


def q3_k(x: np.ndarray) -> np.ndarray:
    x, scales, L, max_scale = _sixteen_groups(x, make_q3_quants, nmax=4)
    nb = len(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-32) / max_scale
        ls = np.clip(nearest_int(iscale[:, None] * scales), -32, 31) + 32  # 6 bits, 0..63
    ls = np.where((max_scale != 0)[:, None], ls, 0)
    y = _empty_blocks(QType.Q3_K, nb)
    with np.errstate(divide="ignore"):
        y["d"] = np.where(max_scale != 0, F32(1) / iscale, F32(0)).astype(np.float16)
    # 12 bytes: low nibbles of scales 0-7 then (high nibbles) 8-15; the top two bits of scale j
    # in byte 8 + j % 4 at bit 2 * (j // 4)
    y["scales"][:, 0:8] = (ls[:, 0:8] & 0x0F) | ((ls[:, 8:16] & 0x0F) << 4)
    top = (ls >> 4).reshape(nb, 4, 4)
    y["scales"][:, 8:12] = sum(top[:, q] << (2 * q) for q in range(4))

    d = y["d"].astype(F32)[:, None] * (ls - 32).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int(x.reshape(nb, 16, 16) / d[..., None]), -4, 3) + 4
    L = np.where((d != 0)[..., None], requant, L).reshape(nb, QK_K)
    # levels 4..7 set their bit in hmask (weight j: byte j % 32, bit j // 32), 2 bits left in qs
    high = L > 3
    L = np.where(high, L - 4, L).reshape(nb, 2, 4, 32)
    y["hmask"] = sum(high.reshape(nb, 8, 32)[:, k].astype(np.uint8) << k for k in range(8))
    y["qs"] = sum(L[:, :, k] << (2 * k) for k in range(4)).reshape(nb, -1)
    return y.view(np.uint8)


def q6_k(x: np.ndarray) -> np.ndarray:
    x, scales, L, max_scale = _sixteen_groups(x, make_qx_quants, nmax=32)
    nb = len(x)
    zero_block = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-128) / max_scale
        sc = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
    y = _empty_blocks(QType.Q6_K, nb)
    y["d"] = (F32(1) / iscale).astype(np.float16)
    y["scales"] = sc

    d = y["d"].astype(F32)[:, None] * sc.astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int(x.reshape(nb, 16, 16) / d[..., None]), -32, 31) + 32
    L = np.where((d != 0)[..., None], requant, L).reshape(nb, 2, 4, 32)
    # per half (128 weights): ql[l] = w[l] | w[l+64] << 4, ql[l+32] = w[l+32] | w[l+96] << 4,
    # qh[l] = the top two bits of w[l], w[l+32], w[l+64], w[l+96] at bits 0, 2, 4, 6
    low, high = L & 0x0F, L >> 4
    ql = np.stack([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    y["ql"] = ql.reshape(nb, -1)
    y["qh"] = sum(high[:, :, k] << (2 * k) for k in range(4)).reshape(nb, -1)
    y[zero_block] = np.zeros(1, dtype=y.dtype)
    return y.view(np.uint8)


QUANTIZE = {
    QType.Q4_0: q4_0, QType.Q4_1: q4_1, QType.Q5_0: q5_0, QType.Q5_1: q5_1, QType.Q8_0: q8_0,
    QType.Q3_K: q3_k, QType.Q4_K: q4_k, QType.Q5_K: q5_k, QType.Q6_K: q6_k,
}
