"""mistral_ref_kernels (the folder kernels/): block formats and compute kernels; knows nothing
about models.

    formats     every block format's byte layout, written once
    reference/  NumPy kernels that read like the spec (the "reference" backend and device)
    cpu/        Numba kernels (the "cpu" backend and device)
    cuda/       numba-cuda kernels (the "cuda" device)
    dispatch    each operation on host arrays, by backend: the one dispatch point
    device      the Device interface the model is written against, and device(name)
"""
from pathlib import Path

from . import jit_cache

jit_cache.install(Path(__file__).parent)  # before any kernel module is compiled or loaded

from .device import DEVICES, Device, HostDevice, device  # noqa: E402
from .dispatch import (ACTIVATIONS, BACKENDS, FORMATS, IMPORTANCE_WEIGHTED, QK, QK_K, QUANTIZABLE,  # noqa: E402
                       BlockFormat, add_, attention, block_format, dequantize, kv_write_, matmul,
                       quantize, rmsnorm, rope, rope_rotations, swiglu)

__all__ = ["ACTIVATIONS", "BACKENDS", "DEVICES", "FORMATS", "IMPORTANCE_WEIGHTED", "QK", "QK_K", "QUANTIZABLE",
           "BlockFormat", "Device", "HostDevice", "add_", "attention", "block_format", "device",
           "dequantize", "kv_write_", "matmul", "quantize", "rmsnorm", "rope", "rope_rotations", "swiglu"]
