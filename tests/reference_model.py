"""A float64 NumPy reference of the llama/mistral forward pass: plain, whole-sequence, dequantized
weights, no cache. Written from the architecture's definition, independent of mistral_ref.model."""
from __future__ import annotations

import gguf
import numpy as np

from mistral_ref.gguf import GGUFFile


def weight(f: GGUFFile, name: str) -> np.ndarray:
    t = f.tensors[name]  # gguf-py dequantizes: independent of our kernels
    return gguf.quants.dequantize(t.rows, t.qtype).reshape(t.shape).astype(np.float64)


def reference_logits(f: GGUFFile, tokens: list[int]) -> np.ndarray:
    """Logits (n_tokens, vocab), float64."""
    c = f.config
    n = len(tokens)
    x = weight(f, "token_embd.weight")[tokens]

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c.norm_eps) * w

    pos = np.arange(n)[:, None]
    angle = pos * c.rope_theta ** (-np.arange(0, c.rope_dim, 2) / c.rope_dim)  # (n, rope_dim/2)

    def rope(x):  # x: (n, heads, D)
        # GGUF llama files store Q/K so rotated pairs are adjacent; qwen3 files keep HF's order,
        # which rotates dimension i with i + rope_dim / 2 (llama.cpp's NEOX mode)
        x = x.copy()
        first, second = ((slice(0, c.rope_dim // 2), slice(c.rope_dim // 2, c.rope_dim)) if c.rope_halves
                         else (slice(0, c.rope_dim, 2), slice(1, c.rope_dim, 2)))
        a, b = x[..., first].copy(), x[..., second].copy()
        cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
        x[..., first], x[..., second] = a * cos - b * sin, a * sin + b * cos
        return x

    delta = pos - pos.T  # query position - key position
    visible = delta >= 0
    if c.sliding_window:
        visible &= delta < c.sliding_window  # a query sees itself and the previous W - 1
    group = c.n_heads // c.n_kv_heads
    for i in range(c.n_layers):
        w = lambda name: weight(f, f"blk.{i}.{name}.weight")
        h = norm(x, w("attn_norm"))
        q = (h @ w("attn_q").T).reshape(n, c.n_heads, c.head_dim)
        k = (h @ w("attn_k").T).reshape(n, c.n_kv_heads, c.head_dim)
        if c.qk_norm:  # Qwen3: RMSNorm over each head's vector
            q, k = norm(q, w("attn_q_norm")), norm(k, w("attn_k_norm"))
        if i not in c.no_rope_layers:  # SmolLM3 leaves some layers without positions
            q, k = rope(q), rope(k)
        v = (h @ w("attn_v").T).reshape(n, c.n_kv_heads, c.head_dim)
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(c.head_dim)
        scores = np.where(visible, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", p, v).reshape(n, -1) @ w("attn_output").T
        h = norm(x, w("ffn_norm"))
        gate, up = h @ w("ffn_gate").T, h @ w("ffn_up").T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w("ffn_down").T
    out = "token_embd.weight" if c.tied_embeddings else "output.weight"
    return norm(x, weight(f, "output_norm.weight")) @ weight(f, out).T
