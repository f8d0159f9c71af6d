"""The one dispatch point: each operation on host (NumPy) arrays, by backend.

Backends: "reference" (NumPy, reads like the spec) and "cpu" (Numba kernels, BLAS for prefill).
Every backend is tested against the reference on the same inputs. kernels.device wraps these
as the forward pass's devices; kernels.cuda has the same operations on device arrays.
"""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np
from gguf import GGMLQuantizationType as QType
from threadpoolctl import ThreadpoolController

from .cpu import ops as cpu_ops
from .cpu.dequant import DEQUANTIZE as CPU_DEQUANTIZE
from .cpu.matvec import MATVEC as CPU_MATVEC
from .cpu.quant import QUANTIZE as CPU_QUANTIZE
from .cpu.vec_dot import FusedQ8, tile_columns
from .formats import FORMATS, QK, QK_K, BlockFormat, block_format
from .reference import ops as reference_ops
from .reference import vec_dot as reference_vec_dot
from .reference.dequant import DEQUANTIZE as REFERENCE_DEQUANTIZE
from .reference.quant import QUANTIZE as REFERENCE_QUANTIZE

BACKENDS = ("reference", "cpu")
# How activations enter a quantized matmul: "f32" keeps them float32 (exact: agrees with a
# float64 reference to ~1e-6); "q8" quantizes them to 8 bits per block first, as llama.cpp and
# mistral.rs do (their numerics, token for token, and faster integer dot products).
ACTIVATIONS = ("f32", "q8")
# BLAS runs single-threaded inside our prefill: its thread pool and Numba's spin-wait on the same
# cores, and together they made a SmolLM2 prefill 8x slower (38 vs 332 tok/s on 2 cores).
_THREADPOOLS = ThreadpoolController()

__all__ = ["ACTIVATIONS", "BACKENDS", "FORMATS", "QK", "QK_K", "QUANTIZABLE", "BlockFormat",
           "Matmuls", "add_", "attention", "block_format", "cache_list", "decode_attention", "dequantize",
           "kv_write_", "matmul", "matmuls", "quantize", "rmsnorm", "rope", "rope_rotations", "swiglu"]


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")


def read_only(a: np.ndarray) -> np.ndarray:
    if a.flags.writeable:  # kernels always see read-only input: one compiled specialization each
        a = a.view()
        a.flags.writeable = False
    return a


def dequantize(raw: np.ndarray, qtype: QType | str | int, shape: tuple[int, ...],
               backend: str = "cpu", out: np.ndarray | None = None) -> np.ndarray:
    """Dequantize a tensor's raw bytes.

    raw: uint8, the tensor's bytes (any shape, read as flat, C order). qtype: its GGML type (enum,
    name or number). shape: its logical NumPy shape, rows along the last axis. out: optional
    float32 C-contiguous array with as many elements, written in place (a new array costs the
    operating system's page zeroing, about as much as the dequantization itself).
    Returns float32 of `shape` (a view of `out` when given), bit-identical across backends and to
    llama.cpp.
    """
    fmt = block_format(qtype)
    check_backend(backend)
    shape = tuple(int(n) for n in shape)
    size = int(np.prod(shape, dtype=np.int64))
    raw = read_only(np.ascontiguousarray(raw).view(np.uint8).reshape(-1))
    if raw.nbytes != fmt.nbytes(shape):
        raise ValueError(f"{fmt.qtype.name} tensor of shape {shape} needs {fmt.nbytes(shape)} bytes, "
                         f"got {raw.nbytes}")
    if out is not None and (out.dtype != np.float32 or not out.flags.c_contiguous
                            or out.size != size):
        raise ValueError(f"out must be a C-contiguous float32 array of {size} elements, got "
                         f"{out.dtype} {out.shape}")
    if backend == "reference" or fmt.qtype == QType.F32:
        values = REFERENCE_DEQUANTIZE[fmt.qtype](raw)
        if out is None:
            return values.reshape(shape)
        out.reshape(-1)[:] = values.reshape(-1)
    else:
        if out is None:
            out = np.empty(size, dtype=np.float32)
        CPU_DEQUANTIZE[fmt.qtype](raw, out.reshape(-1))
    return out.reshape(shape)


QUANTIZABLE = tuple(REFERENCE_QUANTIZE)


# The formats whose quantizers weigh errors by an importance matrix (llama.cpp's
# quantize_row_q4_K_impl / q5_K_impl).
IMPORTANCE_WEIGHTED = (QType.Q4_K, QType.Q5_K)


def quantize(x: np.ndarray, qtype: QType | str | int, backend: str = "cpu",
             importance: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 weights to a block format, byte-identical to llama.cpp's reference
    quantizers (what llama-quantize runs without an importance matrix) on every backend.

    x: float32 (..., n), rows along the last axis, n a multiple of the block size; finite.
    qtype: one of QUANTIZABLE (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q3_K, Q4_K, Q5_K, Q6_K), F16 or F32.
    importance: None, or float32 (n,) >= 0, an importance matrix's entries for the columns (Q4_K
    and Q5_K: IMPORTANCE_WEIGHTED), the bytes llama-quantize --imatrix writes.
    Returns uint8 (..., row_bytes): the raw layout `gguf.quants.quantize` returns.
    """
    fmt = block_format(qtype)
    check_backend(backend)
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"quantize needs float32 weights, got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] % fmt.block_size:
        raise ValueError(f"{fmt.qtype.name} needs rows of a multiple of {fmt.block_size} weights, "
                         f"got shape {x.shape}")
    if importance is not None:
        importance = np.asarray(importance)
        if fmt.qtype not in IMPORTANCE_WEIGHTED:
            raise ValueError(f"quantizing to {fmt.qtype.name} with an importance matrix is not supported "
                             f"(supported: {', '.join(t.name for t in IMPORTANCE_WEIGHTED)})")
        if importance.dtype != np.float32 or importance.shape != x.shape[-1:]:
            raise ValueError(f"importance must be float32 of shape {x.shape[-1:]}, got "
                             f"{importance.dtype} {importance.shape}")
        if not (np.isfinite(importance).all() and (importance >= 0).all()):
            raise ValueError("importance must be finite and >= 0")
        importance = np.ascontiguousarray(np.broadcast_to(importance, x.shape)).reshape(-1)
    if fmt.qtype in (QType.F32, QType.F16):
        return np.ascontiguousarray(x.astype(fmt.block["value"])).view(np.uint8).reshape(
            *x.shape[:-1], -1)
    if fmt.qtype not in QUANTIZABLE:
        raise ValueError(
            f"quantizing to {fmt.qtype.name} is not supported (supported: "
            f"{', '.join(t.name for t in QUANTIZABLE)}, F16, F32)")
    if not np.isfinite(x).all():
        raise ValueError("cannot quantize non-finite weights (NaN or infinity)")
    out_shape = (*x.shape[:-1], fmt.row_bytes(x.shape[-1]))
    flat = np.ascontiguousarray(x).reshape(-1)
    weighted = () if importance is None else (importance,)  # per weight, as the rows are flat
    if backend == "reference":
        return REFERENCE_QUANTIZE[fmt.qtype](flat, *weighted).reshape(out_shape)
    out = np.empty(fmt.nbytes(x.shape), dtype=np.uint8)
    CPU_QUANTIZE[fmt.qtype](read_only(flat), out, *weighted)
    return out.reshape(out_shape)


def matmul(rows: np.ndarray, qtype: QType | str | int, x: np.ndarray, backend: str = "cpu",
           scratch: np.ndarray | None = None, activations: str = "f32") -> np.ndarray:
    """x @ W.T for a quantized weight matrix W: the transformer's linear layer.

    rows: uint8 (n_rows, row_bytes), W's rows in its block format; x: float32 (T, n).
    Returns float32 (T, n_rows). `activations` (see ACTIVATIONS): with "q8", k-quant weights see
    x in Q8_K blocks and 32-weight formats in Q8_0/Q8_1 blocks, multiplied by integer kernels for
    any T (kernels.cpu.vec_dot; F16/F32/Q2_K/Q3_K weights see x unchanged). With "f32", one
    token (T = 1) runs a fused dequantize-and-dot kernel; more tokens dequantize W a tile of rows
    at a time into `scratch` (float32, at least one row; allocated when None) and multiply the
    tile with BLAS. The reference backend dequantizes W once and multiplies in float64, or with
    "q8" runs llama.cpp's integer block dot products token by token.
    """
    return matmuls([(rows, qtype)], x, backend, scratch, activations)[0]


def matmuls(weights: Sequence[tuple[np.ndarray, QType | str | int]], x: np.ndarray,
            backend: str = "cpu", scratch: np.ndarray | None = None,
            activations: str = "f32") -> list[np.ndarray]:
    """[x @ W.T for each (rows, qtype) of `weights`]: matmul for matrices that share their input
    (q, k, v; gate, up). With "q8" activations the matrices of one format run in one kernel call,
    which quantizes x once for all of them (one parallel loop over all their rows)."""
    return Matmuls(weights, backend, activations)(x, scratch)


class Matmuls:
    """Matrices that share their input (q, k and v; gate and up; or one alone), checked and
    grouped by kernel once, when a model loads: calling it with x returns [x @ W.T for each].
    A decode step makes ~120 of these calls on small matrices, where checking the weights and
    building the kernels' argument tuples on every call cost as much as a third of the step."""

    def __init__(self, weights: Sequence[tuple[np.ndarray, QType | str | int]], backend: str = "cpu",
                 activations: str = "f32"):
        check_backend(backend)
        if activations not in ACTIVATIONS:
            raise ValueError(f"unknown activations {activations!r} (choose from {', '.join(ACTIVATIONS)})")
        self.backend, self.activations = backend, activations
        self.weights = []
        for rows, qtype in weights:
            fmt = block_format(qtype)
            if rows.ndim != 2 or rows.shape[1] % fmt.type_size:
                raise ValueError(f"{fmt.qtype.name} rows of shape {rows.shape} are not whole blocks")
            self.weights.append((read_only(np.ascontiguousarray(rows)), fmt))
        widths = {rows.shape[1] // fmt.type_size * fmt.block_size for rows, fmt in self.weights}
        if len(widths) > 1:
            raise ValueError(f"matrices sharing an input have rows of {sorted(widths)} weights")
        self.width = widths.pop() if widths else None  # weights a row, the input's width
        groups: dict[QType, list[int]] = {}  # q8 matrices by format: one kernel call each
        if backend == "cpu" and activations == "q8":
            for i, (rows, fmt) in enumerate(self.weights):
                if fmt.qtype in reference_vec_dot.VEC_DOT:
                    groups.setdefault(fmt.qtype, []).append(i)
        # (the group's indices, its kernel call) by format; the other matrices one at a time
        self.fused = [(group, FusedQ8(qtype, tuple(self.weights[i][0] for i in group)))
                      for qtype, group in groups.items()]
        fused = {i for group in groups.values() for i in group}
        self.unfused = [(i, rows, fmt) for i, (rows, fmt) in enumerate(self.weights) if i not in fused]
        self.out_rows = [(rows.shape[0], i in fused) for i, (rows, _) in enumerate(self.weights)]

    def __call__(self, x: np.ndarray, scratch: np.ndarray | None = None) -> list[np.ndarray]:
        """x: float32 (T, n). Returns float32 (T, n_rows) for each matrix, in order."""
        if x.ndim != 2 or x.dtype != np.float32:
            raise ValueError(f"activations must be float32 (T, n), got {x.dtype} {x.shape}")
        x = np.ascontiguousarray(x)
        if self.width is not None and x.shape[1] != self.width:
            rows, fmt = self.weights[0]
            fmt.row_bytes(x.shape[1])  # raises when blocks do not tile x's rows
            raise ValueError(f"{fmt.qtype.name} rows of shape {rows.shape} do not hold rows of "
                             f"{x.shape[1]} weights")
        n_columns = x.shape[0]
        padded = tile_columns(n_columns) if self.fused else n_columns  # the fused kernels' columns
        outs = [np.empty((padded if fused else n_columns, n_rows), np.float32) for n_rows, fused in self.out_rows]
        q8 = self.activations == "q8"
        for i, rows, fmt in self.unfused:
            if self.backend == "reference":
                with_q8 = q8 and fmt.qtype in reference_vec_dot.VEC_DOT  # formats with q8 numerics
                outs[i][:] = (np.stack([reference_vec_dot.matvec_q8(rows, fmt.qtype, column) for column in x])
                              if with_q8 else reference_ops.matmul(rows, fmt.qtype, x))
            elif n_columns == 1 and fmt.qtype in CPU_MATVEC:
                CPU_MATVEC[fmt.qtype](rows, x[0], outs[i][0])
            else:
                scratch = _multiply_dequantized_any(rows, fmt.qtype, x, outs[i], scratch)
        if padded != n_columns:
            x = np.concatenate([x, np.repeat(x[-1:], padded - n_columns, axis=0)])
        for group, multiply in self.fused:
            multiply(x, [outs[i] for i in group])
        return [out[:n_columns] for out in outs] if padded != n_columns else outs


def _multiply_dequantized_any(rows: np.ndarray, qtype: QType, x: np.ndarray, out: np.ndarray,
                              scratch: np.ndarray | None) -> np.ndarray:
    """out = x @ W.T through dequantized tiles and BLAS, on this thread or the prefill pool;
    returns the scratch it used (allocated when None or too small)."""
    workers = numba.get_num_threads()
    if scratch is None or scratch.size < workers * x.shape[1]:
        scratch = np.empty(max(workers * x.shape[1], 1 << 21), np.float32)
    with _THREADPOOLS.limit(limits=1, user_api="blas"):
        if workers == 1 or rows.shape[0] * x.shape[1] < PREFILL_POOL_MIN_WEIGHTS:
            _multiply_dequantized(rows, qtype, x, out, scratch)
        else:
            _multiply_dequantized_in_pool(rows, qtype, x, out, scratch, workers)
    return scratch


# Prefill of a big matrix splits its rows between `workers` threads of our own, each
# dequantizing a tile into its share of the scratch and multiplying it with a single-threaded BLAS
# (numpy releases the GIL, the dequantizers are nogil). One thread dequantizing with Numba's
# threads and then a 2-thread BLAS left the two pools spinning against each other; this way both
# cores run BLAS. Mistral-1B, 64-token prefill: 49 -> 66 tok/s. For small matrices handing work
# to the threads costs more than it saves (SmolLM2: 335 -> 299 tok/s), hence the threshold.
PREFILL_POOL_MIN_WEIGHTS = 1 << 22
_PREFILL_POOLS: dict[int, ThreadPoolExecutor] = {}  # by number of workers


def _multiply_dequantized_in_pool(rows: np.ndarray, qtype: QType, x: np.ndarray, out: np.ndarray,
                                  scratch: np.ndarray, workers: int) -> None:
    if workers not in _PREFILL_POOLS:  # Numba's thread count is per thread: 1 in these
        _PREFILL_POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="prefill",
                                                     initializer=numba.set_num_threads, initargs=(1,))
    pool = _PREFILL_POOLS[workers]
    part_rows, part_scratch = -(-rows.shape[0] // workers), scratch.size // workers
    parts = [pool.submit(_multiply_dequantized, rows[r0:r0 + part_rows], qtype, x,
                         out[:, r0:r0 + part_rows], scratch[i * part_scratch:(i + 1) * part_scratch])
             for i, r0 in enumerate(range(0, rows.shape[0], part_rows))]
    for part in parts:
        part.result()


def _multiply_dequantized(rows: np.ndarray, qtype: QType, x: np.ndarray, out: np.ndarray,
                          scratch: np.ndarray) -> None:
    """out = x @ W.T for the quantized rows of W (uint8 (R, row_bytes)), dequantized a tile of
    rows at a time into scratch (float32, at least one row). x: float32 (T, n); out: (T, R)."""
    n = x.shape[1]
    tile_rows = scratch.size // n
    for r0 in range(0, rows.shape[0], tile_rows):
        tile = rows[r0:r0 + tile_rows]
        w = dequantize(tile, qtype, (tile.shape[0], n), out=scratch[:tile.shape[0] * n])
        out[:, r0:r0 + tile.shape[0]] = x @ w.T


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float, backend: str = "cpu") -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight per row. x: float32 (T, dim); weight: float32 (dim,).
    Returns a new float32 (T, dim)."""
    if backend == "reference":
        return reference_ops.rmsnorm(x, weight, eps)
    out = np.empty_like(x)
    cpu_ops.rmsnorm(x, weight, eps, out)
    return out


def rope_rotations(positions: np.ndarray, inv_freq: np.ndarray, backend: str = "cpu") -> Any:
    """The rotations of tokens at positions (int64 (T,)) by inv_freq (float64 (rope_dim // 2,)),
    in the form `rope` takes: made once per forward pass, used by every layer. "cpu": float32
    (T, rope_dim // 2, 2), the (cos, sin) of each angle; "reference": (positions, inv_freq)."""
    if backend == "reference":
        return positions, inv_freq
    out = np.empty((len(positions), len(inv_freq), 2), np.float32)
    cpu_ops.rope_rotations(np.ascontiguousarray(positions, np.int64), inv_freq, out)
    return out


def rope(x: np.ndarray, rotations: Any, backend: str = "cpu") -> np.ndarray:
    """Rotate adjacent pairs of each head of x (float32 (T, heads, D)) by `rope_rotations`;
    pairs past rope_dim unchanged. Returns a new float32 (T, heads, D)."""
    if backend == "reference":
        return reference_ops.rope(x, *rotations)
    out = np.empty_like(x)
    cpu_ops.rope(x, rotations, out)
    return out


def attention(q: np.ndarray, k_new: np.ndarray, v_new: np.ndarray, k_cache: np.ndarray,
              v_cache: np.ndarray, start_pos: int, window: int, backend: str = "cpu") -> np.ndarray:
    """Causal grouped-query attention of a chunk of T tokens at positions start_pos...

    q: float32 (T, H, D); k_new, v_new: (T, KV, D); k_cache, v_cache: (KV, S, D), position p at
    slot p % S, holding (at least) the S positions before start_pos; window: sliding window (0 for
    none). Returns a new float32 (T, H, D). The reference gathers the visible keys out of the ring
    and applies kernels.reference.ops.attention, the band-mask definition; the CPU kernel reads
    the ring in place (kernels.cpu.ops.attention).
    """
    if backend == "reference":
        n_tokens, n_slots = len(q), k_cache.shape[1]
        past = np.arange(max(0, start_pos - n_slots), start_pos)
        positions = np.arange(start_pos, start_pos + n_tokens)
        keys = np.concatenate([k_cache[:, past % n_slots].transpose(1, 0, 2), k_new])
        values = np.concatenate([v_cache[:, past % n_slots].transpose(1, 0, 2), v_new])
        return reference_ops.attention(q, keys, values, positions, np.concatenate([past, positions]),
                                       window)
    out = np.empty_like(q)
    cpu_ops.attention(q, k_new, v_new, k_cache, v_cache, start_pos, window, out)
    return out


def cache_list(caches: Sequence[np.ndarray], backend: str = "cpu"):
    """Several sequences' caches (each float32 C-contiguous (n_layers, KV, S_b, D)) as
    `decode_attention` takes them: on the cpu backend their data addresses and slot counts
    (int64 (B,) each), made once per step and used by every layer, valid while the caches live."""
    if backend != "cpu":
        return list(caches)
    for cache in caches:
        if cache.dtype != np.float32 or cache.ndim != 4 or not cache.flags.c_contiguous:
            raise ValueError(f"a KV cache must be float32 C-contiguous (n_layers, KV, S, D), got "
                             f"{cache.dtype} {cache.shape}")
    return (np.array([cache.ctypes.data for cache in caches], dtype=np.int64),
            np.array([cache.shape[2] for cache in caches], dtype=np.int64), list(caches))


def decode_attention(q: np.ndarray, k_new: np.ndarray, v_new: np.ndarray, k_caches, v_caches,
                     layer: int, starts: np.ndarray, window: int, backend: str = "cpu") -> np.ndarray:
    """One decode step of B sequences against their own caches, then each one's key and value
    into its cache: for each b, `attention` of T = 1 at position starts[b] and `kv_write_`, in one
    call. q: float32 (B, H, D); k_new, v_new: (B, KV, D); k_caches, v_caches: from `cache_list`,
    of which `layer` is used; starts: int64 (B,). Returns a new float32 (B, H, D), each row
    bit-identical to `attention`'s for that sequence alone."""
    if backend == "reference":
        out = np.empty_like(q)
        for b, start in enumerate(starts):
            rows = slice(b, b + 1)
            k_cache, v_cache = k_caches[b][layer], v_caches[b][layer]
            out[rows] = attention(q[rows], k_new[rows], v_new[rows], k_cache, v_cache, int(start), window,
                                  backend)
            kv_write_(k_cache, v_cache, int(start), k_new[rows], v_new[rows])
        return out
    (k_addresses, slots, _), (v_addresses, _, _) = k_caches, v_caches
    if len(k_addresses) != len(q) or len(starts) != len(q):
        raise ValueError(f"{len(q)} queries, {len(k_addresses)} caches and {len(starts)} positions")
    out = np.empty_like(q)
    cpu_ops.decode_attention(q, k_new, v_new, k_addresses, v_addresses, slots, layer, starts, window, out)
    return out


def swiglu(gate: np.ndarray, up: np.ndarray, backend: str = "cpu") -> np.ndarray:
    """silu(gate) * up. gate, up: float32 (T, ffn_dim). Returns a new float32 (T, ffn_dim)."""
    if backend == "reference":
        return reference_ops.swiglu(gate, up)
    out = np.empty_like(gate)
    cpu_ops.swiglu(gate, up, out)
    return out


def add_(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x += y in place (the residual stream). x, y: float32 (T, dim). Returns x."""
    return np.add(x, y, out=x)


def kv_write_(k_cache: np.ndarray, v_cache: np.ndarray, start_pos: int, k: np.ndarray,
              v: np.ndarray) -> None:
    """In place: store keys and values (T, KV, D) of positions start_pos.. in a ring cache
    (KV, S, D) at slots p % S; when T > S only the last S positions are kept (later ones win)."""
    n_slots, keep = k_cache.shape[1], min(len(k), k_cache.shape[1])
    first = (start_pos + len(k) - keep) % n_slots
    before_wrap = min(keep, n_slots - first)
    for cache, new in ((k_cache, k), (v_cache, v)):  # slices, not fancy indexing: decode writes 1 slot
        new = new[len(new) - keep:].transpose(1, 0, 2)
        cache[:, first:first + before_wrap] = new[:, :before_wrap]
        cache[:, :keep - before_wrap] = new[:, before_wrap:]
