"""numba-cuda kernels for the transformer: quantized matmul, embedding lookup, RMSNorm, RoPE,
attention over a ring KV cache, SwiGLU, residual add. Device arrays in, device arrays out.

Shapes: T tokens, H query heads, KV key/value heads, D head dim, S KV-cache slots. Activations
are float32. Weights stay in their block format on the device (`upload`); kernels read them
through kernels.cuda.blocks. Every kernel runs unchanged on the CUDA simulator
(NUMBA_ENABLE_CUDASIM=1): reductions go through shared memory with __syncthreads (the simulator
has no warp shuffles), shared arrays are declared one per line (the simulator aliases arrays
declared on one line), and float literals are float32 so nothing is promoted to float64.
docs/cuda.md explains the thread mappings and the expected roofline.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import numba
import numpy as np
from gguf import GGMLQuantizationType as QType
from numba import cuda, float32

from .blocks import UNITS, Unit
from ..formats import block_format

F32 = np.float32
WARP = 32

# Decode matvec: one warp per output row, MATVEC_WARPS rows per block; x staged in shared memory
# X_TILE values at a time, stored skewed (one pad word per 32) so that lanes reading the same
# offset of consecutive 32-weight units hit different banks.
MATVEC_WARPS = 8
MATVEC_THREADS = MATVEC_WARPS * WARP
X_TILE = 4096
X_TILE_SKEWED = X_TILE + X_TILE // WARP

# Prefill matmul: a block of 16 x 16 threads computes a TILE x TILE tile of out (rows x tokens),
# 4 x 4 outputs per thread, stepping through n TILE_K weights at a time; each thread dequantizes
# one RUN of consecutive weights of the W tile (TILE * TILE_K / RUN = 256 runs, one per thread).
TILE, TILE_K, RUN, SIDE = 64, 32, 8, 16
TILE_K_PADDED = TILE_K + 1  # shared tiles are padded a column: conflict-free column reads
PER_THREAD = TILE // SIDE

# Elementwise kernels and RMSNorm.
THREADS = 256

# Attention: one block of ATTENTION_THREADS per (token, head); keys in tiles of KEY_TILE.
ATTENTION_THREADS = 128
KEY_TILE = 32
MAX_HEAD_DIM = ATTENTION_THREADS  # thread d owns output dimension d
KEY_PARTS = ATTENTION_THREADS // KEY_TILE  # threads per key when computing scores
HEAD_DIM_PADDED = MAX_HEAD_DIM + 1


def simulated() -> bool:
    """True when numba.cuda is the simulator (pure Python, for tests). numba.cuda picks it once,
    when first imported, from NUMBA_ENABLE_CUDASIM as numba's config last read it."""
    return cuda.jit.__module__.startswith("numba.cuda.simulator")


def available() -> bool:
    """True when kernels can run: on a CUDA GPU, or on the simulator."""
    return simulated() or cuda.is_available()


def _grid(n: int, threads: int) -> int:
    return max(1, (n + threads - 1) // threads)


# ---------------------------------------------------------------- launches

_recorded: list | None = None  # the list recording_launches yields, None outside it
_run = True  # False inside recording_launches(run=False)


@contextmanager
def recording_launches(run: bool = True):
    """Record every kernel launch made inside the block in the list it yields, as (kernel,
    argument types): kernel is (factory, format name) for the per-format kernels, e.g.
    ("_matvec_kernel", "Q4_0"), and (name, None) for the others, e.g. ("_rmsnorm", None); the
    argument types are the numba types the launch compiles the kernel for. With run=False the
    kernels are not run: the types depend only on the host code, the outputs are garbage.
    tests/test_cuda_ptx.py compiles each recorded kernel for real GPUs (the simulator never does).
    """
    global _recorded, _run
    outer = _recorded, _run
    _recorded, _run = [], run
    try:
        yield _recorded
    finally:
        _recorded, _run = outer


def _launch(kernel, grid, block, *args) -> None:
    """kernel[grid, block](*args), recorded inside recording_launches."""
    if _recorded is not None:
        name = next(((kind.__name__, qtype.name) for (kind, qtype), built in _KERNELS.items()
                     if built is kernel), (kernel.py_func.__name__, None))
        _recorded.append((name, tuple(numba.typeof(a) for a in args)))
    if _run:
        kernel[grid, block](*args)


@cuda.jit(device=True, inline="always")
def skew(i):
    return i + (i >> 5)


# ---------------------------------------------------------------- quantized matmul and embedding

def _matvec_kernel(unit: Unit):
    size, lanes, header, quant = unit

    @cuda.jit(cache=True)
    def matvec(rows, x, out):
        """out[r] = sum_k W[r, k] x[k]. rows: (n_rows, row) block bytes; x, out: float32 1-D."""
        xs = cuda.shared.array(X_TILE_SKEWED, float32)
        partial = cuda.shared.array(MATVEC_THREADS, float32)
        tid = cuda.threadIdx.x
        lane = tid % WARP
        r = cuda.blockIdx.x * MATVEC_WARPS + tid // WARP
        n = x.shape[0]
        acc = F32(0)
        for tile in range(0, n, X_TILE):
            width = min(X_TILE, n - tile)
            for i in range(tid, width, MATVEC_THREADS):
                xs[skew(i)] = x[tile + i]
            cuda.syncthreads()
            if r < rows.shape[0]:
                row = rows[r]
                first = tile // size
                for item in range(lane, width // size * lanes, WARP):
                    u = item // lanes
                    scale, bias, aux = header(row, first + u)
                    qx = F32(0)
                    sx = F32(0)
                    for j in range(item % lanes, size, lanes):
                        xv = xs[skew(u * size + j)]
                        qx += quant(row, first + u, aux, j) * xv
                        sx += xv
                    acc += scale * qx + bias * sx
            cuda.syncthreads()
        partial[tid] = acc
        cuda.syncthreads()
        step = WARP // 2
        while step > 0:  # tree sum over the lanes of each warp
            if lane < step:
                partial[tid] += partial[tid + step]
            cuda.syncthreads()
            step //= 2
        if lane == 0 and r < rows.shape[0]:
            out[r] = partial[tid]

    return matvec


def _matmul_kernel(unit: Unit):
    size, _, header, quant = unit

    @cuda.jit(cache=True)
    def matmul(rows, x, out):
        """out[t, r] = sum_k W[r, k] x[t, k]. rows: (n_rows, row); x: (T, n); out: (T, n_rows)."""
        ws = cuda.shared.array((TILE, TILE_K_PADDED), float32)
        xs = cuda.shared.array((TILE, TILE_K_PADDED), float32)
        acc = cuda.local.array((PER_THREAD, PER_THREAD), float32)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        r0, t0 = cuda.blockIdx.x * TILE, cuda.blockIdx.y * TILE
        n_rows, n_tokens, n = rows.shape[0], x.shape[0], x.shape[1]
        for i in range(PER_THREAD):
            for j in range(PER_THREAD):
                acc[i, j] = F32(0)
        # This thread fills ws[mine, j0:j0 + RUN] and xs[mine, j0:j0 + RUN].
        mine = (ty * SIDE + tx) // (TILE_K // RUN)
        j0 = (ty * SIDE + tx) % (TILE_K // RUN) * RUN
        for k0 in range(0, n, TILE_K):
            k = k0 + j0
            if r0 + mine < n_rows:
                row = rows[r0 + mine]
                scale, bias, aux = header(row, k // size)
                for jj in range(RUN):
                    ws[mine, j0 + jj] = scale * quant(row, k // size, aux, k % size + jj) + bias
            else:
                for jj in range(RUN):
                    ws[mine, j0 + jj] = F32(0)
            for jj in range(RUN):
                value = F32(0)
                if t0 + mine < n_tokens:
                    value = x[t0 + mine, k + jj]
                xs[mine, j0 + jj] = value
            cuda.syncthreads()
            for kk in range(TILE_K):
                for i in range(PER_THREAD):
                    w = ws[tx + SIDE * i, kk]
                    for j in range(PER_THREAD):
                        acc[i, j] += w * xs[ty + SIDE * j, kk]
            cuda.syncthreads()
        for i in range(PER_THREAD):
            for j in range(PER_THREAD):
                r, t = r0 + tx + SIDE * i, t0 + ty + SIDE * j
                if r < n_rows and t < n_tokens:
                    out[t, r] = acc[i, j]

    return matmul


def _embed_kernel(unit: Unit):
    size, _, header, quant = unit

    @cuda.jit(cache=True)
    def embed(rows, tokens, out):
        """out[t] = W[tokens[t]] dequantized: one thread per unit of weights."""
        t, u = cuda.blockIdx.y, cuda.grid(1)
        if u < out.shape[1] // size:
            row = rows[tokens[t]]
            scale, bias, aux = header(row, u)
            for j in range(size):
                out[t, u * size + j] = scale * quant(row, u, aux, j) + bias

    return embed


_KERNELS: dict = {}


def _kernel(kind, qtype: QType):
    """The kernel made by `kind` for one format, built on first use."""
    if (kind, qtype) not in _KERNELS:
        _KERNELS[kind, qtype] = kind(UNITS[qtype])
    return _KERNELS[kind, qtype]


def _format(qtype: QType | str | int, rows_dev, n: int) -> QType:
    fmt = block_format(qtype)
    if fmt.qtype not in UNITS:
        raise ValueError(
            f"the CUDA backend does not support {fmt.qtype.name} weights (supported: "
            f"{', '.join(t.name for t in UNITS)})")
    if len(rows_dev.shape) != 2 or rows_dev.shape[1] != fmt.row_bytes(n):
        raise ValueError(f"{fmt.qtype.name} rows of shape {rows_dev.shape} do not hold rows of "
                         f"{n} weights")
    return fmt.qtype


def _weights(rows_dev, qtype: QType):
    """The array the kernels index: bytes, or float32 values for F32."""
    return rows_dev.view(np.float32) if qtype == QType.F32 else rows_dev


def upload(rows: np.ndarray):
    """Copy a weight matrix to the device once, still in its block format.

    rows: uint8 (n_rows, row_bytes). Returns a device array of the same shape and dtype.
    """
    rows = np.asarray(rows)
    if rows.dtype != np.uint8 or rows.ndim != 2:
        raise ValueError(f"upload needs uint8 rows (n_rows, row_bytes), got {rows.dtype} "
                         f"{rows.shape}")
    return cuda.to_device(np.ascontiguousarray(rows))


def matmul(rows_dev, qtype: QType | str | int, x_dev):
    """x @ W.T for a quantized W on the device.

    rows_dev: uint8 (n_rows, row_bytes) from `upload`; x_dev: float32 (T, n).
    Returns a new float32 device array (T, n_rows). T = 1 runs the fused decode matvec (W read
    once, straight from its blocks); T > 1 the tiled prefill kernel.
    """
    n_tokens, n = x_dev.shape
    qtype = _format(qtype, rows_dev, n)
    n_rows = rows_dev.shape[0]
    out = cuda.device_array((n_tokens, n_rows), np.float32)
    weights = _weights(rows_dev, qtype)
    if n_tokens == 1:
        _launch(_kernel(_matvec_kernel, qtype), _grid(n_rows, MATVEC_WARPS), MATVEC_THREADS,
                weights, x_dev[0], out[0])
    else:
        grid = (_grid(n_rows, TILE), _grid(n_tokens, TILE))
        _launch(_kernel(_matmul_kernel, qtype), grid, (SIDE, SIDE), weights, x_dev, out)
    return out


def embed(rows_dev, qtype: QType | str | int, tokens: np.ndarray, dim: int | None = None):
    """Dequantize rows `tokens` of an embedding table on the device.

    rows_dev: uint8 (vocab, row_bytes); tokens: int64 (T,) host array; dim: weights per row
    (derived from the row bytes when None). Returns a new float32 device array (T, dim).
    """
    fmt = block_format(qtype)
    if dim is None:
        dim = rows_dev.shape[1] // fmt.type_size * fmt.block_size
    qtype = _format(qtype, rows_dev, dim)
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= rows_dev.shape[0]):
        raise ValueError(f"token ids must lie in [0, {rows_dev.shape[0]}), got "
                         f"{tokens.min()}..{tokens.max()}")
    out = cuda.device_array((tokens.size, dim), np.float32)
    if tokens.size:
        n_units = dim // UNITS[qtype].size
        _launch(_kernel(_embed_kernel, qtype), (_grid(n_units, THREADS), tokens.size), THREADS,
                _weights(rows_dev, qtype), cuda.to_device(tokens), out)
    return out


# ---------------------------------------------------------------- float kernels

@cuda.jit(cache=True)
def _rmsnorm(x, weight, eps, out):
    """One block per token: block-wide sum of squares in shared memory, then scale."""
    partial = cuda.shared.array(THREADS, float32)
    t, tid = cuda.blockIdx.x, cuda.threadIdx.x
    dim = x.shape[1]
    ss = F32(0)
    for i in range(tid, dim, THREADS):
        ss += x[t, i] * x[t, i]
    partial[tid] = ss
    cuda.syncthreads()
    step = THREADS // 2
    while step > 0:
        if tid < step:
            partial[tid] += partial[tid + step]
        cuda.syncthreads()
        step //= 2
    scale = F32(1) / math.sqrt(partial[0] / F32(dim) + eps)
    for i in range(tid, dim, THREADS):
        out[t, i] = x[t, i] * scale * weight[i]


def rmsnorm(x_dev, weight_dev, eps: float):
    """x / sqrt(mean(x^2) + eps) * weight per row. x: float32 (T, dim); weight: float32 (dim,).
    Returns a new device array (T, dim)."""
    out = cuda.device_array_like(x_dev)
    _launch(_rmsnorm, x_dev.shape[0], THREADS, x_dev, weight_dev, F32(eps), out)
    return out


@cuda.jit(cache=True)
def _rope(x, positions, inv_freq, out):
    """One thread per element of out, consecutive threads on consecutive elements: its half of a
    rotated pair, or a copy past rope_dim; angle in float64 so long positions stay exact."""
    idx = cuda.grid(1)
    n_heads, head_dim = x.shape[1], x.shape[2]
    if idx < x.shape[0] * n_heads * head_dim:
        d, th = idx % head_dim, idx // head_dim
        t, h, i = th // n_heads, th % n_heads, d // 2
        if i < inv_freq.shape[0]:
            angle = positions[t] * inv_freq[i]
            c, s = F32(math.cos(angle)), F32(math.sin(angle))
            a, b = x[t, h, 2 * i], x[t, h, 2 * i + 1]
            out[t, h, d] = a * c - b * s if d % 2 == 0 else a * s + b * c
        else:
            out[t, h, d] = x[t, h, d]


def rope(x_dev, positions_dev, inv_freq_dev):
    """x with adjacent pairs (x[2i], x[2i+1]) of each head rotated by positions[t] * inv_freq[i];
    pairs past rope_dim unchanged. x: float32 (T, heads, D); positions: int64 (T,); inv_freq:
    float64 (rope_dim // 2,). Returns a new device array (T, heads, D)."""
    out = cuda.device_array_like(x_dev)
    _launch(_rope, _grid(x_dev.size, THREADS), THREADS, x_dev, positions_dev, inv_freq_dev, out)
    return out


@cuda.jit(cache=True)
def _attention(q, k_new, v_new, k_cache, v_cache, start_pos, window, out):
    """One block per (token, head): keys in tiles of KEY_TILE staged in shared memory, scores
    from KEY_PARTS threads per key, an online softmax across tiles; thread d owns out[..., d]."""
    ks = cuda.shared.array((KEY_TILE, HEAD_DIM_PADDED), float32)
    vs = cuda.shared.array((KEY_TILE, MAX_HEAD_DIM), float32)
    qs = cuda.shared.array(MAX_HEAD_DIM, float32)
    partial = cuda.shared.array(ATTENTION_THREADS, float32)
    scores = cuda.shared.array(KEY_TILE, float32)
    weights = cuda.shared.array(KEY_TILE, float32)
    t, h, tid = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
    head_dim, n_slots = q.shape[2], k_cache.shape[1]
    kv = h // (q.shape[1] // k_new.shape[1])
    pos = start_pos + t
    first = max(0, pos - window + 1) if window > 0 else 0
    for d in range(tid, head_dim, ATTENTION_THREADS):
        qs[d] = q[t, h, d]
    scale = F32(1) / math.sqrt(F32(head_dim))
    best = F32(-math.inf)
    total = F32(0)
    acc = F32(0)
    for k0 in range(first, pos + 1, KEY_TILE):
        n_keys = min(KEY_TILE, pos + 1 - k0)
        for e in range(tid, n_keys * head_dim, ATTENTION_THREADS):
            key, d = e // head_dim, e % head_dim
            p = k0 + key
            if p >= start_pos:
                ks[key, d] = k_new[p - start_pos, kv, d]
                vs[key, d] = v_new[p - start_pos, kv, d]
            else:
                ks[key, d] = k_cache[kv, p % n_slots, d]
                vs[key, d] = v_cache[kv, p % n_slots, d]
        cuda.syncthreads()
        # A warp takes one part of the dimensions of all KEY_TILE keys: no bank conflicts.
        key, part = tid % KEY_TILE, tid // KEY_TILE
        s = F32(0)
        if key < n_keys:
            for d in range(part, head_dim, KEY_PARTS):
                s += qs[d] * ks[key, d]
        partial[tid] = s
        cuda.syncthreads()
        if tid < KEY_TILE:
            s = F32(0)
            for i in range(KEY_PARTS):
                s += partial[i * KEY_TILE + tid]
            scores[tid] = s * scale
        cuda.syncthreads()
        tile_best = scores[0]
        for i in range(1, n_keys):
            tile_best = max(tile_best, scores[i])
        new_best = max(best, tile_best)
        correction = math.exp(best - new_best)  # 0 on the first tile (best = -inf)
        if tid < n_keys:
            weights[tid] = math.exp(scores[tid] - new_best)
        cuda.syncthreads()
        tile_total = F32(0)
        tile_acc = F32(0)
        for i in range(n_keys):
            tile_total += weights[i]
            if tid < head_dim:
                tile_acc += weights[i] * vs[i, tid]
        total = total * correction + tile_total
        acc = acc * correction + tile_acc
        best = new_best
        cuda.syncthreads()
    if tid < head_dim:
        out[t, h, tid] = acc / total


def attention(q_dev, k_new_dev, v_new_dev, k_cache_dev, v_cache_dev, start_pos: int,
              window: int):
    """Causal grouped-query attention of T new tokens at positions start_pos.. (the semantics of
    kernels.cpu.ops.attention).

    q: float32 (T, H, D), rotated; k_new, v_new: (T, KV, D), the chunk's own keys and values;
    k_cache, v_cache: (KV, S, D), position p at slot p % S, holding the positions before
    start_pos; window: sliding window, 0 for none (the query at p sees p - window + 1 .. p).
    Returns a new float32 device array (T, H, D). D must be at most MAX_HEAD_DIM.
    """
    n_tokens, n_heads, head_dim = q_dev.shape
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} exceeds the CUDA attention kernel's {MAX_HEAD_DIM}")
    if n_heads % k_new_dev.shape[1]:
        raise ValueError(f"{n_heads} query heads are not a multiple of {k_new_dev.shape[1]} "
                         f"KV heads")
    out = cuda.device_array_like(q_dev)
    if n_tokens:
        _launch(_attention, (n_tokens, n_heads), ATTENTION_THREADS,
                q_dev, k_new_dev, v_new_dev, k_cache_dev, v_cache_dev, int(start_pos), int(window),
                out)
    return out


@cuda.jit(cache=True)
def _kv_write(k_cache, v_cache, start_pos, k, v):
    idx = cuda.grid(1)
    n_tokens, n_kv, head_dim = k.shape
    n_slots = k_cache.shape[1]
    if idx < n_tokens * n_kv * head_dim:
        t, kv, d = idx // (n_kv * head_dim), idx // head_dim % n_kv, idx % head_dim
        if t >= n_tokens - n_slots:  # of positions sharing a slot, the last one is kept
            slot = (start_pos + t) % n_slots
            k_cache[kv, slot, d] = k[t, kv, d]
            v_cache[kv, slot, d] = v[t, kv, d]


def kv_write_(k_cache_dev, v_cache_dev, start_pos: int, k_dev, v_dev) -> None:
    """In place: store keys and values of positions start_pos .. start_pos + T - 1 at slots p % S.
    k_cache, v_cache: float32 (KV, S, D); k, v: float32 (T, KV, D)."""
    n = k_dev.shape[0] * k_dev.shape[1] * k_dev.shape[2]
    if n:
        _launch(_kv_write, _grid(n, THREADS), THREADS, k_cache_dev, v_cache_dev, int(start_pos),
                k_dev, v_dev)


@cuda.jit(cache=True)
def _swiglu(gate, up, out):
    idx = cuda.grid(1)
    if idx < gate.size:
        t, i = idx // gate.shape[1], idx % gate.shape[1]
        g = gate[t, i]
        out[t, i] = g / (F32(1) + math.exp(-g)) * up[t, i]


def swiglu(gate_dev, up_dev):
    """silu(gate) * up. gate, up: float32 (T, ffn_dim). Returns a new device array."""
    out = cuda.device_array_like(gate_dev)
    _launch(_swiglu, _grid(gate_dev.size, THREADS), THREADS, gate_dev, up_dev, out)
    return out


@cuda.jit(cache=True)
def _add(x, y):
    idx = cuda.grid(1)
    if idx < x.size:
        t, i = idx // x.shape[1], idx % x.shape[1]
        x[t, i] += y[t, i]


def add_(x_dev, y_dev):
    """x += y in place (the residual). x, y: float32 (T, dim). Returns x."""
    _launch(_add, _grid(x_dev.size, THREADS), THREADS, x_dev, y_dev)
    return x_dev
