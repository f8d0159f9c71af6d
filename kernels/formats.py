"""GGML block formats: the byte layout of every supported tensor type, written once.

A quantized row of `n` weights is `n / block_size` consecutive blocks of `type_size` bytes. The
fields of one block are a NumPy structured dtype below; the NumPy reference views raw bytes through
it, and the Numba and CUDA kernels take their byte offsets from it through the layout constants
at the end (`Q4_K.size`, `Q4_K.qs`, ...), so a layout exists in exactly one place. Field names follow llama.cpp's `block_*` structs in
ggml-common.h. All multi-byte fields are little-endian; `d`, `m` and `dmin` are IEEE fp16.
"""
from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QType

QK = 32    # weights per block of the legacy formats (Q4_0 ... Q8_0)
QK_K = 256  # weights per super-block of the k-quants
K_SCALE_SIZE = 12  # bytes of packed 6-bit scales and mins in Q4_K and Q5_K


@dataclass(frozen=True)
class BlockFormat:
    """One tensor type: `block_size` weights stored in one `block` record of `type_size` bytes."""

    qtype: QType
    block_size: int
    block: np.dtype

    @property
    def type_size(self) -> int:
        return self.block.itemsize

    def offset(self, field: str) -> int:
        """Byte offset of `field` inside one block."""
        return self.block.fields[field][1]

    @property
    def layout(self) -> tuple:
        """A named tuple of plain ints: `size` (bytes per block), then each field's byte offset
        under its own name. Numba and numba-cuda freeze a global tuple into the compiled code,
        so `b + Q4_K.qs` compiles to an add of a constant."""
        fields = self.block.names
        return namedtuple(f"{self.qtype.name}Layout", ("size", *fields))(
            self.type_size, *(self.offset(f) for f in fields))

    def row_bytes(self, n_weights: int) -> int:
        """Bytes of one row of `n_weights` weights; raises ValueError if blocks do not tile it."""
        if n_weights % self.block_size:
            raise ValueError(
                f"a row of {n_weights} weights is not a whole number of {self.qtype.name} "
                f"blocks of {self.block_size}")
        return n_weights // self.block_size * self.type_size

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a tensor of logical NumPy `shape` (rows along the last axis)."""
        n_rows = int(np.prod(shape[:-1], dtype=np.int64))
        return n_rows * self.row_bytes(shape[-1])


def _block(*fields: tuple) -> np.dtype:
    return np.dtype(list(fields))


FORMATS: dict[QType, BlockFormat] = {f.qtype: f for f in [
    BlockFormat(QType.F32, 1, _block(("value", "<f4"))),
    BlockFormat(QType.F16, 1, _block(("value", "<f2"))),
    # bfloat16: the high half of an f32; stored as raw bits because NumPy has no bfloat16.
    BlockFormat(QType.BF16, 1, _block(("value", "<u2"))),
    # w = d * (q - 8); q: 4 bits, weight j in the low nibble of qs[j], weight j+16 in the high.
    BlockFormat(QType.Q4_0, QK, _block(("d", "<f2"), ("qs", "u1", QK // 2))),
    # w = d * q + m
    BlockFormat(QType.Q4_1, QK, _block(("d", "<f2"), ("m", "<f2"), ("qs", "u1", QK // 2))),
    # w = d * (q - 16); the 5th bit of weight j is bit j of the little-endian u32 qh.
    BlockFormat(QType.Q5_0, QK, _block(("d", "<f2"), ("qh", "u1", 4), ("qs", "u1", QK // 2))),
    # w = d * q + m
    BlockFormat(QType.Q5_1, QK, _block(("d", "<f2"), ("m", "<f2"), ("qh", "u1", 4),
                                       ("qs", "u1", QK // 2))),
    # w = d * q, q signed 8 bits
    BlockFormat(QType.Q8_0, QK, _block(("d", "<f2"), ("qs", "i1", QK))),
    # 16 groups of 16: w = d * (scales & 15) * q - dmin * (scales >> 4), q 2 bits
    BlockFormat(QType.Q2_K, QK_K, _block(("scales", "u1", QK_K // 16), ("qs", "u1", QK_K // 4),
                                         ("d", "<f2"), ("dmin", "<f2"))),
    # 16 groups of 16: w = d * (scale - 32) * (q - 4 * !hbit), 6-bit scales packed in 12 bytes
    BlockFormat(QType.Q3_K, QK_K, _block(("hmask", "u1", QK_K // 8), ("qs", "u1", QK_K // 4),
                                         ("scales", "u1", 12), ("d", "<f2"))),
    # 8 groups of 32: w = d * scale * q - dmin * min, 6-bit scales and mins packed in 12 bytes
    BlockFormat(QType.Q4_K, QK_K, _block(("d", "<f2"), ("dmin", "<f2"),
                                         ("scales", "u1", K_SCALE_SIZE), ("qs", "u1", QK_K // 2))),
    # as Q4_K with a 5th bit per weight in qh
    BlockFormat(QType.Q5_K, QK_K, _block(("d", "<f2"), ("dmin", "<f2"),
                                         ("scales", "u1", K_SCALE_SIZE), ("qh", "u1", QK_K // 8),
                                         ("qs", "u1", QK_K // 2))),
    # 16 groups of 16: w = d * scale * (q - 32), q 6 bits = 4 in ql + 2 in qh, scale signed 8 bits
    BlockFormat(QType.Q6_K, QK_K, _block(("ql", "u1", QK_K // 2), ("qh", "u1", QK_K // 4),
                                         ("scales", "i1", QK_K // 16), ("d", "<f2"))),
]}


def block_format(qtype: QType | str | int) -> BlockFormat:
    """The BlockFormat of a tensor type given as a `GGMLQuantizationType`, its name or its number.

    Raises ValueError for a type this project does not implement (kernels sit below mistral_ref and
    raise built-in errors; the GGUF loader re-raises them with the file and tensor named).
    """
    try:
        if isinstance(qtype, str):
            qtype = QType[qtype.upper()]
        qtype = QType(qtype)
        return FORMATS[qtype]
    except (KeyError, ValueError):
        name = getattr(qtype, "name", qtype)
        supported = ", ".join(t.name for t in FORMATS)
        raise ValueError(
            f"tensor type {name} is not supported (supported: {supported})") from None


# The layouts of the quantized formats as module constants, for the compiled kernels.
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = (
    FORMATS[t].layout for t in (QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0,
                                QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K))
