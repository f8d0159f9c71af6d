"""The forward pass's operations on one device: the interface mistral_ref.model is written against.

Three devices implement it: "reference" (the NumPy kernels that read like the spec; slow),
"cpu" (Numba kernels, BLAS for prefill), both `HostDevice`s over kernels.dispatch, and "cuda"
(kernels.cuda.CUDADevice: numba-cuda kernels on device arrays).

Conventions for every method: T tokens, H query heads, KV key/value heads, D head dimension,
S KV-cache slots. `Array` is the device's array type (np.ndarray on the host devices, a numba-cuda
DeviceNDArray on "cuda"), float32 unless said otherwise. Every operation returns its result as a
new array, except those whose name ends in `_`, which write into their first argument(s).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from gguf import GGMLQuantizationType as QType

from . import dispatch
from .formats import FORMATS

Array = Any  # np.ndarray on the host devices, a DeviceNDArray on cuda


@runtime_checkable
class Device(Protocol):
    """What a device offers the model. `name`: "reference", "cpu" or "cuda"; `weight_types`: the
    formats its matmul and embed read; `activations`: "f32" or "q8" (kernels.ACTIVATIONS)."""

    name: str
    weight_types: tuple[QType, ...]
    activations: str

    def upload(self, array: np.ndarray) -> Array:
        """A host array (weights: uint8 (n_rows, row_bytes) in their block format; norms: float32;
        RoPE frequencies: float64) as the device keeps it for the model's lifetime."""

    def zeros(self, shape: tuple[int, ...]) -> Array:
        """A new float32 array of zeros (the KV cache)."""

    def copy(self, x: Array) -> Array:
        """A new array with x's contents, on the device (forking a KV cache)."""

    def to_host(self, x: Array) -> np.ndarray:
        """x as a NumPy array (logits)."""

    def concat(self, parts: Sequence[Array]) -> Array:
        """The arrays stacked along their first axis (several sequences' rows); one part is
        returned as it is."""

    def copy_slots_(self, dst: Array, src: Array, n_slots: int) -> None:
        """In place: dst[:, :, :n_slots] = src[:, :, :n_slots], both (n_layers, KV, S, D) (keys or
        values of a KV cache, from or into a prefix-cache entry)."""

    def matmul(self, rows: Array, qtype: QType, x: Array) -> Array:
        """x @ W.T: rows uint8 (n_rows, row_bytes), W in format `qtype`; x (T, n). Returns
        (T, n_rows)."""

    def prepare(self, weights: Sequence[tuple[Array, QType]]) -> Any:
        """Matrices that share their input (q, k, v; gate, up; or one alone), each (rows, qtype)
        as `matmul` takes them, checked and grouped once (when a model loads) in the form
        `matmuls` takes."""

    def matmuls(self, prepared: Any, x: Array) -> list[Array]:
        """[matmul(rows, qtype, x) for each matrix of `prepared`]: x is prepared (quantized, with
        q8 activations) once for all of them."""

    def embed(self, rows: Array, qtype: QType, tokens: np.ndarray, dim: int) -> Array:
        """Rows `tokens` (int64 (T,), host) of an embedding table (vocab, row_bytes), dequantized:
        (T, dim)."""

    def rmsnorm(self, x: Array, weight: Array, eps: float) -> Array:
        """x / sqrt(mean(x^2) + eps) * weight per row. x (T, dim); weight (dim,)."""

    def rope_rotations(self, positions: np.ndarray, inv_freq: Array) -> Any:
        """The rotations of tokens at positions (int64 (T,), host) by inv_freq (float64
        (rope_dim // 2,)), in the form `rope` takes: made once per forward pass, used by every
        layer."""

    def rope(self, x: Array, rotations: Any) -> Array:
        """x (T, heads, D) with pairs (2i, 2i+1) of token t rotated by position t's angles
        (`rope_rotations`); pairs past rope_dim unchanged."""

    def attention(self, q: Array, k_new: Array, v_new: Array, k_cache: Array, v_cache: Array,
                  start_pos: int, window: int) -> Array:
        """Causal grouped-query attention of T tokens at positions start_pos..: q (T, H, D),
        rotated; k_new, v_new (T, KV, D), the chunk's own keys and values; k_cache, v_cache
        (KV, S, D), position p at slot p % S, holding the positions before start_pos. The query at
        p sees keys at max(0, p - window + 1)..p (window 0: all). Returns (T, H, D)."""

    def cache_list(self, caches: Sequence[Array]) -> Any:
        """Several sequences' keys (or values), each (n_layers, KV, S_b, D), in the form
        decode_attention_ takes: made once per step, used by every layer."""

    def decode_attention_(self, q: Array, k_new: Array, v_new: Array, k_caches: Any, v_caches: Any,
                          layer: int, starts: np.ndarray, window: int) -> Array:
        """One decode step of B sequences (continuous batching): q (B, H, D); k_new, v_new
        (B, KV, D), rotated; k_caches, v_caches from cache_list, of which `layer` is used; starts
        int64 (B,), host, each one's position. For each b, `attention` of its one token against
        its own cache, then its key and value into the cache (`kv_write_`). Returns (B, H, D), each
        row what attention gives that sequence alone."""

    def swiglu(self, gate: Array, up: Array) -> Array:
        """silu(gate) * up; both (T, ffn_dim)."""

    def add_(self, x: Array, y: Array) -> Array:
        """In place: x += y, both (T, dim) (the residual stream). Returns x."""

    def kv_write_(self, k_cache: Array, v_cache: Array, start_pos: int, k: Array,
                  v: Array) -> None:
        """In place: keys and values (T, KV, D) of positions start_pos.. into the ring caches
        (KV, S, D) at slots p % S (of positions sharing a slot, the last is kept)."""


class HostDevice:
    """The operations on NumPy arrays in host memory, computed by a backend of kernels.dispatch:
    "cpu" (Numba, BLAS for prefill) or "reference" (NumPy). Weights stay read-only views of the
    file's map."""

    weight_types = tuple(FORMATS)

    def __init__(self, backend: str = "cpu", activations: str = "f32"):
        dispatch.check_backend(backend)
        if activations not in dispatch.ACTIVATIONS:
            raise ValueError(f"activations must be one of {dispatch.ACTIVATIONS}, got {activations!r}")
        self.name = self.backend = backend
        self.activations = activations
        self.scratch = np.empty(1 << 21, np.float32)  # dequantized weight tiles for prefill

    def upload(self, array: np.ndarray) -> np.ndarray:
        return dispatch.read_only(np.asarray(array))

    def zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, np.float32)

    def copy(self, x: np.ndarray) -> np.ndarray:
        return x.copy()

    def to_host(self, x: np.ndarray) -> np.ndarray:
        return x

    def concat(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def copy_slots_(self, dst: np.ndarray, src: np.ndarray, n_slots: int) -> None:
        dst[:, :, :n_slots] = src[:, :, :n_slots]

    def matmul(self, rows: np.ndarray, qtype: QType, x: np.ndarray) -> np.ndarray:
        return dispatch.matmul(rows, qtype, x, self.backend, self.scratch, self.activations)

    def prepare(self, weights: Sequence[tuple[np.ndarray, QType]]) -> dispatch.Matmuls:
        return dispatch.Matmuls(weights, self.backend, self.activations)

    def matmuls(self, prepared: dispatch.Matmuls, x: np.ndarray) -> list[np.ndarray]:
        return prepared(x, self.scratch)

    def embed(self, rows: np.ndarray, qtype: QType, tokens: np.ndarray, dim: int) -> np.ndarray:
        return dispatch.dequantize(rows[tokens], qtype, (len(tokens), dim), self.backend)

    def rmsnorm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        return dispatch.rmsnorm(x, weight, eps, self.backend)

    def rope_rotations(self, positions: np.ndarray, inv_freq: np.ndarray):
        return dispatch.rope_rotations(positions, inv_freq, self.backend)

    def rope(self, x: np.ndarray, rotations) -> np.ndarray:
        return dispatch.rope(x, rotations, self.backend)

    def attention(self, q: np.ndarray, k_new: np.ndarray, v_new: np.ndarray, k_cache: np.ndarray,
                  v_cache: np.ndarray, start_pos: int, window: int) -> np.ndarray:
        return dispatch.attention(q, k_new, v_new, k_cache, v_cache, start_pos, window,
                                  self.backend)

    def cache_list(self, caches: Sequence[np.ndarray]):
        return dispatch.cache_list(caches, self.backend)

    def decode_attention_(self, q: np.ndarray, k_new: np.ndarray, v_new: np.ndarray, k_caches, v_caches,
                          layer: int, starts: np.ndarray, window: int) -> np.ndarray:
        return dispatch.decode_attention(q, k_new, v_new, k_caches, v_caches, layer, starts, window,
                                         self.backend)

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return dispatch.swiglu(gate, up, self.backend)

    add_, kv_write_ = staticmethod(dispatch.add_), staticmethod(dispatch.kv_write_)


DEVICES = ("reference", "cpu", "cuda")


def device(name: str, activations: str = "f32") -> Device:
    """The operations of the forward pass on device `name` ("reference", "cpu" or "cuda").

    "cuda" imports numba.cuda (on a machine without a GPU set NUMBA_ENABLE_CUDASIM=1 for the
    simulator) and supports activations="f32" only.
    """
    if name in ("reference", "cpu"):
        return HostDevice(name, activations)
    if name == "cuda":
        from .cuda import CUDADevice
        return CUDADevice(activations)
    raise ValueError(f"unknown device {name!r} (choose from {', '.join(DEVICES)})")
