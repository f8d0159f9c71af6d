"""numba-cuda backend: the transformer's kernels on device arrays (see kernels.cuda.backend).

Importing this package imports numba.cuda, which fixes for the whole process whether kernels
run on a GPU or on the simulator (set NUMBA_ENABLE_CUDASIM=1 before the first import).
"""
from pathlib import Path

import numpy as np
from numba import cuda

from .. import jit_cache

jit_cache.install(Path(__file__).parent.parent)  # numba-cuda's cache, now that it is imported

from .backend import (MAX_HEAD_DIM, add_, attention, available, embed, kv_write_,  # noqa: E402
                      matmul, rmsnorm, rope, simulated, swiglu, upload)
from .blocks import UNITS  # noqa: E402

SUPPORTED = tuple(UNITS)

__all__ = ["MAX_HEAD_DIM", "SUPPORTED", "CUDADevice", "add_", "attention", "available", "embed", "kv_write_",
           "matmul", "rmsnorm", "rope", "simulated", "swiglu", "upload"]


class CUDADevice:
    """The forward pass's operations on a GPU (the kernels.device.Device interface): weights
    uploaded once still quantized; activations and the KV cache stay on the device; only what
    `to_host` is asked for comes back."""

    name = "cuda"
    weight_types = SUPPORTED  # the formats its matmul and embed read

    def __init__(self, activations: str = "f32"):
        if activations != "f32":
            raise ValueError(f"the cuda device computes with activations='f32' only, got {activations!r}")
        if not available():
            raise RuntimeError("no CUDA GPU is available (set NUMBA_ENABLE_CUDASIM=1 for the simulator)")
        self.activations = activations

    def upload(self, array: np.ndarray):
        array = np.ascontiguousarray(array)
        return upload(array) if array.dtype == np.uint8 else cuda.to_device(array)

    def zeros(self, shape: tuple[int, ...]):
        return cuda.to_device(np.zeros(shape, np.float32))

    def copy(self, x):
        # A device-to-device copy: numba-cuda's DeviceNDArray has no .copy() (the simulator's
        # arrays do, which is why the tests patch it away).
        out = cuda.device_array_like(x)
        out.copy_to_device(x)
        return out

    def to_host(self, x) -> np.ndarray:
        return x.copy_to_host()

    def concat(self, parts):
        if len(parts) == 1:
            return parts[0]
        out = cuda.device_array((sum(len(p) for p in parts), *parts[0].shape[1:]), parts[0].dtype)
        row = 0
        for part in parts:  # device-to-device copies into contiguous row ranges
            out[row:row + len(part)].copy_to_device(part)
            row += len(part)
        return out

    def cache_list(self, caches) -> list:
        return list(caches)

    def decode_attention_(self, q, k_new, v_new, k_caches, v_caches, layer: int, starts: np.ndarray,
                          window: int):
        outs = []
        for b, start in enumerate(starts):  # one launch per sequence: a batched kernel is to come
            k_cache, v_cache, rows = k_caches[b][layer], v_caches[b][layer], slice(b, b + 1)
            outs.append(attention(q[rows], k_new[rows], v_new[rows], k_cache, v_cache, int(start), window))
            kv_write_(k_cache, v_cache, int(start), k_new[rows], v_new[rows])
        return self.concat(outs)

    def copy_slots_(self, dst, src, n_slots: int) -> None:
        for layer in range(dst.shape[0]):  # (n_slots, D) is contiguous per layer and head
            for head in range(dst.shape[1]):
                dst[layer, head, :n_slots].copy_to_device(src[layer, head, :n_slots])

    def prepare(self, weights) -> list:
        return list(weights)  # f32 activations: nothing to share between the matrices

    def matmuls(self, prepared, x) -> list:
        return [matmul(rows, qtype, x) for rows, qtype in prepared]

    def embed(self, rows, qtype, tokens: np.ndarray, dim: int):
        return embed(rows, qtype, tokens, dim)

    def rope_rotations(self, positions: np.ndarray, inv_freq) -> tuple:
        return cuda.to_device(np.ascontiguousarray(positions, np.int64)), inv_freq  # angles per element

    def rope(self, x, rotations: tuple):
        return rope(x, *rotations)

    matmul, add_, rmsnorm = staticmethod(matmul), staticmethod(add_), staticmethod(rmsnorm)
    attention, swiglu, kv_write_ = staticmethod(attention), staticmethod(swiglu), staticmethod(kv_write_)
