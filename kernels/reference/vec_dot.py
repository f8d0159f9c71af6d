"""llama.cpp numerics for W @ x: the activations quantized to 8 bits, integer dot products per block.

llama.cpp (and mistral.rs, through candle) never multiplies quantized weights by float activations.
It first quantizes x to the weight format's `vec_dot_type` (ggml-cpu.c's type traits):

    Q4_0, Q5_0, Q8_0 -> Q8_0     x = d * q,  q int8, per 32       (quantize_row_q8_0_ref)
    Q4_1, Q5_1       -> Q8_1     as Q8_0, plus s = d * sum(q)     (quantize_row_q8_1_ref)
    Q4_K, Q5_K, Q6_K -> Q8_K     x = d * q per 256, d float32, bsums = sums of q per 16
                                                                  (quantize_row_q8_K_ref)

then sums integer products per block and combines them with the float scales. This module is the
NumPy reference: `quantize_activations` is bit-identical to the `quantize_row_q8_*_ref` C functions,
and each `vec_dot_*` does the integer sums exactly and the float arithmetic in the order of
llama.cpp's portable `ggml_vec_dot_*_generic` functions (ggml-cpu/quants.c), vectorized over rows.
The SIMD versions llama.cpp runs on x86 sum the same integers but combine the floats in another
order, so they agree with this to float rounding (~1e-6 relative), not bit for bit.
kernels.cpu.vec_dot is the fast Numba version.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QType

from ..formats import FORMATS, QK, QK_K
from .dequant import _bits, _nibbles, _q5_values, k_scales_mins
from .quant import _absmax_signed, _inverse, nearest_int, roundf

F32 = np.float32

# Activation blocks (ggml-common.h's block_q8_0, block_q8_1, block_q8_K). Never stored in files,
# so they live here rather than in kernels.formats.
Q8_0_BLOCK = FORMATS[QType.Q8_0].block
Q8_1_BLOCK = np.dtype([("d", "<f2"), ("s", "<f2"), ("qs", "i1", QK)])
Q8_K_BLOCK = np.dtype([("d", "<f4"), ("qs", "i1", QK_K), ("bsums", "<i2", QK_K // 16)])


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """float32 (n,) -> Q8_0 blocks (n / 32,): d = amax / 127, q = roundf(x / d)."""
    x = x.reshape(-1, QK)
    d = np.abs(x).max(axis=1) / F32(127)
    y = np.zeros(len(x), Q8_0_BLOCK)
    y["d"] = d
    y["qs"] = roundf(x * _inverse(d)[:, None])
    return y


def quantize_q8_1(x: np.ndarray) -> np.ndarray:
    """As Q8_0, plus s = fp16(sum(q) * d), d before its rounding to fp16."""
    x = x.reshape(-1, QK)
    d = np.abs(x).max(axis=1) / F32(127)
    y = np.zeros(len(x), Q8_1_BLOCK)
    y["d"] = d
    y["qs"] = roundf(x * _inverse(d)[:, None])
    y["s"] = y["qs"].sum(axis=1, dtype=np.int32).astype(F32) * d
    return y


def quantize_q8_k(x: np.ndarray) -> np.ndarray:
    """float32 (n,) -> Q8_K blocks (n / 256,): q = min(127, nearest_int(-127 / max * x)) where max
    is the first x of largest magnitude, d = 1 / (-127 / max); all-zero blocks get d = 0, q = 0."""
    x = x.reshape(-1, QK_K)
    peak = _absmax_signed(x)
    zero = peak == 0
    with np.errstate(divide="ignore"):
        iscale = np.where(zero, F32(0), F32(-127) / np.where(zero, F32(1), peak)).astype(F32)
    y = np.zeros(len(x), Q8_K_BLOCK)
    y["qs"] = np.minimum(127, nearest_int(iscale[:, None] * x))
    y["bsums"] = y["qs"].reshape(-1, QK_K // 16, 16).sum(axis=2, dtype=np.int32)
    with np.errstate(divide="ignore"):
        y["d"] = np.where(zero, F32(0), F32(1) / iscale)
    return y


VEC_DOT_TYPE = {QType.Q4_0: QType.Q8_0, QType.Q5_0: QType.Q8_0, QType.Q8_0: QType.Q8_0,
                QType.Q4_1: QType.Q8_1, QType.Q5_1: QType.Q8_1,
                QType.Q4_K: QType.Q8_K, QType.Q5_K: QType.Q8_K, QType.Q6_K: QType.Q8_K}
_QUANTIZE_ACTIVATIONS = {QType.Q8_0: quantize_q8_0, QType.Q8_1: quantize_q8_1,
                         QType.Q8_K: quantize_q8_k}


def quantize_activations(x: np.ndarray, weight_qtype: QType) -> np.ndarray:
    """x: float32 (n,) -> the blocks of x in `weight_qtype`'s vec_dot_type (a structured array of
    Q8_0_BLOCK, Q8_1_BLOCK or Q8_K_BLOCK records; `.view(np.uint8)` gives llama.cpp's bytes)."""
    return _QUANTIZE_ACTIVATIONS[VEC_DOT_TYPE[QType(weight_qtype)]](np.asarray(x, F32))


# ------------------------------------------------------------------ dot products, one per format
# Each takes the weight blocks (n_rows, n_blocks) and the activation blocks (n_blocks,) and returns
# float32 (n_rows,). Integer sums are exact (int64 here, int32 in C: no overflow at these sizes);
# `sumf` accumulates block by block in float32 in the C order.

def _fp16(v: np.ndarray) -> np.ndarray:
    return v.astype(F32)


def _int_dot(q: np.ndarray, y: np.ndarray) -> np.ndarray:
    """sum over the last axis of integer weights q (rows, blocks, k) times y (blocks, k)."""
    return (q.astype(np.int64) * y.astype(np.int64)).sum(axis=-1)


def vec_dot_q4_0_q8_0(w: np.ndarray, y: np.ndarray) -> np.ndarray:
    sumi = _int_dot(_nibbles(w["qs"].reshape(-1, QK // 2), 1).reshape(*w.shape, QK).astype(np.int8) - 8,
                    y["qs"])
    dx, dy = _fp16(w["d"]), _fp16(y["d"])
    sumf = np.zeros(len(w), F32)
    for ib in range(w.shape[1]):  # sumf += sumi*d_x*d_y
        sumf = sumf + sumi[:, ib].astype(F32) * dx[:, ib] * dy[ib]
    return sumf


def _legacy_affine(sumi: np.ndarray, w: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Q4_1 and Q5_1: sumf += (d_x*d_y)*sumi + m_x*s_y."""
    dx, mx, dy, sy = _fp16(w["d"]), _fp16(w["m"]), _fp16(y["d"]), _fp16(y["s"])
    sumf = np.zeros(len(w), F32)
    for ib in range(w.shape[1]):
        sumf = sumf + ((dx[:, ib] * dy[ib]) * sumi[:, ib].astype(F32) + mx[:, ib] * sy[ib])
    return sumf


def vec_dot_q4_1_q8_1(w: np.ndarray, y: np.ndarray) -> np.ndarray:
    q = _nibbles(w["qs"].reshape(-1, QK // 2), 1).reshape(*w.shape, QK)
    return _legacy_affine(_int_dot(q, y["qs"]), w, y)


def vec_dot_q5_0_q8_0(w: np.ndarray, y: np.ndarray) -> np.ndarray:
    q = _q5_values(w.reshape(-1)).reshape(*w.shape, QK).astype(np.int8) - 16
    sumi = _int_dot(q, y["qs"])
    dx, dy = _fp16(w["d"]), _fp16(y["d"])
    sumf = np.zeros(len(w), F32)
    for ib in range(w.shape[1]):  # sumf += (d_x*d_y)*sumi
        sumf = sumf + (dx[:, ib] * dy[ib]) * sumi[:, ib].astype(F32)
    return sumf


def vec_dot_q5_1_q8_1(w: np.ndarray, y: np.ndarray) -> np.ndarray:
    q = _q5_values(w.reshape(-1)).reshape(*w.shape, QK)
    return _legacy_affine(_int_dot(q, y["qs"]), w, y)


def vec_dot_q8_0_q8_0(w: np.ndarray, y: np.ndarray) -> np.ndarray:
    sumi = _int_dot(w["qs"], y["qs"])
    dx, dy = _fp16(w["d"]), _fp16(y["d"])
    sumf = np.zeros(len(w), F32)
    for ib in range(w.shape[1]):  # sumf += sumi*(d_x*d_y)
        sumf = sumf + sumi[:, ib].astype(F32) * (dx[:, ib] * dy[ib])
    return sumf


def _k_quant_sum(q: np.ndarray, group_scales: np.ndarray, w: np.ndarray, y: np.ndarray,
                 mins: np.ndarray | None) -> np.ndarray:
    """The k-quant generic loop. q: int weights (rows, blocks, 256); group_scales: (rows, blocks,
    groups), each covering 256 / groups weights; mins: (rows, blocks, 8) or None (Q6_K).

    C keeps 8 int32 lanes, aux32[l] = sum of scale * q * y over the weights at positions = l mod 8,
    and 8 float lanes sums[l] += (d_x * d_y) * aux32[l] across blocks; the mins go straight into
    sumf -= (dmin_x * d_y) * sum(bsums[j] * mins[j/2]); at the end sumf += sums[0] ... sums[7]."""
    n_rows, n_blocks, _ = q.shape
    scale = np.repeat(group_scales.astype(np.int64), QK_K // group_scales.shape[2], axis=2)
    aux32 = (scale * q * y["qs"].astype(np.int64)).reshape(n_rows, n_blocks, -1, 8).sum(axis=2)
    yd = y["d"].astype(F32)
    sums = np.zeros((n_rows, 8), F32)
    sumf = np.zeros(n_rows, F32)
    for i in range(n_blocks):
        d = _fp16(w["d"][:, i]) * yd[i]
        sums = sums + d[:, None] * aux32[:, i].astype(F32)
        if mins is not None:
            summs = (y["bsums"][i].astype(np.int64) * np.repeat(mins[:, i].astype(np.int64), 2, axis=1)).sum(axis=1)
            dmin = _fp16(w["dmin"][:, i]) * yd[i]
            sumf = sumf - dmin * summs.astype(F32)
    for lane in range(8):
        sumf = sumf + sums[:, lane]
    return sumf


def vec_dot_q4_k_q8_k(w: np.ndarray, y: np.ndarray) -> np.ndarray:
    n_rows, n_blocks = w.shape
    scales, mins = (s.reshape(n_rows, n_blocks, 8) for s in k_scales_mins(w["scales"].reshape(-1, 12)))
    q = _nibbles(w["qs"].reshape(-1, QK_K // 2), 4).reshape(n_rows, n_blocks, QK_K)
    return _k_quant_sum(q, scales, w, y, mins)


def vec_dot_q5_k_q8_k(w: np.ndarray, y: np.ndarray) -> np.ndarray:
    n_rows, n_blocks = w.shape
    scales, mins = (s.reshape(n_rows, n_blocks, 8) for s in k_scales_mins(w["scales"].reshape(-1, 12)))
    low = _nibbles(w["qs"].reshape(-1, QK_K // 2), 4)
    high = _bits(w["qh"].reshape(-1, QK_K // 8), 1, 1)
    q = (low | (high << 4)).reshape(n_rows, n_blocks, QK_K)
    return _k_quant_sum(q, scales, w, y, mins)


def vec_dot_q6_k_q8_k(w: np.ndarray, y: np.ndarray) -> np.ndarray:
    n_rows, n_blocks = w.shape
    low = _nibbles(w["ql"].reshape(-1, QK_K // 2), 2)
    high = _bits(w["qh"].reshape(-1, QK_K // 4), 2, 2)
    q = ((low | (high << 4)).astype(np.int8) - 32).reshape(n_rows, n_blocks, QK_K)
    return _k_quant_sum(q, w["scales"], w, y, None)


VEC_DOT = {QType.Q4_0: vec_dot_q4_0_q8_0, QType.Q4_1: vec_dot_q4_1_q8_1,
           QType.Q5_0: vec_dot_q5_0_q8_0, QType.Q5_1: vec_dot_q5_1_q8_1,
           QType.Q8_0: vec_dot_q8_0_q8_0, QType.Q4_K: vec_dot_q4_k_q8_k,
           QType.Q5_K: vec_dot_q5_k_q8_k, QType.Q6_K: vec_dot_q6_k_q8_k}


def vec_dot(rows: np.ndarray, qtype: QType, y: np.ndarray) -> np.ndarray:
    """Dot products of quantized rows with already-quantized activation blocks `y` (from
    quantize_activations). rows: uint8 (n_rows, row_bytes). Returns float32 (n_rows,)."""
    qtype = QType(qtype)
    w = np.ascontiguousarray(rows).view(FORMATS[qtype].block)
    return VEC_DOT[qtype](w, y)


def matvec_q8(rows: np.ndarray, qtype: QType, x: np.ndarray) -> np.ndarray:
    """W @ x with llama.cpp's numerics: x (float32 (n,)) quantized per block to the vec_dot_type,
    then integer block dot products. rows: uint8 (n_rows, row_bytes). Returns float32 (n_rows,)."""
    return vec_dot(rows, qtype, quantize_activations(x, qtype))
