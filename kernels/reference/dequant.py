"""NumPy reference dequantizers: each reads like the format's definition, block by block.

Every function takes the raw bytes of whole blocks (uint8, flat) and returns float32 weights
(flat). They multiply in the same order as llama.cpp's `dequantize_row_*`, so the results are
bit-identical to it and to gguf-py. Block layouts come from kernels.formats.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QType

from ..formats import FORMATS, K_SCALE_SIZE, QK_K

F32 = np.float32


def _blocks(raw: np.ndarray, qtype: QType) -> np.ndarray:
    """View flat bytes as an array of block records."""
    return raw.view(FORMATS[qtype].block)


def _nibbles(qs: np.ndarray, groups: int) -> np.ndarray:
    """(n, groups * L) packed bytes -> (n, groups * 2 * L) 4-bit values: each group of L bytes
    holds L weights in its low nibbles, then the next L weights in its high nibbles."""
    n = qs.shape[0]
    qs = qs.reshape(n, groups, 1, -1)
    return ((qs >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F).reshape(n, -1)


def _bits(packed: np.ndarray, width: int, groups: int) -> np.ndarray:
    """(n, groups * L) bytes -> (n, groups * (8 // width) * L) fields of `width` bits: field k of
    byte j in group g is weight `g * (8 // width) * L + k * L + j` (llama.cpp's shift-by-group order)."""
    n = packed.shape[0]
    shifts = np.arange(0, 8, width, dtype=np.uint8).reshape(1, 1, -1, 1)
    return ((packed.reshape(n, groups, 1, -1) >> shifts) & ((1 << width) - 1)).reshape(n, -1)


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(F32)[..., None]


def f32(raw: np.ndarray) -> np.ndarray:
    return raw.view("<f4").astype(F32)


def f16(raw: np.ndarray) -> np.ndarray:
    """IEEE half to float32; signalling NaNs come back quiet, as from the CPU's conversion
    instruction (NumPy alone would keep them signalling)."""
    out = raw.view("<f2").astype(F32)
    out.view(np.uint32)[np.isnan(out)] |= 0x00400000
    return out


def bf16(raw: np.ndarray) -> np.ndarray:
    """bfloat16 is the upper 16 bits of a float32."""
    return (raw.view("<u2").astype(np.uint32) << 16).view(F32)


def q4_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, QType.Q4_0)
    q = _nibbles(b["qs"], 1).astype(np.int8) - 8
    return (_fp16(b["d"]) * q.astype(F32)).ravel()


def q4_1(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, QType.Q4_1)
    q = _nibbles(b["qs"], 1)
    return (_fp16(b["d"]) * q.astype(F32) + _fp16(b["m"])).ravel()


def _q5_values(b: np.ndarray) -> np.ndarray:
    """Five-bit values of Q5_0/Q5_1 blocks: low nibbles from qs, fifth bit j from qh's bit j."""
    high = (b["qh"].copy().view("<u4") >> np.arange(32, dtype=np.uint32)) & 1
    return _nibbles(b["qs"], 1) | (high.astype(np.uint8) << 4)


def q5_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, QType.Q5_0)
    q = _q5_values(b).astype(np.int8) - 16
    return (_fp16(b["d"]) * q.astype(F32)).ravel()


def q5_1(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, QType.Q5_1)
    return (_fp16(b["d"]) * _q5_values(b).astype(F32) + _fp16(b["m"])).ravel()


def q8_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, QType.Q8_0)
    return (b["qs"].astype(F32) * _fp16(b["d"])).ravel()


def q2_k(raw: np.ndarray) -> np.ndarray:
    """16 groups of 16 weights; scales byte = (min << 4) | scale; q: 2 bits, 4 fields per byte."""
    b = _blocks(raw, QType.Q2_K)
    n = len(b)
    scale = _fp16(b["d"]) * (b["scales"] & 0x0F).astype(F32)
    minimum = _fp16(b["dmin"]) * (b["scales"] >> 4).astype(F32)
    q = _bits(b["qs"], 2, 2).reshape(n, 16, 16).astype(F32)
    return (scale[..., None] * q - minimum[..., None]).ravel()


def q3_k(raw: np.ndarray) -> np.ndarray:
    """16 groups of 16; 6-bit scales (low 4 bits in bytes 0-7, high 2 bits in 8-11), offset 32;
    q = 2 low bits from qs minus 4 where the weight's hmask bit is clear."""
    b = _blocks(raw, QType.Q3_K)
    n = len(b)
    low = _nibbles(b["scales"][:, :8], 1)
    high = _bits(b["scales"][:, 8:], 2, 1)
    scales = (low | (high << 4)).astype(np.int8) - 32
    group_scale = _fp16(b["d"]) * scales.astype(F32)
    q = _bits(b["qs"], 2, 2).astype(np.int8)
    hbit = _bits(b["hmask"], 1, 1)
    q = (q - ((hbit ^ 1) << 2).astype(np.int8)).reshape(n, 16, 16).astype(F32)
    return (group_scale[..., None] * q).ravel()


def k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack Q4_K/Q5_K's 12 bytes into 8 six-bit scales and 8 six-bit mins (uint8, (n, 8) each).

    Groups 0-3: scale = bytes[j] & 63, min = bytes[j+4] & 63. Groups 4-7: the low 4 bits come from
    bytes[j+8] (scale low nibble, min high nibble), the top 2 bits from bytes[j-4] and bytes[j] >> 6.
    """
    assert packed.shape[-1] == K_SCALE_SIZE
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mins = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return scales, mins


def q4_k(raw: np.ndarray) -> np.ndarray:
    """8 groups of 32: w = (d * scale) * q - (dmin * min); q 4 bits, 64 weights per 32 bytes."""
    b = _blocks(raw, QType.Q4_K)
    n = len(b)
    scales, mins = k_scales_mins(b["scales"])
    q = _nibbles(b["qs"], 4).reshape(n, 8, 32).astype(F32)
    scale = (_fp16(b["d"]) * scales.astype(F32))[..., None]
    minimum = (_fp16(b["dmin"]) * mins.astype(F32))[..., None]
    return (scale * q - minimum).ravel()


def q5_k(raw: np.ndarray) -> np.ndarray:
    """As Q4_K, with weight i of group g taking a fifth bit from bit g of qh[i]."""
    b = _blocks(raw, QType.Q5_K)
    n = len(b)
    scales, mins = k_scales_mins(b["scales"])
    high = _bits(b["qh"], 1, 1).reshape(n, 8, 32)
    q = (_nibbles(b["qs"], 4).reshape(n, 8, 32) | (high << 4)).astype(F32)
    scale = (_fp16(b["d"]) * scales.astype(F32))[..., None]
    minimum = (_fp16(b["dmin"]) * mins.astype(F32))[..., None]
    return (scale * q - minimum).ravel()


def q6_k(raw: np.ndarray) -> np.ndarray:
    """16 groups of 16: w = (d * scale) * (q - 32). Each half of 128 weights takes its low nibbles
    from 64 bytes of ql and its top 2 bits from 32 bytes of qh (4 fields per byte)."""
    b = _blocks(raw, QType.Q6_K)
    n = len(b)
    low = _nibbles(b["ql"], 2)
    high = _bits(b["qh"], 2, 2)
    q = ((low | (high << 4)).astype(np.int8) - 32).reshape(n, 16, 16).astype(F32)
    scale = (_fp16(b["d"]) * b["scales"].astype(F32))[..., None]
    return (scale * q).ravel()


DEQUANTIZE = {
    QType.F32: f32, QType.F16: f16, QType.BF16: bf16,
    QType.Q4_0: q4_0, QType.Q4_1: q4_1, QType.Q5_0: q5_0, QType.Q5_1: q5_1, QType.Q8_0: q8_0,
    QType.Q2_K: q2_k, QType.Q3_K: q3_k, QType.Q4_K: q4_k, QType.Q5_K: q5_k, QType.Q6_K: q6_k,
}
assert DEQUANTIZE.keys() == FORMATS.keys()
assert QK_K == 256  # the k-quant group counts above assume 256-weight super-blocks
