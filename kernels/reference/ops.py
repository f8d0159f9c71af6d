"""NumPy references for the transformer's kernels: the definitions, in float64 where it helps.

Same signatures and conventions as kernels.cpu.ops, but returning new arrays.
"""
from __future__ import annotations

import numpy as np

from .dequant import DEQUANTIZE


def matmul(rows: np.ndarray, qtype, x: np.ndarray) -> np.ndarray:
    """x @ W.T for the dequantized rows of W (uint8 (n_rows, row_bytes)) and x float32 (T, n), in
    float64, returned as float32 (T, n_rows)."""
    w = DEQUANTIZE[qtype](rows.reshape(-1)).reshape(rows.shape[0], -1)
    return (x.astype(np.float64) @ w.astype(np.float64).T).astype(np.float32)


def matvec(rows: np.ndarray, qtype, x: np.ndarray) -> np.ndarray:
    """Dequantized rows (n_rows, n) @ x (n,), in float64, returned as float32 (n_rows,)."""
    return matmul(rows, qtype, x[None])[0]


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x: (T, dim) -> x / sqrt(mean(x^2) + eps) * weight."""
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + eps) * weight).astype(np.float32)


def rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """x: (T, heads, D); rotate pairs (2i, 2i+1), i < len(inv_freq), by positions * inv_freq."""
    out = x.astype(np.float64)
    angle = positions[:, None, None] * inv_freq[None, None, :]
    a, b = out[..., 0:2 * len(inv_freq):2].copy(), out[..., 1:2 * len(inv_freq):2].copy()
    out[..., 0:2 * len(inv_freq):2] = a * np.cos(angle) - b * np.sin(angle)
    out[..., 1:2 * len(inv_freq):2] = a * np.sin(angle) + b * np.cos(angle)
    return out.astype(np.float32)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray,
              key_positions: np.ndarray, window: int) -> np.ndarray:
    """Softmax attention with a causal band mask: query at position p sees keys at positions
    p - window < kp <= p (window 0: kp <= p). q: (T, H, D); k, v: (L, KV, D) with KV dividing H."""
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1).astype(np.float64), np.repeat(v, group, axis=1).astype(np.float64)
    scores = np.einsum("thd,lhd->htl", q.astype(np.float64), k) / np.sqrt(q.shape[-1])
    delta = positions[:, None] - key_positions[None, :]
    visible = (delta >= 0) & ((delta < window) if window > 0 else True)
    scores = np.where(visible[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("htl,lhd->thd", probs, v).astype(np.float32)


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    g = gate.astype(np.float64)
    return (g / (1 + np.exp(-g)) * up).astype(np.float32)
