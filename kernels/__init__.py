"""Block formats and compute kernels behind one dispatch point.

Backends: "reference" (NumPy, reads like the spec), "cpu" (Numba), later "cuda" (numba-cuda).
Every backend is tested against the reference on the same inputs.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QType

from kernels.cpu.dequant import DEQUANTIZE as CPU_DEQUANTIZE
from kernels.formats import FORMATS, QK, QK_K, BlockFormat, block_format
from kernels.reference.dequant import DEQUANTIZE as REFERENCE_DEQUANTIZE

BACKENDS = ("reference", "cpu")

__all__ = ["BACKENDS", "FORMATS", "QK", "QK_K", "BlockFormat", "block_format", "dequantize"]


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")


def dequantize(raw: np.ndarray, qtype: QType | str | int, shape: tuple[int, ...],
               backend: str = "cpu") -> np.ndarray:
    """Dequantize a tensor's raw bytes.

    raw: uint8, the tensor's bytes (any shape, read as flat, C order). qtype: its GGML type (enum,
    name or number). shape: its logical NumPy shape, rows along the last axis.
    Returns a new float32 array of `shape`, bit-identical across backends and to llama.cpp.
    """
    fmt = block_format(qtype)
    _check_backend(backend)
    shape = tuple(int(n) for n in shape)
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if raw.flags.writeable:  # kernels always see read-only input: one compiled specialization each
        raw = raw.view()
        raw.flags.writeable = False
    if raw.nbytes != fmt.nbytes(shape):
        raise ValueError(f"{fmt.qtype.name} tensor of shape {shape} needs {fmt.nbytes(shape)} bytes, "
                         f"got {raw.nbytes}")
    if backend == "reference" or fmt.qtype == QType.F32:
        out = REFERENCE_DEQUANTIZE[fmt.qtype](raw)
    else:
        out = np.empty(int(np.prod(shape, dtype=np.int64)), dtype=np.float32)
        CPU_DEQUANTIZE[fmt.qtype](raw, out)
    return out.reshape(shape)
